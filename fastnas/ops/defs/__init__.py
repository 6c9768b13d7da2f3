"""The ops, one module each (or one per small family): public function, plain-PyTorch reference, argument checks,
the kernels of the backend interface (schema, reference, required or optional; the reference also serves as the
fake), and the autograd shared by every backend's forward kernel."""
from . import (batch_norm, channel_attention, channel_pool, depthwise_conv2d, mixed_sum, normalized_mixed_sum, pool2d,
               scale, single_channel_conv2d, spatial_pool)

MODULES = (mixed_sum, channel_pool, spatial_pool, scale, channel_attention, pool2d, depthwise_conv2d,
           single_channel_conv2d, batch_norm, normalized_mixed_sum)
