"""The fused ops of fastnas, one function each, on a selectable backend.

Every op takes an optional ``backend=`` keyword (``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``);
without it the global selection applies (see :func:`backend`). The meaning of each op is its reference
implementation in :mod:`fastnas.ops.reference`.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import _checks, _depthwise, _gates, _pool2d, reference
from ._checks import prefers_channels_last
from ._normalized_sum import normalized_mixed_sum
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
    "avg_pool2d",
    "backend",
    "channel_attention",
    "channel_pool",
    "channel_scale",
    "cpu_kernel",
    "depthwise_conv2d",
    "fused_norms_apply",
    "get_backend",
    "max_pool2d",
    "mixed_sum",
    "normalized_mixed_sum",
    "prefers_channels_last",
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

    The ``cpu``, ``cuda`` and ``triton`` backends run it as one autograd node on their compiled operators (fewer
    passes over x; see :mod:`fastnas.ops._gates`); the reference composes its ``channel_pool`` and
    ``channel_scale``."""
    _gates.check_inputs(x, w1, b1, w2, b2)
    impl = implementation(_device_of(x), backend)
    fused = getattr(impl, "channel_attention", None)
    if fused is not None:
        return fused(x, w1, b1, w2, b2)
    return _gates.composite(impl.channel_pool, impl.channel_scale, x, w1, b1, w2, b2)


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, stride: int | tuple[int, int] = 1,
                     padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1, *,
                     backend: str | None = None) -> torch.Tensor:
    """The convolution of each channel of x [N, C, H, W] with its own filter (weight [C, 1, kh, kw]; groups = C, no
    bias): ``F.conv2d(x, weight, None, stride, padding, dilation, groups=C)``. The ``cpu`` backend computes its
    backward with fastnas's kernels (:mod:`fastnas.ops._depthwise`); the other backends are PyTorch's convolution."""
    _depthwise.check_inputs(x, weight)
    op = "depthwise_conv2d"
    args = (_checks.int_pair(op, "stride", stride, 1), _checks.int_pair(op, "padding", padding, 0),
            _checks.int_pair(op, "dilation", dilation, 1))
    return (cpu_kernel("depthwise_conv2d", x.device, backend) or reference.depthwise_conv2d)(x, weight, *args)


def cpu_kernel(name: str, device: torch.device | str, backend: str | None = None):
    """The ``cpu`` backend's function ``name`` (``depthwise_conv2d``, ``single_channel_conv2d``, ``batch_norm_train``,
    ``batch_norm_backward``, ``batch_norm_affine_train``, ``batch_norm_affine_backward``, ``normalized_mixed_sum``:
    kernels beyond the five ops, which the network's modules use) when tensors on ``device`` run on the ``cpu``
    backend under the selection ``backend``; None otherwise (the modules then use PyTorch's own)."""
    device = torch.device(device)
    if device.type != "cpu" or resolve_backend(device, backend) != "cpu":
        return None
    return getattr(implementation(device, backend), name)


def fused_norms_apply(like: torch.Tensor) -> bool:
    """Whether :func:`normalized_mixed_sum` runs on tensors like ``like``: the ``cpu`` backend's kernel, eager with
    gradients, channels_last float32/float64 without autocast."""
    return (torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and like.dtype in (torch.float32, torch.float64) and prefers_channels_last(like)
            and not torch.is_autocast_enabled(like.device.type)
            and cpu_kernel("normalized_mixed_sum", like.device) is not None)


def max_pool2d(x: torch.Tensor, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] | None = None,
               padding: int | tuple[int, int] = 0, *, backend: str | None = None) -> torch.Tensor:
    """``F.max_pool2d(x, kernel_size, stride, padding)`` (no dilation, floor mode). The ``cpu`` backend runs its own
    kernels (:mod:`fastnas.ops._pool2d`); the other backends are PyTorch's pooling."""
    return _pool("max_pool2d", x, kernel_size, stride, padding, backend)


def avg_pool2d(x: torch.Tensor, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] | None = None,
               padding: int | tuple[int, int] = 0, *, backend: str | None = None) -> torch.Tensor:
    """``F.avg_pool2d(x, kernel_size, stride, padding, count_include_pad=False)``: each output averages the window
    elements inside the input (DARTS's average pooling). The ``cpu`` backend runs its own kernels; the other backends
    are PyTorch's pooling."""
    return _pool("avg_pool2d", x, kernel_size, stride, padding, backend)


def _pool(op: str, x: torch.Tensor, kernel_size, stride, padding, backend: str | None) -> torch.Tensor:
    """``op`` (max_pool2d or avg_pool2d) of the selected backend, or the reference where it has none."""
    kernel, stride, padding = _pool2d.pool_args(op, kernel_size, stride, padding)
    _pool2d.check_input(op, x, kernel, padding)
    impl = implementation(_device_of(x), backend)
    return getattr(impl, op, getattr(reference, op))(x, kernel, stride, padding)
