"""The partial-channels plan (PC-DARTS, Xu et al., 2020).

Each edge runs its candidates on the first C/K channels of its input and passes the rest by (max-pooled at stride
2); edge-normalisation weights β scale each edge. Channel shuffle is a permutation, so the node
Σ_j β_j · shuffle(cat(Σ_o w_jo o(x_j[:C/K]), x_j[C/K:])) is computed as
shuffle(cat(mixed_sum over all candidates with weights β_j·w_jo, mixed_sum over the bypasses with weights β_j)):
one fused sum per node and per part.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import nn

from ... import ops
from .base import CellPlan, NodeSum, Plan, Runner, SharedReLU
from .plain import use_pytorch_modules


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class PartialCellPlan(CellPlan):
    def __init__(self, cell: nn.Module, runner: Runner, share_relu: bool) -> None:
        super().__init__(cell, runner)
        self.share_relu = share_relu
        self.groups = cell.partial_channels
        # per edge, how its bypassed channels pass: max-pooled at stride 2, as they are at stride 1
        self.bypass = [cell.bypass_pool if stride == 2 else None for stride in cell.strides]

    def start(self) -> NodeSum:
        return functools.partial(self.node_sum, shared=SharedReLU() if self.share_relu else None)

    def node_sum(self, states: Sequence[torch.Tensor], edges: range, weights: torch.Tensor,
                 edge_weights: torch.Tensor | None = None, *, shared: SharedReLU | None) -> torch.Tensor:
        width = states[0].shape[1] // self.groups
        outputs, bypasses = [], []
        for j, (e, h) in enumerate(zip(edges, states)):
            part = h[:, :width]
            outputs += self.runner.all(e, part, functools.partial(shared.of, j, part) if shared is not None else None)
            rest = h[:, width:]
            bypasses.append(rest if self.bypass[e] is None else self.bypass[e](rest))
        beta = edge_weights[edges.start:edges.stop]
        main = ops.mixed_sum(outputs, (weights[edges.start:edges.stop] * beta[:, None]).reshape(-1))
        rest = ops.mixed_sum(bypasses, beta)
        return channel_shuffle(torch.cat([main, rest], dim=1), self.groups)


class PartialChannelsPlan(Plan):
    """PC-DARTS's node sums, for cells built with partial channels. With ``memory_efficient`` (the default) the
    candidates share relu(state) and the lean modules keep less; without, every activation is stored in PyTorch's
    own modules."""

    name = "partial"
    partial = True

    def __init__(self, memory_efficient: bool = True) -> None:
        self.memory_efficient = memory_efficient

    def adapt(self, cell: nn.Module) -> None:
        if not self.memory_efficient:
            use_pytorch_modules(cell)

    def cell_plan(self, cell: nn.Module, runner: Runner) -> CellPlan:
        return PartialCellPlan(cell, runner, self.memory_efficient)

    def __repr__(self) -> str:
        return f"PartialChannelsPlan(memory_efficient={self.memory_efficient})"
