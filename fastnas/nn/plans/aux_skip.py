"""DARTS- (Chu et al., 2021): an auxiliary skip connection on the edges, outside the architecture weights.

Each node becomes Σ_edges Σ_o w_eo · o(h_e) + β_t · Σ_{stride-1 edges} h_e: the skip that DARTS's collapse favours
is given to every edge for free, so that the architecture weights need not pick ``skip_connect`` to obtain the
gradient path it gives. β_t decays to 0 over the search (:func:`fastnas.robust.aux_skip_coefficient`), so the
supernet at the end is DARTS's, and the derivation rule does not change (the auxiliary skip has no α).

The skip is added on stride-1 edges: every edge of a normal cell and the node-to-node edges of a reduction cell.
The stride-2 edges of a reduction cell (from its two inputs) get none: there the skip would be a factorized
reduction with weights of its own, which the supernet does not have. :class:`AuxSkipPlan` wraps the plan that
computes the sums; its coefficient is set once per epoch, not per call.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .base import CellPlan, NodeSum, Plan, Runner


class AuxSkipCellPlan(CellPlan):
    def __init__(self, cell: nn.Module, inner: CellPlan, plan: "AuxSkipPlan") -> None:
        super().__init__(cell, inner.runner)
        self.inner, self.plan = inner, plan
        self.identity = [stride == 1 for stride in cell.strides]  # the edges that carry an auxiliary skip

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
                if self.identity[e]:
                    out = out + beta * h.to(out.dtype)
            return out
        return with_skip


class AuxSkipPlan(Plan):
    """``base``'s node sums plus β·h on every stride-1 edge; ``coefficient`` (β) is set by the search each epoch."""

    name = "aux_skip"

    def __init__(self, base: Plan, coefficient: float = 1.0) -> None:
        self.base = base
        self.coefficient = float(coefficient)
        self.memory_efficient = base.memory_efficient
        self.partial = base.partial

    def prepare(self, cell: nn.Module, runner: Runner | None = None) -> CellPlan:
        return AuxSkipCellPlan(cell, self.base.prepare(cell, runner), self)

    def __repr__(self) -> str:
        return f"AuxSkipPlan({self.base!r}, coefficient={self.coefficient})"
