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
from .base import CellPlan, NodeSum, Plan, Runner, SharedReLU, WeightPicker


class MemoryCellPlan(CellPlan):
    def __init__(self, cell: torch.nn.Module, runner: Runner) -> None:
        super().__init__(cell, runner)
        self.edges = list(cell.edges)
        # per edge, the positions of its parameter-free candidates, and of the others
        self.free = [[c for c, free in enumerate(frees) if free] for frees in cell.parameter_free]
        self.kept = [[c for c, free in enumerate(frees) if not free] for frees in cell.parameter_free]
        self.pick = WeightPicker()
        width = len(cell.active)  # the columns of a node's weights
        # per node (by its first edge): the flat positions j·width + c of its kept and of its free candidates
        self.kept_positions, self.free_positions = {}, {}
        for node in cell.nodes:
            pairs = list(enumerate(node))
            self.kept_positions[node.start] = tuple(j * width + c for j, e in pairs for c in self.kept[e])
            self.free_positions[node.start] = tuple(j * width + c for j, e in pairs for c in self.free[e])

    def start(self) -> NodeSum:
        return functools.partial(self.node_sum, shared=SharedReLU())

    def node_sum(self, states: Sequence[torch.Tensor], edges: range, weights: torch.Tensor,
                 edge_weights: torch.Tensor | None = None, *, shared: SharedReLU) -> torch.Tensor:
        node_weights = weights[edges.start:edges.stop]
        if not torch.is_grad_enabled():
            outputs = [out for j, (e, h) in enumerate(zip(edges, states))
                       for out in self.runner.all(e, h, functools.partial(shared.of, j, h))]
            return ops.mixed_sum(outputs, node_weights.reshape(-1))
        kept = []
        for j, (e, h) in enumerate(zip(edges, states)):
            kept += self.runner.kept(e, h, functools.partial(shared.of, j, h))
        return self.combine(states, edges, node_weights, kept, self.kept_positions[edges.start])

    def combine(self, states: Sequence[torch.Tensor], edges: range, node_weights: torch.Tensor,
                kept: list[torch.Tensor], positions: tuple[int, ...]) -> torch.Tensor:
        """Σ of the ``kept`` outputs (their weights at the flat ``positions``) plus the recomputed share of the
        node's parameter-free candidates."""
        if not self.free_positions[edges.start]:
            return ops.mixed_sum(kept, self.pick(node_weights, positions))
        share = self.recomputed_share(states, edges, node_weights)
        if not kept:
            return share
        return ops.mixed_sum(kept + [share.to(kept[0].dtype)], self.pick(node_weights, positions, one=True))

    def recomputed_share(self, states: Sequence[torch.Tensor], edges: range, node_weights: torch.Tensor,
                         ) -> torch.Tensor:
        """Σ of the node's parameter-free candidates under :func:`recompute`: neither their outputs nor their
        internals (max-pool indices, batch-norm inputs) are stored for the backward."""
        candidates = self.edges[edges.start:edges.stop]
        free = [(j, c) for j, e in enumerate(edges) for c in self.free[e]]
        backend = ops.get_backend()  # the backward's re-run uses the backend of this forward

        def free_share(free_w: torch.Tensor, *hs: torch.Tensor) -> torch.Tensor:
            with ops.backend(backend):  # the candidates' own kernels (pooling, batch norm) follow it too
                return ops.mixed_sum([candidates[j][c](hs[j]) for j, c in free], free_w, backend=backend)

        free_w = self.pick(node_weights, self.free_positions[edges.start])
        return recompute(free_share, free_w, *states)


class MemoryPlan(Plan):
    """Parameter-free candidates recomputed in the backward, relu(state) shared, lean modules."""

    name = "memory"
    cell_plan = MemoryCellPlan
