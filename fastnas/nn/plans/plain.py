"""The plain plan: every candidate runs whole and every activation is stored for the backward, as in DARTS."""
from __future__ import annotations

from typing import Sequence

import torch

from ... import ops
from .base import CellPlan, NodeSum, Plan


class PlainCellPlan(CellPlan):
    def start(self) -> NodeSum:
        return self.node_sum

    def node_sum(self, states: Sequence[torch.Tensor], edges: range, weights: torch.Tensor,
                 edge_weights: torch.Tensor | None = None) -> torch.Tensor:
        """One fused mixed_sum over all candidates of all incoming edges."""
        outputs = [out for e, h in zip(edges, states) for out in self.runner.all(e, h, None)]
        return ops.mixed_sum(outputs, weights[edges.start:edges.stop].reshape(-1))


class PlainPlan(Plan):
    """Σ_edges Σ_ops w·op(h) as one :func:`fastnas.ops.mixed_sum` per node; PyTorch's own autograd everywhere."""

    name = "plain"
    memory_efficient = False
    cell_plan = PlainCellPlan
