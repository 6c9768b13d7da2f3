"""The fused ops of fastnas, one function each, on a selectable backend.

Every op takes an optional ``backend=`` keyword (``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``,
or a backend added with :func:`register_backend`); without it the selection of :func:`set_backend` (or of a
``with backend(name):`` block) applies. Each op is defined in one module of :mod:`fastnas.ops.defs`, found there
automatically: its public functions are this package's, its references :mod:`fastnas.ops.reference`'s, and
:mod:`fastnas.ops.backend` declares what a backend provides.
"""
from __future__ import annotations

from . import defs
from .backend import (
    BACKEND_NAMES,
    BackendUnavailable,
    available_backends,
    backend,
    get_backend,
    implementation,  # noqa: F401  (the backend ops on a device use; for tests and tools)
    preload,
    register_backend,
    resolve_backend,
    set_backend,
)
from .defs.normalized_mixed_sum import fused_norms_unsupported
from .layout import prefers_channels_last
from . import reference

globals().update({name: op.function for name, op in defs.OPS.items()})

preload()

__all__ = ["BACKEND_NAMES", "BackendUnavailable", "available_backends", "backend", "fused_norms_unsupported",
           "get_backend", "prefers_channels_last", "reference", "register_backend", "resolve_backend", "set_backend",
           *sorted(defs.OPS)]


def __getattr__(name: str):
    """An op whose def module was found after this package was imported (see :func:`fastnas.ops.defs.discover`)."""
    op = defs.OPS.get(name)
    if op is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return op.function
