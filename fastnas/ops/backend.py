"""Backends: the declared kernel interface, the registry, and the selection.

A backend is a named table of kernels (torch operators with the schemas of :func:`kernel_specs`, which the def
modules declare) and the device types it runs on. Every op is defined once (:mod:`fastnas.ops.defs`) over that
table:

* **required** kernels (``mixed_sum``, the pools, the scales, each with its backward): a backend must provide all of
  them, or none (then every op runs its plain-PyTorch reference composition: the ``reference`` backend);
  :func:`register_backend` refuses a partial set, naming what is missing;
* **optional** kernels (the whole channel gate, 2-D pooling, the depthwise weight gradient, the single-channel
  convolution, batch norms, the fused node sum): where one is missing, the op that would use it runs its reference
  composition (or, for the gate, composes the backend's required kernels).

Registering a backend registers each kernel's fake (``register_fake``) and each forward kernel's autograd, once per
operator, from the op's module. The selection is global (``set_backend``), scoped (``with backend(name):``) or per
call (``backend=``); ``auto`` picks per device: ``cpu`` then ``reference`` on the CPU; on a GPU ``triton`` (tested
under the interpreter and compiled ahead of time for sm_90), then ``cuda`` (not yet verified on a GPU), then
``reference``.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch

from .opdef import register_autograd, register_fake

BACKEND_NAMES = ("auto", "reference", "cpu", "cuda", "triton")

# the built-in backends and the module whose import registers them (loaded lazily, once)
_BUILTIN = {"cpu": "fastnas.ops.backends.cpp", "cuda": "fastnas.ops.backends.cpp",
            "triton": "fastnas.ops.backends.triton"}
_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}
CUDA_NOT_VERIFIED = "available, not yet verified on a GPU; auto prefers triton"


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says why."""


@dataclass(frozen=True)
class Backend:
    """A registered backend: its name, its kernels by name, and the device types it runs on."""

    name: str
    kernels: Mapping[str, Callable]
    runs_on: Callable[[str], bool]


_registry: dict[str, Backend] = {}
_load_errors: dict[str, str] = {}
_selected: dict[tuple[str, str], Backend] = {}  # (device type, selection) -> backend: the per-call look-up
_current = "auto"


_specs: dict = {}  # kernel name -> its Kernel (schema, reference, required), declared by the def modules
_autograd: dict = {}  # forward kernel name -> factory(kernels) -> (backward, setup_context)


def declare(kernels: Mapping, autograd: Mapping[str, Callable]) -> None:
    """Add kernels to the interface (the def modules' ``KERNELS``, with the autograd factories of their forward
    kernels: ``AUTOGRAD``); :mod:`fastnas.ops.defs` declares each module it finds."""
    _specs.update(kernels)
    _autograd.update(autograd)


def kernel_specs() -> dict:
    """Every kernel of the interface by name: its :class:`fastnas.ops.opdef.Kernel` (schema, reference,
    whether required)."""
    return dict(_specs)


def required_kernels() -> frozenset[str]:
    return frozenset(name for name, spec in kernel_specs().items() if spec.required)


def _as_overload(op):
    """A torch operator as the overload to call (the packet's ``default``; a custom op's own overload)."""
    if isinstance(op, torch._ops.OpOverloadPacket):
        return op.default
    return getattr(op, "_opoverload", op)


def register_backend(name: str, kernels: Mapping[str, Callable], devices: Iterable[str] | Callable[[str], bool],
                     ) -> Backend:
    """Register backend ``name``: ``kernels`` maps kernel names to torch operators with the interface's schemas
    (all required ones, or none); ``devices``: the device types it runs on (or a predicate on the type). Registers
    the fakes and autograd of the kernels' operators. A ValueError names missing or unknown kernels."""
    unknown = sorted(set(kernels) - set(_specs))
    missing = sorted(required_kernels() - set(kernels)) if kernels else []
    if unknown or missing:
        raise ValueError(f"fastnas backend {name!r}: " + "; ".join(
            part for part in (f"missing required kernels {missing}" if missing else "",
                              f"unknown kernels {unknown}" if unknown else "") if part))
    table = {k: _as_overload(op) for k, op in kernels.items()}
    _register_operators(table)
    runs_on = devices if callable(devices) else frozenset(devices).__contains__
    backend = _registry[name] = Backend(name, table, runs_on)
    _load_errors.pop(name, None)
    _selected.clear()
    return backend


def _register_operators(table: Mapping[str, Callable]) -> None:
    for name, op in table.items():
        register_fake(op, _specs[name].reference)
        if name in _autograd:
            register_autograd(op, *_autograd[name](table))


def mark_unavailable(name: str, why: str) -> None:
    """Record why built-in backend ``name`` cannot run here (``available_backends`` reports it)."""
    _load_errors[name] = why


def get(name: str) -> Backend:
    """The registered backend ``name`` (loading a built-in one on first use)."""
    backend = _registry.get(name)
    return backend if backend is not None else _load(name)


def _load(name: str) -> Backend | None:
    if name in _registry or name in _load_errors or name not in _BUILTIN:
        return _registry.get(name)
    try:
        importlib.import_module(_BUILTIN[name])
    except Exception as exc:  # an optional backend must never break `import fastnas`
        _load_errors[name] = f"{type(exc).__name__}: {exc}"
    if name not in _registry:
        _load_errors.setdefault(name, "not registered")
    return _registry.get(name)


def _names() -> tuple[str, ...]:
    return BACKEND_NAMES + tuple(n for n in _registry if n not in BACKEND_NAMES)


def _validate_name(name: str) -> str:
    if name not in BACKEND_NAMES and name not in _registry:
        raise ValueError(f"unknown fastnas backend {name!r}; choose one of {', '.join(_names())}")
    return name


def available_backends() -> dict[str, str]:
    """Each concrete backend and ``"available"`` (with a caveat where one applies) or the reason it is not."""
    out = {}
    for name in _names()[1:]:
        out[name] = "available" if get(name) is not None else f"unavailable: {_load_errors.get(name)}"
    if out["cuda"] == "available":
        out["cuda"] = CUDA_NOT_VERIFIED if torch.cuda.is_available() else "compiled, but no CUDA device is present"
    return out


def get_backend() -> str:
    """The backend name currently selected (may be ``"auto"``)."""
    return _current


def set_backend(name: str) -> None:
    """Select the backend globally (``"auto"`` by default)."""
    global _current
    _current = _validate_name(name)
    if name != "auto":
        get(name)  # import now, outside any code that torch.compile traces


def preload() -> None:
    """Load the backends that ``auto`` can pick on this machine, so that tracing never meets an import."""
    for name in ("cpu",) + (("triton", "cuda") if torch.cuda.is_available() else ()):
        get(name)


class backend:
    """Select a backend for a block or a function (``set_backend`` selects globally): on entering, and back to
    the previous selection on leaving.

    >>> with fastnas.ops.backend("reference"):  # only inside the block
    ...     y = fastnas.ops.mixed_sum(xs, w)
    >>> @fastnas.ops.backend("reference")      # only while the function runs
    ... def f(): ...
    """

    def __init__(self, name: str) -> None:
        self.name = _validate_name(name)
        self._previous: list[str] = []

    def __enter__(self) -> "backend":
        self._previous.append(_current)
        set_backend(self.name)
        return self

    def __exit__(self, *exc: object) -> None:
        set_backend(self._previous.pop())

    def __call__(self, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with backend(self.name):
                return fn(*args, **kwargs)
        return wrapper

    def __repr__(self) -> str:
        return f"fastnas.ops.backend({self.name!r})"


def resolve_backend(device: torch.device | str = "cpu", name: str | None = None) -> str:
    """The concrete backend that ops on ``device`` use under ``name`` (default: the current selection)."""
    name = _validate_name(name or _current)
    dev = torch.device(device).type
    if name == "auto":
        for candidate in _AUTO_ORDER.get(dev, ("reference",)):
            found = get(candidate)
            if found is not None and found.runs_on(dev):
                return candidate
        return "reference"
    found = get(name)
    if found is None:
        raise BackendUnavailable(f"fastnas backend {name!r} is unavailable: {_load_errors.get(name)}")
    if not found.runs_on(dev):
        hint = " (set TRITON_INTERPRET=1 before importing triton to run it on the CPU)" if name == "triton" else ""
        raise BackendUnavailable(f"fastnas backend {name!r} cannot run tensors on {dev}{hint}")
    return name


def select(device_type: str, name: str | None = None) -> Backend:
    """The backend that ops on ``device_type`` use under ``name`` (default: the current selection); one dict
    look-up per call once resolved."""
    key = (device_type, name or _current)
    found = _selected.get(key)
    if found is None:
        found = _selected[key] = _registry[resolve_backend(device_type, key[1])]
    return found


def implementation(device: torch.device | str, name: str | None = None) -> Backend:
    """The backend ops on ``device`` use under ``name``."""
    return select(torch.device(device).type, name)


def define_kernels(namespace: str, impls: Mapping[str, Callable]) -> dict[str, Callable]:
    """Torch custom operators ``namespace::<kernel>`` with the interface's schemas, from Python functions (a
    backend written in Python or Triton registers these)."""
    return {name: torch.library.custom_op(f"{namespace}::{name}", fn, mutates_args=(), schema=_specs[name].schema)
            for name, fn in impls.items()}


register_backend("reference", {}, lambda device_type: True)
