"""The DARTS search cell with node-level fusion of the MixedOps.

In DARTS every edge is a MixedOp, Σ_o w_o · o(h), and a node sums its incoming edges. Here each intermediate node is
one fused :func:`fastnas.ops.mixed_sum` over all candidate outputs of all its incoming edges, which is the same sum.
``none`` is never evaluated (its weight multiplies zeros), and ``skip_connect`` at stride 1 hands its input over
without a copy.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .. import ops
from ..space import make_op
from .operations import FactorizedReduce, ReLUConvBN


def search_candidate(name: str, C: int, stride: int) -> nn.Module:
    """A candidate op as the DARTS search MixedOp builds it: affine-free, pooling followed by affine-free BN."""
    op = make_op(name, C, stride, affine=False)
    if "pool" in name:
        op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
    return op


class SearchCell(nn.Module):
    def __init__(self, primitives: Sequence[str], steps: int, multiplier: int, c_prev_prev: int, c_prev: int, C: int,
                 reduction: bool, reduction_prev: bool) -> None:
        super().__init__()
        self.reduction = reduction
        self.steps = steps
        self.multiplier = multiplier
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(c_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(c_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(c_prev, C, 1, 1, 0, affine=False)
        # the columns of the architecture weights that have an op to run ('none' is skipped)
        self.active = [k for k, p in enumerate(primitives) if p != "none"]
        self.edges = nn.ModuleList()
        for i in range(steps):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                self.edges.append(nn.ModuleList(search_candidate(primitives[k], C, stride) for k in self.active))

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``weights``: [edges, ops] softmax weights of this cell type."""
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        active = weights[:, self.active] if len(self.active) != weights.shape[1] else weights
        offset = 0
        for _ in range(self.steps):
            n_in = len(states)
            outputs = [op(h) for j, h in enumerate(states) for op in self.edges[offset + j]]
            node_weights = active[offset:offset + n_in].reshape(-1)
            states.append(ops.mixed_sum(outputs, node_weights))
            offset += n_in
        return torch.cat(states[-self.multiplier:], dim=1)
