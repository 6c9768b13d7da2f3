"""Plain-PyTorch reference implementations: they define what every fused op means.

Autograd of these functions is PyTorch's own. Half-precision inputs are accumulated in float32 and the results cast
back to the input's dtype, as the fused kernels do.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import _checks


def mixed_sum(xs: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Σ_k weights[k] · xs[k]."""
    _checks.check_mixed_sum(xs, weights)
    dtype = xs[0].dtype
    acc = _checks.acc_dtype(dtype)
    w = weights.to(acc)
    if dtype == acc:
        out = xs[0] * w[0]
        for k in range(1, len(xs)):
            out = out + xs[k] * w[k]
        return out
    out = xs[0].to(acc) * w[0]
    for k in range(1, len(xs)):
        out = out + xs[k].to(acc) * w[k]
    return out.to(dtype)


def channel_pool(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, max) of every channel over H×W, each [N, C]."""
    _checks.check_4d("channel_pool", "x", x)
    n, c = x.shape[:2]
    flat = x.reshape(n, c, x.shape[2] * x.shape[3])
    if flat.shape[-1] == 0:
        raise ValueError(f"fastnas.channel_pool: x has no spatial elements (shape {list(x.shape)}), the max is undefined")
    avg = flat.to(_checks.acc_dtype(x.dtype)).mean(dim=2).to(x.dtype)
    mx = flat.max(dim=2).values
    return avg, mx


def spatial_pool(x: torch.Tensor) -> torch.Tensor:
    """[N, 2, H, W]: channel 0 the max over C, channel 1 the mean over C."""
    _checks.check_4d("spatial_pool", "x", x)
    if x.shape[1] == 0:
        raise ValueError(f"fastnas.spatial_pool: x has no channels (shape {list(x.shape)}), the max is undefined")
    mx = x.max(dim=1, keepdim=True).values
    avg = x.to(_checks.acc_dtype(x.dtype)).mean(dim=1, keepdim=True).to(x.dtype)
    return torch.cat([mx, avg], dim=1)


def channel_scale(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """x · sigmoid(logits)[:, :, None, None]."""
    _checks.check_scale("channel_scale", x, logits, _checks.channel_scale_logits_shape(x))
    acc = _checks.acc_dtype(x.dtype)
    s = torch.sigmoid(logits.to(acc))[:, :, None, None]
    return (x.to(acc) * s).to(x.dtype)


def spatial_scale(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """x · sigmoid(logits), logits [N, 1, H, W]."""
    _checks.check_scale("spatial_scale", x, logits, _checks.spatial_scale_logits_shape(x))
    acc = _checks.acc_dtype(x.dtype)
    s = torch.sigmoid(logits.to(acc))
    return (x.to(acc) * s).to(x.dtype)


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int],
                     dilation: tuple[int, int]) -> torch.Tensor:
    """The convolution of each channel of x with its own filter (weight [C, 1, kh, kw], groups = C)."""
    return torch.nn.functional.conv2d(x, weight, None, stride, padding, dilation, x.shape[1])


def max_pool2d(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
               padding: tuple[int, int]) -> torch.Tensor:
    """The maximum of each kh×kw window (padding ignored)."""
    return torch.nn.functional.max_pool2d(x, kernel, stride, padding)


def avg_pool2d(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
               padding: tuple[int, int]) -> torch.Tensor:
    """The mean of the window elements inside the input (count_include_pad=False)."""
    return torch.nn.functional.avg_pool2d(x, kernel, stride, padding, count_include_pad=False)
