"""Plain-PyTorch references: they define what every op and every kernel means.

Autograd of these functions is PyTorch's own. Half-precision inputs are accumulated in float32 and the results cast
back to the input's dtype, as the kernels do. :data:`KERNELS` holds the reference of every kernel of the backend
interface by name (canonical results and layouts; a backend written from them is the toy backend of the tests).
"""
from __future__ import annotations

from .defs.batch_norm import reference as batch_norm
from .defs.channel_attention import reference as channel_attention
from .defs.channel_pool import reference as channel_pool
from .defs.depthwise_conv2d import reference as depthwise_conv2d
from .defs.mixed_sum import reference as mixed_sum
from .defs.normalized_mixed_sum import reference as normalized_mixed_sum
from .defs.pool2d import reference_avg_pool2d as avg_pool2d
from .defs.pool2d import reference_max_pool2d as max_pool2d
from .defs.scale import reference_channel_scale as channel_scale
from .defs.scale import reference_spatial_scale as spatial_scale
from .defs.single_channel_conv2d import reference as single_channel_conv2d
from .defs.spatial_pool import reference as spatial_pool
from .backend import kernel_specs

KERNELS = {name: spec.reference for name, spec in kernel_specs().items()}

__all__ = ["KERNELS", "avg_pool2d", "batch_norm", "channel_attention", "channel_pool", "channel_scale",
           "depthwise_conv2d", "max_pool2d", "mixed_sum", "normalized_mixed_sum", "single_channel_conv2d",
           "spatial_pool", "spatial_scale"]
