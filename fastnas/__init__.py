"""fastnas: differentiable architecture search with attention operations, on fused kernels."""
from . import ops

__version__ = "0.1.0"
