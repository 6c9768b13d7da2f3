"""Input validation shared by the Python-side backends.

The messages match the C++ checks: they name the op, the argument and what was expected.
Shape and value problems raise ``ValueError``, dtype problems ``TypeError`` (as ``TORCH_CHECK_VALUE`` /
``TORCH_CHECK_TYPE`` do in C++).
"""
from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_float(op: str, arg: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastnas.{op}: {arg} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"fastnas.{op}: {arg} has dtype {t.dtype}, expected one of float32, float64, bfloat16, float16"
        )


def prefers_channels_last(x: torch.Tensor) -> bool:
    """The layout rule of every backend (csrc/common.h has the same): a 4-D tensor that is channels_last-contiguous
    and not NCHW-contiguous keeps channels_last in the results and gradients shaped like it."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def check_4d(op: str, arg: str, t: torch.Tensor) -> None:
    check_float(op, arg, t)
    if t.dim() != 4:
        raise ValueError(f"fastnas.{op}: {arg} must be 4-D [N, C, H, W], got shape {list(t.shape)}")


def check_same_device(op: str, arg: str, t: torch.Tensor, ref_arg: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"fastnas.{op}: {arg} is on {t.device}, expected {ref.device} (the device of {ref_arg})")


def check_mixed_sum(xs: Sequence[torch.Tensor], weights: torch.Tensor) -> None:
    op = "mixed_sum"
    if len(xs) == 0:
        raise ValueError(f"fastnas.{op}: xs must hold at least one tensor")
    check_float(op, "xs[0]", xs[0])
    x0 = xs[0]
    for k, x in enumerate(xs[1:], start=1):
        check_float(op, f"xs[{k}]", x)
        if x.shape != x0.shape:
            raise ValueError(f"fastnas.{op}: xs[{k}] has shape {list(x.shape)}, expected {list(x0.shape)} (the shape of xs[0])")
        if x.dtype != x0.dtype:
            raise TypeError(f"fastnas.{op}: xs[{k}] has dtype {x.dtype}, expected {x0.dtype} (the dtype of xs[0])")
        check_same_device(op, f"xs[{k}]", x, "xs[0]", x0)
    check_float(op, "weights", weights)
    if weights.dim() != 1 or weights.shape[0] != len(xs):
        raise ValueError(f"fastnas.{op}: weights must have shape [{len(xs)}] (one per input), got {list(weights.shape)}")
    check_same_device(op, "weights", weights, "xs[0]", x0)


def check_scale(op: str, x: torch.Tensor, logits: torch.Tensor, expected: list[int]) -> None:
    check_4d(op, "x", x)
    check_float(op, "logits", logits)
    if list(logits.shape) != expected:
        raise ValueError(f"fastnas.{op}: logits must have shape {expected} for x of shape {list(x.shape)}, got {list(logits.shape)}")
    check_same_device(op, "logits", logits, "x", x)


def channel_scale_logits_shape(x: torch.Tensor) -> list[int]:
    return [x.shape[0], x.shape[1]]


def spatial_scale_logits_shape(x: torch.Tensor) -> list[int]:
    return [x.shape[0], 1, x.shape[2], x.shape[3]]


def empty_in_layout(shape, like: torch.Tensor, channels_last: bool, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An empty tensor allocated as the C++ kernels allocate their channels_last results: channels_last, then made
    contiguous unless ``channels_last`` (the fake kernels must reproduce the strides exactly, size-1 dims included)."""
    t = torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=torch.channels_last)
    return t if channels_last else t.contiguous()


def int_pair(op: str, name: str, v, minimum: int) -> tuple[int, int]:
    """``v`` (an int or two ints) as two ints ≥ ``minimum``; a ValueError naming the op and argument otherwise."""
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or not all(isinstance(i, int) and i >= minimum for i in t):
        raise ValueError(f"fastnas.{op}: {name} must be an int or two ints >= {minimum}, got {v!r}")
    return t  # type: ignore[return-value]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the kernels: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def stand_in(shape, strides, like: torch.Tensor) -> torch.Tensor:
    """An unfilled tensor of an input's shape and strides in ``like``'s dtype and device, for a backward kernel that
    reads only the input's shape and layout (its values are never read)."""
    return torch.empty_strided(shape, strides, dtype=like.dtype, device=like.device)
