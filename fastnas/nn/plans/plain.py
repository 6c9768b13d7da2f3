"""The plain plan: the DARTS formulation. Every candidate runs whole in PyTorch's own modules and every activation
is stored for the backward."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ... import ops
from ..lean import LeanBatchNorm2d, LeanConv2d
from .base import CellPlan, NodeSum, Plan


def use_pytorch_modules(root: nn.Module) -> None:
    """Make the lean convolutions and batch norms under ``root`` the PyTorch modules they extend (``nn.Conv2d``,
    ``nn.BatchNorm2d``): the same parameters, buffers and state-dict names, PyTorch's own autograd, which stores
    every input. A lean module is its base class plus a leaner backward, so this changes what is stored, not the
    arithmetic."""
    for module in root.modules():
        if isinstance(module, LeanConv2d):
            module.__class__ = nn.Conv2d
        elif isinstance(module, LeanBatchNorm2d):
            module.__class__ = nn.BatchNorm2d


class PlainCellPlan(CellPlan):
    def start(self) -> NodeSum:
        return self.node_sum

    def node_sum(self, states: Sequence[torch.Tensor], edges: range, weights: torch.Tensor,
                 edge_weights: torch.Tensor | None = None) -> torch.Tensor:
        """One fused mixed_sum over all candidates of all incoming edges."""
        outputs = [out for e, h in zip(edges, states) for out in self.runner.all(e, h, None)]
        return ops.mixed_sum(outputs, weights[edges.start:edges.stop].reshape(-1))


class PlainPlan(Plan):
    """Σ_edges Σ_ops w·op(h) as one :func:`fastnas.ops.mixed_sum` per node over PyTorch's own modules."""

    name = "plain"
    cell_plan = PlainCellPlan

    def adapt(self, cell: nn.Module) -> None:
        use_pytorch_modules(cell)
