"""Plain-PyTorch references: they define what every op and every kernel means.

Autograd of these functions is PyTorch's own. Half-precision inputs are accumulated in float32 and the results cast
back to the input's dtype, as the kernels do. Each op's reference is this module's function of the op's name (taken
from its def module); :data:`KERNELS` holds the reference of every kernel of the backend interface by name (canonical
results and layouts; a backend written from them is the toy backend of the tests).
"""
from __future__ import annotations

from . import defs
from .backend import kernel_specs

globals().update({name: op.reference for name, op in defs.OPS.items()})
KERNELS = {name: spec.reference for name, spec in kernel_specs().items()}

__all__ = ["KERNELS", *sorted(defs.OPS)]


def __getattr__(name: str):
    """The reference of an op found after this module was imported."""
    op = defs.OPS.get(name)
    if op is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return op.reference
