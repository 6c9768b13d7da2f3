"""The ops, one module each (or one per small family), found here automatically: every module of this package
whose name does not start with ``_``. A module declares its public ops (``OPS``: name ->
:class:`~fastnas.ops.opdef.Op`), the kernels of the backend interface it uses (``KERNELS``), the autograd of its
forward kernels (``AUTOGRAD``) and the inputs the shared test suite runs it on (``sample_inputs(device, dtype,
shape)``)."""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from .. import backend
from ..opdef import Op

_modules: dict[str, ModuleType] = {}
OPS: dict[str, Op] = {}  # every public op by name


def discover() -> list[ModuleType]:
    """Import the def modules on this package's path that are not imported yet and declare their kernels and
    ops; returns them."""
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name in _modules:
            continue
        module = _modules[info.name] = importlib.import_module(f"{__name__}.{info.name}")
        backend.declare(getattr(module, "KERNELS", {}), getattr(module, "AUTOGRAD", {}))
        OPS.update(getattr(module, "OPS", {}))
        found.append(module)
    return found


def modules() -> tuple[ModuleType, ...]:
    """The def modules found so far."""
    return tuple(_modules.values())


discover()
