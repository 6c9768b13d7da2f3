"""DARTS- (Chu et al., 2021): an auxiliary skip connection on every edge, outside the architecture weights.

Each node becomes Σ_edges Σ_o w_eo · o(h_e) + β_t · Σ_edges a_e(h_e): the skip that DARTS's collapse favours is
given to every edge for free, so that the architecture weights need not pick ``skip_connect`` to obtain the
gradient path it gives. As in DARTS-'s code, a_e is the identity on stride-1 edges and an affine-free factorized
reduction with weights of its own on the stride-2 edges of a reduction cell (``SuperNet(aux_skip=True)`` builds
them; they train with the other weights). β_t decays to 0 over the search
(:func:`fastnas.robust.aux_skip_coefficient`), so the supernet at the end is DARTS's, and the derivation rule does not
change (the auxiliary skip has no α).
:class:`AuxSkipPlan` wraps the plan that computes the sums; its coefficient is set once per epoch, not per call.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ...errors import ConfigError
from .base import CellPlan, NodeSum, Plan, Runner


class AuxSkipCellPlan(CellPlan):
    def __init__(self, cell: nn.Module, inner: CellPlan, plan: "AuxSkipPlan") -> None:
        super().__init__(cell, inner.runner)
        self.inner, self.plan = inner, plan
        if any(stride == 2 for stride in cell.strides) and cell.aux_reduce is None:
            raise ConfigError("DARTS-'s auxiliary skip needs a factorized reduction on each stride-2 edge: build the "
                              "SuperNet with aux_skip=True")
        # the auxiliary op of each edge: None for the identity (stride 1), else the edge's factorized reduction
        self.aux_ops = [None if stride == 1 else cell.aux_reduce[str(e)] for e, stride in enumerate(cell.strides)]

    def run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.inner.run(module, x)

    def start(self) -> NodeSum:
        node_sum, beta = self.inner.start(), self.plan.coefficient
        if beta == 0.0:  # the end of the schedule: DARTS's node sums, nothing added
            return node_sum

        def with_skip(states: Sequence[torch.Tensor], edges: range, weights: torch.Tensor,
                      edge_weights: torch.Tensor | None = None) -> torch.Tensor:
            out = node_sum(states, edges, weights, edge_weights)
            for e, h in zip(edges, states):
                op = self.aux_ops[e]
                out = out + beta * (h if op is None else op(h)).to(out.dtype)
            return out
        return with_skip


class AuxSkipPlan(Plan):
    """``base``'s node sums plus β·a_e(h) on every edge; ``coefficient`` (β) is set by the search each epoch."""

    name = "aux_skip"

    def __init__(self, base: Plan, coefficient: float = 1.0) -> None:
        self.base = base
        self.coefficient = float(coefficient)
        self.partial = base.partial

    def adapt(self, cell: nn.Module) -> None:
        self.base.adapt(cell)

    def prepare(self, cell: nn.Module, runner: Runner | None = None) -> CellPlan:
        return AuxSkipCellPlan(cell, self.base.prepare(cell, runner), self)

    def __repr__(self) -> str:
        return f"AuxSkipPlan({self.base!r}, coefficient={self.coefficient})"
