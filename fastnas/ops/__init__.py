"""The fused ops of fastnas, one function each, on a selectable backend.

Every op takes an optional ``backend=`` keyword (``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``,
or a backend added with :func:`register_backend`); without it the global selection applies (see :func:`backend`).
Each op is defined in one module of :mod:`fastnas.ops.defs`; its meaning is its reference in
:mod:`fastnas.ops.reference`, and :mod:`fastnas.ops.backend` declares what a backend provides.
"""
from __future__ import annotations

import torch

from .backend import (
    BACKEND_NAMES,
    BackendUnavailable,
    available_backends,
    backend,
    get_backend,
    implementation,
    preload,
    register_backend,
    resolve_backend,
    set_backend,
)
from .defs.batch_norm import batch_norm
from .defs.channel_attention import channel_attention
from .defs.channel_pool import channel_pool
from .defs.depthwise_conv2d import depthwise_conv2d
from .defs.mixed_sum import mixed_sum
from .defs.normalized_mixed_sum import fused_norms_apply, fused_norms_unsupported, normalized_mixed_sum
from .defs.pool2d import avg_pool2d, max_pool2d
from .defs.scale import channel_scale, spatial_scale
from .defs.single_channel_conv2d import single_channel_conv2d
from .defs.spatial_pool import spatial_pool
from .layout import prefers_channels_last
from . import reference  # noqa: E402  (after the backend registry it builds on)

preload()

__all__ = [
    "BACKEND_NAMES",
    "BackendUnavailable",
    "available_backends",
    "avg_pool2d",
    "backend",
    "batch_norm",
    "channel_attention",
    "channel_pool",
    "channel_scale",
    "cpu_kernel",
    "depthwise_conv2d",
    "fused_norms_apply",
    "fused_norms_unsupported",
    "get_backend",
    "max_pool2d",
    "mixed_sum",
    "normalized_mixed_sum",
    "prefers_channels_last",
    "reference",
    "register_backend",
    "resolve_backend",
    "set_backend",
    "single_channel_conv2d",
    "spatial_pool",
    "spatial_scale",
]


def cpu_kernel(name: str, device: torch.device | str, backend: str | None = None):
    """The ``cpu`` backend's kernel ``name`` (an operator of the backend interface, e.g. ``batch_norm_train``) when
    tensors on ``device`` run on the ``cpu`` backend under the selection ``backend``; None otherwise. Kept for
    callers outside the library: the library's modules call the ops, which pick their kernels themselves."""
    device = torch.device(device)
    if device.type != "cpu" or resolve_backend(device, backend) != "cpu":
        return None
    return implementation(device, backend).kernels.get(name)
