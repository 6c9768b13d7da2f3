"""The ``cpu`` and ``cuda`` backends: the compiled operators of ``fastnas._C`` (``torch.ops.fastnas.*``).

The kernels are C++ (``csrc/``); their schemas are defined here, once, from the def modules' ``Kernel(schema)``
before the library is loaded (it registers implementations only); fakes and autograd come from the op modules
through :func:`fastnas.ops.backend.register_backend`. ``cpu`` has every kernel of the interface; ``cuda`` the
required ones (the optional kernels are CPU code). If the library was not built (or fails to load) this module still
imports and records why both backends are missing; ``auto`` then falls back to the ``reference`` backend.
"""
from __future__ import annotations

import torch

from .. import defs  # noqa: F401  (every kernel declared before the schemas are defined)
from ..backend import kernel_specs, mark_unavailable, register_backend, required_kernels
from ..opdef import library

NAMESPACE = "fastnas"
_LOAD_ERROR: str | None = None


def define_schemas() -> None:
    """Define ``fastnas::<kernel>`` for every kernel of the interface not defined yet, with its declared schema."""
    lib = library(NAMESPACE)
    for name, spec in kernel_specs().items():
        if not hasattr(torch.ops.fastnas, name):
            lib.define(name + spec.schema)


def _loaded_elsewhere() -> bool:
    """The kernels may already be in this process, from the CMake build loaded with torch.ops.load_library:
    loading fastnas._C as well would define its build facts twice (a fatal error in the dispatcher)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::mixed_sum", "CPU")


define_schemas()
try:
    if not _loaded_elsewhere():
        from fastnas import _C  # noqa: F401  (loading the library registers the kernels)
except ImportError as exc:  # not built, or built against another torch
    _LOAD_ERROR = (f"the compiled library fastnas._C is not available ({exc}); "
                   "build it with `pip install --no-build-isolation -e .`")

custom_ops: dict = {}


def compiled_with_cuda() -> bool:
    return _LOAD_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key("fastnas::mixed_sum", "CUDA")


def backend_available(name: str) -> tuple[bool, str]:
    """``cpu``: the library is loaded; ``cuda``: it was also compiled with the CUDA kernels."""
    if _LOAD_ERROR is not None:
        return False, _LOAD_ERROR
    if name == "cuda" and not compiled_with_cuda():
        return False, "fastnas._C was built without CUDA kernels (rebuild with a CUDA toolkit or FASTNAS_CUDA=1)"
    return True, "available"


def cuda_arch_list() -> list[int]:
    """The CUDA architectures compiled into the library (e.g. [800, 900]); empty without CUDA."""
    return [] if _LOAD_ERROR is not None else list(torch.ops.fastnas.cuda_arch_list())


def cpu_capability() -> str:
    """Which CPU kernels are in use: "avx2" or "default" (the portable ones; FASTNAS_CPU_CAPABILITY=default forces
    them); empty without the library."""
    return "" if _LOAD_ERROR is not None else str(torch.ops.fastnas.cpu_capability())


if _LOAD_ERROR is None:
    custom_ops = {name: getattr(torch.ops.fastnas, name) for name in kernel_specs()}
    register_backend("cpu", custom_ops, ("cpu",))
    if compiled_with_cuda():
        register_backend("cuda", {name: custom_ops[name] for name in required_kernels()}, ("cuda",))
for _name in ("cpu", "cuda"):
    ok, why = backend_available(_name)
    if not ok:
        mark_unavailable(_name, why)
