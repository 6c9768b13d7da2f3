"""The DARTS search cell.

In DARTS every edge is a MixedOp, Σ_o w_o · o(h), and a node sums its incoming edges. Here each intermediate node is
one sum over all candidate outputs of all its incoming edges, which is the same sum; how it is executed (what is
stored for the backward, which kernels run, what is compiled) is the network's plan (:mod:`fastnas.nn.plans`).
``none`` is never evaluated (its weight multiplies zeros), and ``skip_connect`` at stride 1 hands its input over
without a copy. With partial channels K (PC-DARTS) each edge's candidates work on C/K channels.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..space import channel_attention_op, make_op
from .attention import DEFAULT_REDUCTION
from .operations import FactorizedReduce, ReLUConvBN
from .plans import Plan, make_plan
from .plans.base import is_parameter_free
from .recompute import RecomputableBatchNorm


def search_candidate(name: str, C: int, stride: int, partial_channels: int = 1) -> nn.Module:
    """A candidate op as the DARTS search MixedOp builds it: affine-free, pooling followed by affine-free BN.

    With partial channels the channel-attention bottleneck keeps the width it has on all C channels
    (``max(1, C // r)``), so sampling channels does not shrink the gate's MLP to nothing."""
    width = C // partial_channels
    if name == "channel_attention" and partial_channels > 1:
        op = channel_attention_op(max(1, DEFAULT_REDUCTION // partial_channels))(width, stride, False)
    else:
        op = make_op(name, width, stride, affine=False)
    if "pool" in name:
        op = nn.Sequential(op, RecomputableBatchNorm(width, affine=False))
    return op


class SearchCell(nn.Module):
    """``steps`` nodes, each the weighted sum of every candidate on every edge from the cell's inputs and the
    earlier nodes; the output concatenates the last ``multiplier`` nodes. ``plan`` executes the sums (by default
    :func:`fastnas.nn.plans.make_plan`'s for ``partial_channels``), bound to the cell once, when it is built.
    ``aux_skip`` adds the factorized reductions that DARTS-'s auxiliary skip uses on stride-2 edges
    (:class:`fastnas.nn.plans.AuxSkipPlan`)."""

    def __init__(self, primitives: Sequence[str], steps: int, multiplier: int, c_prev_prev: int, c_prev: int, C: int,
                 reduction: bool, reduction_prev: bool, partial_channels: int = 1, plan: Plan | None = None,
                 aux_skip: bool = False) -> None:
        super().__init__()
        if partial_channels < 1 or C % partial_channels:
            raise ConfigError(f"partial channels {partial_channels} must divide the cell width {C}")
        self.reduction = reduction
        self.steps = steps
        self.multiplier = multiplier
        self.partial_channels = partial_channels
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(c_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(c_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(c_prev, C, 1, 1, 0, affine=False)
        # the columns of the architecture weights that have an op to run ('none' is skipped)
        self.active = [k for k, p in enumerate(primitives) if p != "none"]
        self.edges = nn.ModuleList()
        self.strides = []
        self.nodes = []  # the edges into each node: rows of the architecture weights
        for i in range(steps):
            self.nodes.append(range(len(self.edges), len(self.edges) + 2 + i))
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                self.strides.append(stride)
                self.edges.append(nn.ModuleList(
                    search_candidate(primitives[k], C, stride, partial_channels) for k in self.active))
        # DARTS-: the auxiliary skip of a stride-2 edge is a factorized reduction of its own (weights, no α)
        self.aux_reduce = None
        if aux_skip and reduction:
            self.aux_reduce = nn.ModuleDict({str(e): FactorizedReduce(C, C, affine=False)
                                             for e, stride in enumerate(self.strides) if stride == 2})
        # PC-DARTS: the bypassed channels of a stride-2 edge are max-pooled (ceil, so odd sizes match the ops)
        self.bypass_pool = nn.MaxPool2d(2, 2, ceil_mode=True) if partial_channels > 1 and reduction else None
        # which candidates (by position among the active ops) are parameter-free, per edge
        self.parameter_free = [[is_parameter_free(op) for op in edge] for edge in self.edges]
        plan = plan or make_plan(partial_channels=partial_channels)
        plan.adapt(self)
        self.plan = plan.prepare(self)  # a plain attribute: neither a submodule nor in the state dict

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor,
                edge_weights: torch.Tensor | None = None) -> torch.Tensor:
        """``weights``: [edges, ops] softmax weights of this cell type; ``edge_weights``: [edges] (partial channels)."""
        states = [self.plan.run(self.preprocess0, s0), self.plan.run(self.preprocess1, s1)]
        weights = weights[:, self.active] if len(self.active) != weights.shape[1] else weights
        states += self.plan.nodes(states, weights, edge_weights)  # node i: Σ_{e into i} Σ_o w_eo · o(h_e)
        return torch.cat(states[-self.multiplier:], dim=1)
