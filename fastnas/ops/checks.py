"""Argument checks shared by the ops: each error names the op and the argument.

Shape and value problems raise ``ValueError``, type and dtype problems ``TypeError`` (as ``TORCH_CHECK_VALUE`` /
``TORCH_CHECK_TYPE`` do in the C++ kernels, whose messages match).
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_float(op: str, arg: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastnas.{op}: {arg} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"fastnas.{op}: {arg} has dtype {t.dtype}, expected one of float32, float64, bfloat16, float16")


def check_4d(op: str, arg: str, t: object) -> None:
    check_float(op, arg, t)
    if t.dim() != 4:
        raise ValueError(f"fastnas.{op}: {arg} must be 4-D [N, C, H, W], got shape {list(t.shape)}")


def check_same_device(op: str, arg: str, t: torch.Tensor, ref_arg: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"fastnas.{op}: {arg} is on {t.device}, expected {ref.device} (the device of {ref_arg})")


def check_tensor_list(op: str, arg: str, ts: object) -> None:
    """A list or tuple of tensors (a clear error naming the first element that is not one)."""
    if not isinstance(ts, (list, tuple)):
        raise TypeError(f"fastnas.{op}: {arg} must be a list or tuple of tensors, got {type(ts).__name__}")
    for k, t in enumerate(ts):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fastnas.{op}: {arg}[{k}] must be a Tensor, got {type(t).__name__}")


def int_pair(op: str, name: str, v: object, minimum: int) -> tuple[int, int]:
    """``v`` (an int or two ints) as two ints >= ``minimum``; a ValueError naming the op and argument otherwise."""
    if type(v) is tuple and len(v) == 2 and type(v[0]) is int is type(v[1]) and min(v) >= minimum:
        return v  # the common case, checked cheaply: it runs on every convolution of a step
    t = (v, v) if isinstance(v, int) else tuple(v) if isinstance(v, (tuple, list)) else None
    if t is None or len(t) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) and i >= minimum
                                           for i in t):
        raise ValueError(f"fastnas.{op}: {name} must be an int or two ints >= {minimum}, got {v!r}")
    return t  # type: ignore[return-value]


def check_number(op: str, name: str, v: object, minimum: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or (minimum is not None and v < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"fastnas.{op}: {name} must be a number{bound}, got {v!r}")
    return float(v)
