"""The fused-norms plan: the memory plan, with each node sum applying its candidates' final batch norms itself.

Most candidates end with an affine-free batch norm. A node is Σ w·BN(z) + Σ w·out over its candidates with the
normalisations done inside :func:`fastnas.ops.normalized_mixed_sum`, so the normalised outputs are never written.
The factory builds this plan only where the backend's fused kernels run (:func:`fastnas.ops.fused_norms_unsupported`);
without gradients (validation) a node is the memory plan's one mixed_sum.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
from torch import nn

from ... import ops
from ..lean import LeanBatchNorm2d
from ..operations import layers
from .base import Runner, SharedReLU, after_relu, apply_all
from .memory import MemoryCellPlan, MemoryPlan


def split_norm(op: nn.Module) -> tuple[list[Callable], LeanBatchNorm2d] | None:
    """(the layers between ``op``'s leading ReLU and its final batch norm, that norm), or None when ``op`` does not
    begin with a ReLU and end with an affine-free batch norm that tracks running statistics with a fixed momentum
    (what the fused node sum applies)."""
    chain = layers(op)
    if len(chain) < 2 or not isinstance(chain[0], nn.ReLU) or not isinstance(chain[-1], LeanBatchNorm2d):
        return None
    bn = chain[-1]
    if bn.affine or not bn.track_running_stats or bn.momentum is None:
        return None
    return chain[1:-1], bn


class FusedNormsCellPlan(MemoryCellPlan):
    def __init__(self, cell: nn.Module, runner: Runner) -> None:
        super().__init__(cell, runner)
        # per edge, each candidate that is not parameter-free: (position, op, its layers after a leading ReLU or
        # None, its split at the final norm or None)
        self.candidates = [[(c, edge[c], after_relu(edge[c]), split_norm(edge[c])) for c in kept]
                           for edge, kept in zip(self.edges, self.kept)]

    def node_sum(self, states: Sequence[torch.Tensor], edges: range, weights: torch.Tensor,
                 edge_weights: torch.Tensor | None = None, *, shared: SharedReLU) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().node_sum(states, edges, weights, edge_weights, shared=shared)
        node_weights = weights[edges.start:edges.stop]
        width = node_weights.shape[1]
        # terms: (output, or the input of a final norm the sum applies; that norm; the weight's flat position)
        terms = []
        for j, (e, h) in enumerate(zip(edges, states)):
            for c, op, rest, split in self.candidates[e]:
                terms.append((*_split_output(op, rest, split, h, functools.partial(shared.of, j, h)),
                              j * width + c))
        settings = next(((bn.momentum, bn.eps) for _, bn, _ in terms if bn is not None), None)
        # one momentum and eps for the fused norms: a norm with other settings runs by itself
        terms = [(bn(t), None, w) if bn is not None and (bn.momentum, bn.eps) != settings else (t, bn, w)
                 for t, bn, w in terms]
        normalized = [(t, bn) for t, bn, _ in terms if bn is not None]
        kept = [t for t, bn, _ in terms if bn is None]
        kept_positions = tuple(p for _, bn, p in terms if bn is None)
        if not normalized:
            return self.combine(states, edges, node_weights, kept, kept_positions)
        free = bool(self.free_positions[edges.start])
        share = [self.recomputed_share(states, edges, node_weights).to(normalized[0][0].dtype)] if free else []
        positions = tuple(p for _, bn, p in terms if bn is not None) + kept_positions
        return ops.normalized_mixed_sum(normalized, kept + share, self.pick(node_weights, positions, one=free))


def _split_output(op: nn.Module, rest: list[Callable] | None, split: tuple | None, h: torch.Tensor,
                  relu: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, LeanBatchNorm2d | None]:
    """(z, bn) when the node sum can apply ``op``'s final norm ``bn`` to z, else (op's output, None)."""
    if split is None:
        return (op(h) if rest is None else apply_all(rest, relu())), None
    body, bn = split
    z = apply_all(body, relu())
    return (z, bn) if bn.training else (bn(z), None)


class FusedNormsPlan(MemoryPlan):
    """The memory plan, with the candidates' final batch norms applied by the node sums where the kernel runs."""

    name = "fused_norms"
    cell_plan = FusedNormsCellPlan
