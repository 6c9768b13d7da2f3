"""Recomputation of parameter-free work in the backward pass, instead of storing it.

:func:`recompute` runs a function under non-reentrant activation checkpointing: its intermediate tensors are not
kept, and the backward runs it again. Batch norms inside (the affine-free ones after DARTS's pooling candidates)
update their running statistics only in the first run: :class:`RecomputableBatchNorm` sees the re-run.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch._dynamo
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..ops.defs.batch_norm import update_factor
from .lean import LeanBatchNorm2d


@torch._dynamo.assume_constant_result
def _recomputing() -> bool:
    """Whether this forward code runs inside a backward pass: the re-run of a checkpoint (a graph kept for several
    backward passes re-runs once per pass). ``torch.compile`` traces the forward once, outside any backward (a
    constant False), and recomputes what its partitioner chooses without running this code again."""
    return torch._C._current_graph_task_id() != -1


def recompute(fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
    """``fn(*args)``, keeping only ``args`` for the backward (which calls ``fn`` again; ``torch.compile`` traces the
    checkpoint as well)."""
    if not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False, determinism_check="none")


class RecomputableBatchNorm(LeanBatchNorm2d):
    """Batch norm whose re-run inside :func:`recompute` normalises with batch statistics without moving the
    running ones a second time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.track_running_stats and _recomputing():
            # the same computation on throw-away copies of the statistics (so the same tensors are saved)
            if self.lean_applies(x) or self.affine:
                return self.lean_forward(x, self.running_mean.clone(), self.running_var.clone())
            return F.batch_norm(x, self.running_mean.clone(), self.running_var.clone(), self.weight, self.bias, True,
                                update_factor(self.momentum, self.num_batches_tracked), self.eps)
        return super().forward(x)
