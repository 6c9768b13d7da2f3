"""The memory plan: what the backward needs, stored once.

The parameter-free candidates (pooling and its affine-free batch norm) are recomputed in the backward
(:func:`fastnas.nn.recompute.recompute`) instead of storing their outputs and internals, relu(state) is computed once
for all the candidates that begin with a ReLU, and the lean convolutions and batch norms keep less
(:mod:`fastnas.nn.lean`). The arithmetic is the plain plan's. Without gradients nothing is stored: a node is then one
mixed_sum, as in the plain plan.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch

from ... import ops
from ..recompute import recompute
from .base import CellPlan, NodeSum, Plan, Runner, SharedReLU


class MemoryCellPlan(CellPlan):
    def __init__(self, cell: torch.nn.Module, runner: Runner) -> None:
        super().__init__(cell, runner)
        self.edges = list(cell.edges)
        # per edge, the positions of its parameter-free candidates, and of the others
        self.free = [[c for c, free in enumerate(frees) if free] for frees in cell.parameter_free]
        self.kept = [[c for c, free in enumerate(frees) if not free] for frees in cell.parameter_free]

    def start(self) -> NodeSum:
        return functools.partial(self.node_sum, shared=SharedReLU())

    def node_sum(self, states: Sequence[torch.Tensor], edges: range, weights: torch.Tensor,
                 edge_weights: torch.Tensor | None = None, *, shared: SharedReLU) -> torch.Tensor:
        node_weights = weights[edges.start:edges.stop]
        if not torch.is_grad_enabled():
            outputs = [out for j, (e, h) in enumerate(zip(edges, states))
                       for out in self.runner.all(e, h, functools.partial(shared.of, j, h))]
            return ops.mixed_sum(outputs, node_weights.reshape(-1))
        kept, kept_w, free = [], [], []
        for j, (e, h) in enumerate(zip(edges, states)):
            kept += self.runner.kept(e, h, functools.partial(shared.of, j, h))
            kept_w += [node_weights[j, c] for c in self.kept[e]]
            free += [(j, c) for c in self.free[e]]
        return self.combine(states, edges, node_weights, kept, kept_w, free)

    def combine(self, states: Sequence[torch.Tensor], edges: range, node_weights: torch.Tensor,
                kept: list[torch.Tensor], kept_w: list[torch.Tensor], free: list[tuple[int, int]]) -> torch.Tensor:
        """Σ ``kept_w``·``kept`` plus the recomputed share of the ``free`` candidates (state j, position c)."""
        if not free:  # then ``kept`` holds every candidate, in order
            return ops.mixed_sum(kept, node_weights.reshape(-1))
        share = self.recomputed_share(states, edges, node_weights, free)
        if not kept:
            return share
        one = torch.ones((), dtype=node_weights.dtype, device=node_weights.device)
        return ops.mixed_sum(kept + [share.to(kept[0].dtype)], torch.stack(kept_w + [one]))

    def recomputed_share(self, states: Sequence[torch.Tensor], edges: range, node_weights: torch.Tensor,
                         free: list[tuple[int, int]]) -> torch.Tensor:
        """Σ of the parameter-free candidates (state j, position c) of a node, under :func:`recompute`: neither
        their outputs nor their internals (max-pool indices, batch-norm inputs) are stored for the backward."""
        candidates = self.edges[edges.start:edges.stop]
        backend = ops.get_backend()  # the backward's re-run uses the backend of this forward

        def free_share(free_w: torch.Tensor, *hs: torch.Tensor) -> torch.Tensor:
            with ops.backend(backend):  # the candidates' own kernels (pooling, batch norm) follow it too
                return ops.mixed_sum([candidates[j][c](hs[j]) for j, c in free], free_w, backend=backend)

        free_w = torch.stack([node_weights[j, c] for j, c in free])
        return recompute(free_share, free_w, *states)


class MemoryPlan(Plan):
    """Parameter-free candidates recomputed in the backward, relu(state) shared, lean modules."""

    name = "memory"
    cell_plan = MemoryCellPlan
