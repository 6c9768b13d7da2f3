"""DARTS's pooling candidates on the selected backend's pooling (:func:`fastnas.ops.max_pool2d`,
:func:`fastnas.ops.avg_pool2d`): ``nn.MaxPool2d`` / ``nn.AvgPool2d`` with the same arguments, state and results."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d``; without dilation, ceil mode or returned indices, on the selected backend's pooling."""

    @property
    def fused(self) -> bool:
        """Whether its settings are the ones the ops' pooling computes (else it is ``nn.MaxPool2d``'s)."""
        return self.dilation in (1, (1, 1)) and not self.ceil_mode and not self.return_indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused or x.dim() != 4:
            return super().forward(x)
        return ops.max_pool2d(x, self.kernel_size, self.stride, self.padding)


class AvgPool2d(nn.AvgPool2d):
    """``nn.AvgPool2d``; with ``count_include_pad=False`` and no ceil mode or divisor override, on the selected
    backend's pooling."""

    @property
    def fused(self) -> bool:
        """Whether its settings are the ones the ops' pooling computes (else it is ``nn.AvgPool2d``'s)."""
        return not self.count_include_pad and not self.ceil_mode and self.divisor_override is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused or x.dim() != 4:
            return super().forward(x)
        return ops.avg_pool2d(x, self.kernel_size, self.stride, self.padding)
