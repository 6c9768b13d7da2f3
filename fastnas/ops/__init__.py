"""The fused ops of fastnas, one function each, on a selectable backend.

Every op takes an optional ``backend=`` keyword (``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``);
without it the global selection applies (see :func:`backend`). The meaning of each op is its reference
implementation in :mod:`fastnas.ops.reference`.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import _gates, reference
from ._dispatch import (
    BACKEND_NAMES,
    BackendUnavailable,
    available_backends,
    backend,
    get_backend,
    implementation,
    preload,
    resolve_backend,
    set_backend,
)

preload()

__all__ = [
    "BACKEND_NAMES",
    "BackendUnavailable",
    "available_backends",
    "backend",
    "channel_attention",
    "channel_pool",
    "channel_scale",
    "get_backend",
    "mixed_sum",
    "reference",
    "resolve_backend",
    "set_backend",
    "spatial_pool",
    "spatial_scale",
]


def _device_of(t: object) -> torch.device:
    return t.device if isinstance(t, torch.Tensor) else torch.device("cpu")


def mixed_sum(xs: Sequence[torch.Tensor], weights: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Σ_k weights[k] · xs[k]; ``xs`` share shape, dtype and device, ``weights`` is [K] (may be fp32 beside half xs)."""
    if not isinstance(xs, (list, tuple)):
        raise TypeError(f"fastnas.mixed_sum: xs must be a list or tuple of tensors, got {type(xs).__name__}")
    return implementation(_device_of(xs[0] if len(xs) else None), backend).mixed_sum(list(xs), weights)


def channel_pool(x: torch.Tensor, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, max) over H×W of x [N, C, H, W], each [N, C]."""
    return implementation(_device_of(x), backend).channel_pool(x)


def channel_scale(x: torch.Tensor, logits: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """x · sigmoid(logits)[:, :, None, None] with logits [N, C]."""
    return implementation(_device_of(x), backend).channel_scale(x, logits)


def spatial_pool(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """[N, 2, H, W]: max over C in channel 0, mean over C in channel 1."""
    return implementation(_device_of(x), backend).spatial_pool(x)


def spatial_scale(x: torch.Tensor, logits: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """x · sigmoid(logits) with logits [N, 1, H, W]."""
    return implementation(_device_of(x), backend).spatial_scale(x, logits)


def channel_attention(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                      b2: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """The whole CBAM channel gate: x · σ(MLP(mean_hw x) + MLP(max_hw x))[:, :, None, None] with the shared
    MLP(p) = relu(p w1ᵀ + b1) w2ᵀ + b2 (w1 [hidden, C], w2 [C, hidden]; biases may be None).

    The ``cpu`` and ``cuda`` backends run it as one autograd node on their compiled operators (fewer passes over x
    in the backward; see :mod:`fastnas.ops._gates`); the others compose their ``channel_pool`` and
    ``channel_scale``."""
    _gates.check_inputs(x, w1, b1, w2, b2)
    impl = implementation(_device_of(x), backend)
    fused = getattr(impl, "channel_attention", None)
    if fused is not None:
        return fused(x, w1, b1, w2, b2)
    return _gates.composite(impl.channel_pool, impl.channel_scale, x, w1, b1, w2, b2)
