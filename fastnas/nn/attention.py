"""CBAM attention gates (Woo et al., 2018) on the fused ops, importable into any model."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .lean import LeanBatchNorm2d, LeanConv2d


DEFAULT_REDUCTION = 16  # CBAM's r


def mlp_hidden_width(channels: int, reduction: int) -> int:
    """Width of the channel gate's bottleneck: ``max(1, C // r)``."""
    return max(1, channels // reduction)


class ChannelAttention(nn.Module):
    """Channel gate: avg- and max-pool over H×W, one shared MLP (C → C/r → C), add, sigmoid, scale channels."""

    def __init__(self, channels: int, reduction: int = DEFAULT_REDUCTION) -> None:
        super().__init__()
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (channels, reduction)) \
                or channels < 1 or reduction < 1:
            raise ValueError(f"ChannelAttention needs channels >= 1 and reduction >= 1, got {channels} and {reduction}")
        hidden = mlp_hidden_width(channels, reduction)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, last = self.mlp[0], self.mlp[2]
        return ops.channel_attention(x, first.weight, first.bias, last.weight, last.bias)


class SpatialAttention(nn.Module):
    """Spatial gate: max- and mean-pool over C, k×k conv (2 → 1) with batch norm, sigmoid, scale positions."""

    def __init__(self, kernel_size: int = 7, affine: bool = True) -> None:
        super().__init__()
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 != 1:
            raise ValueError(f"SpatialAttention needs an odd positive int kernel_size, got {kernel_size!r}")
        self.conv = LeanConv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = LeanBatchNorm2d(1, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.bn(self.conv(ops.spatial_pool(x)))
        return ops.spatial_scale(x, logits)


class CBAM(nn.Module):
    """Channel gate followed by spatial gate, as in CBAM."""

    def __init__(self, channels: int, reduction: int = DEFAULT_REDUCTION, kernel_size: int = 7,
                 spatial: bool = True) -> None:
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(kernel_size) if spatial else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))
