"""The candidate operations of the DARTS search space, and the attention operations of AT-DARTS.

Each factory takes ``(C, stride, affine)`` and returns a module mapping [N, C, H, W] to [N, C, H/stride, W/stride].
Shapes and parameter counts follow the original DARTS implementation exactly. :func:`layers` lists what an op
applies in order, so that a search cell's plan can see the ReLU an op begins with and the batch norm it ends with.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .attention import ChannelAttention, SpatialAttention
from .. import ops
from .lean import LeanBatchNorm2d, LeanConv2d
from .pooling import AvgPool2d, MaxPool2d


class ReLUConvBN(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, padding: int, affine: bool = True):
        super().__init__(
            nn.ReLU(inplace=False),
            LeanConv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False),
            LeanBatchNorm2d(c_out, affine=affine),
        )


class DilConv(nn.Sequential):
    """ReLU → depthwise (dilated) conv → pointwise conv → BN."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, padding: int, dilation: int,
                 affine: bool = True):
        super().__init__(
            nn.ReLU(inplace=False),
            LeanConv2d(c_in, c_in, kernel_size, stride, padding, dilation=dilation, groups=c_in, bias=False),
            LeanConv2d(c_in, c_out, 1, bias=False),
            LeanBatchNorm2d(c_out, affine=affine),
        )


class SepConv(nn.Sequential):
    """Two stacked separable convolutions; the first one carries the stride."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, padding: int, affine: bool = True):
        super().__init__(
            DilConv(c_in, c_in, kernel_size, stride, padding, 1, affine),
            DilConv(c_in, c_out, kernel_size, 1, padding, 1, affine),
        )


class FactorizedReduce(nn.Module):
    """Halve H and W with two offset 1×1 stride-2 convolutions whose outputs are concatenated."""

    def __init__(self, c_in: int, c_out: int, affine: bool = True):
        super().__init__()
        if c_out % 2:
            raise ValueError(f"FactorizedReduce needs an even number of output channels, got {c_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = LeanConv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv_2 = LeanConv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.bn = LeanBatchNorm2d(c_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.reduce(self.relu(x)))

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The two convolutions, concatenated (before the batch norm)."""
        h_odd, w_odd = x.shape[-2] % 2, x.shape[-1] % 2
        if not (h_odd or w_odd) and isinstance(self.conv_2, LeanConv2d) and self.conv_2.subsampled is not None:
            # the shifted branch reads the odd rows and columns: subsample them directly
            return torch.cat([self.conv_1(x), self.conv_2.forward_subsampled(ops.subsample(x, (2, 2), (1, 1)))], dim=1)
        shifted = x[:, :, 1:, 1:]
        if h_odd or w_odd:  # pad the shifted branch back so that odd sizes work too
            shifted = nn.functional.pad(shifted, (0, w_odd, 0, h_odd))
        return torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1)


class Zero(nn.Module):
    """The ``none`` operation. Search cells skip it; it exists for completeness and for evaluation networks."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class Gated(nn.Sequential):
    """An attention gate, preceded by FactorizedReduce at stride 2 (as skip_connect is)."""


def gated(gate: nn.Module, C: int, stride: int, affine: bool) -> nn.Module:
    """An attention gate as a candidate op: itself at stride 1, after a factorized reduction at stride 2."""
    return gate if stride == 1 else Gated(FactorizedReduce(C, C, affine), gate)


def _conv_7x1_1x7(C: int, stride: int, affine: bool) -> nn.Module:
    return nn.Sequential(
        nn.ReLU(inplace=False),
        LeanConv2d(C, C, (1, 7), stride=(1, stride), padding=(0, 3), bias=False),
        LeanConv2d(C, C, (7, 1), stride=(stride, 1), padding=(3, 0), bias=False),
        LeanBatchNorm2d(C, affine=affine),
    )


def layers(op: nn.Module) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """What ``op`` applies, in order: nested ``nn.Sequential`` flattened, :class:`FactorizedReduce` as its ReLU, its
    convolutions and its batch norm, any other module as itself. Applying them in turn computes ``op(x)``."""
    if isinstance(op, nn.Sequential):
        return [layer for module in op for layer in layers(module)]
    if isinstance(op, FactorizedReduce):
        return [op.relu, op.reduce, op.bn]
    return [op]


BUILTIN_OPS = {
    "none": lambda C, stride, affine: Zero(stride),
    "avg_pool_3x3": lambda C, stride, affine: AvgPool2d(3, stride=stride, padding=1, count_include_pad=False),
    "max_pool_3x3": lambda C, stride, affine: MaxPool2d(3, stride=stride, padding=1),
    "skip_connect": lambda C, stride, affine: nn.Identity() if stride == 1 else FactorizedReduce(C, C, affine),
    "sep_conv_3x3": lambda C, stride, affine: SepConv(C, C, 3, stride, 1, affine),
    "sep_conv_5x5": lambda C, stride, affine: SepConv(C, C, 5, stride, 2, affine),
    "sep_conv_7x7": lambda C, stride, affine: SepConv(C, C, 7, stride, 3, affine),
    "dil_conv_3x3": lambda C, stride, affine: DilConv(C, C, 3, stride, 2, 2, affine),
    "dil_conv_5x5": lambda C, stride, affine: DilConv(C, C, 5, stride, 4, 2, affine),
    "conv_7x1_1x7": _conv_7x1_1x7,
    "channel_attention": lambda C, stride, affine: gated(ChannelAttention(C), C, stride, affine),
    "spatial_attention": lambda C, stride, affine: gated(SpatialAttention(7, affine), C, stride, affine),
}
