"""The output-layout rule of every backend (``csrc/common.h`` has the C++ copy), and the kernels' accumulation
dtype.

* An output shaped like an input is allocated like it (``empty_like``: a dense input's strides are kept, anything
  else becomes contiguous).
* An output of another shape (pools, gradients of pools, batch norms) is channels_last when the input
  :func:`prefers_channels_last`, else contiguous; ``spatial_pool``'s [N, 2, H, W] result is always channels_last (the
  (max, mean) pair of each position side by side, what the 7x7 convolution of a CBAM spatial gate runs fastest on).

The fakes (``register_fake``) and the reference kernels allocate through these functions, so that every backend's
results have the strides the fakes promise.
"""
from __future__ import annotations

from typing import Sequence

import torch


def prefers_channels_last(x: torch.Tensor) -> bool:
    """A 4-D tensor that is not NCHW-contiguous and whose channels are its innermost dimension (channels_last-
    contiguous, or a channel slice of such a tensor): its results keep channels_last (csrc/common.h agrees)."""
    if x.dim() != 4 or x.is_contiguous():
        return False
    if x.is_contiguous(memory_format=torch.channels_last):
        return True
    N, C, H, W = x.shape
    xs = x.stride(3)
    return x.stride(1) == 1 and xs > C and x.stride(2) == W * xs and (N <= 1 or x.stride(0) == H * W * xs)


def like(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An output shaped like ``x``, in ``x``'s layout."""
    return torch.empty_like(x, dtype=dtype)


def shaped(shape: Sequence[int], like: torch.Tensor, channels_last: bool,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """An output of ``shape``, channels_last or contiguous, allocated as the C++ kernels do (channels_last, then made
    contiguous unless ``channels_last``: size-1 dimensions get the same strides)."""
    t = torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=torch.channels_last)
    return t if channels_last else t.contiguous()


def stand_in(shape: Sequence[int], strides: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """An unfilled tensor of an input's shape and strides (``like``'s dtype and device), for a backward that reads
    only the input's shape and layout."""
    return torch.empty_strided(shape, strides, dtype=like.dtype, device=like.device)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the kernels: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
