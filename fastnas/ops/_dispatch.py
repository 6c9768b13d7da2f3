"""Backend selection for the fused ops.

A backend is a module exposing the five ops of the contract. ``reference`` is always there; ``cpu`` and ``cuda`` come
from the compiled library ``fastnas._C``; ``triton`` from ``fastnas.kernels``. ``auto`` picks, per device, the fastest
backend that is available. The choice is global (``set_backend``), scoped (``with backend(name):``) or per call
(``backend=`` keyword of every op), and it is always observable (``get_backend``, ``resolve_backend``,
``available_backends``).
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Callable

import torch

BACKEND_NAMES = ("auto", "reference", "cpu", "cuda", "triton")

# backend name -> module path that implements it (loaded lazily, once)
_MODULES = {
    "reference": "fastnas.ops.reference",
    "cpu": "fastnas.ops._cpp",
    "cuda": "fastnas.ops._cpp",
    "triton": "fastnas.ops._triton",
}
# which devices each concrete backend runs on (the Triton backend runs CPU tensors through the interpreter only)
_DEVICES: dict[str, Callable[[str], bool]] = {
    "reference": lambda dev: True,
    "cpu": lambda dev: dev == "cpu",
    "cuda": lambda dev: dev == "cuda",
    "triton": lambda dev: dev == "cuda" or (dev == "cpu" and _triton_interpreted()),
}
# auto: preference order per device type
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}

_loaded: dict[str, ModuleType] = {}
_load_errors: dict[str, str] = {}
_current = "auto"


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says why."""


def _triton_interpreted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _load(name: str) -> ModuleType | None:
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors:
        return None
    try:
        module = importlib.import_module(_MODULES[name])
        check = getattr(module, "backend_available", None)
        if check is not None:
            ok, why = check(name)
            if not ok:
                _load_errors[name] = why
                return None
    except Exception as exc:  # an optional backend must never break `import fastnas`
        _load_errors[name] = f"{type(exc).__name__}: {exc}"
        return None
    _loaded[name] = module
    return module


def _validate_name(name: str) -> str:
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown fastnas backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    return name


def available_backends() -> dict[str, str]:
    """Each concrete backend and either ``"available"`` or the reason it is not."""
    out = {}
    for name in BACKEND_NAMES[1:]:
        out[name] = "available" if _load(name) is not None else f"unavailable: {_load_errors.get(name)}"
    if out["cuda"] == "available" and not torch.cuda.is_available():
        out["cuda"] = "compiled, but no CUDA device is present"
    return out


def get_backend() -> str:
    """The backend name currently selected (may be ``"auto"``)."""
    return _current


def set_backend(name: str) -> None:
    """Select the backend globally (``"auto"`` by default)."""
    global _current
    _current = _validate_name(name)
    if name != "auto":
        _load(name)  # import now, outside any code that torch.compile traces


def preload() -> None:
    """Import the backends that ``auto`` can pick on this machine, so that tracing never meets an import."""
    for name in ("reference", "cpu") + (("cuda", "triton") if torch.cuda.is_available() else ()):
        _load(name)


class backend:
    """Select a backend: immediately when called, and back to the previous one when used as a context manager
    or as a decorator (like ``torch.set_grad_enabled``).

    >>> fastnas.ops.backend("cpu")            # global from now on
    >>> with fastnas.ops.backend("reference"):  # only inside the block
    ...     y = fastnas.ops.mixed_sum(xs, w)
    >>> @fastnas.ops.backend("reference")      # only while the function runs
    ... def f(): ...
    """

    def __init__(self, name: str) -> None:
        self.previous = _current
        set_backend(name)
        self.name = name

    def __enter__(self) -> "backend":
        return self

    def __exit__(self, *exc: object) -> None:
        set_backend(self.previous)

    def __call__(self, fn: Callable) -> Callable:
        import functools

        set_backend(self.previous)  # decorating selects nothing by itself

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
            if _DEVICES[candidate](dev) and _load(candidate) is not None:
                return candidate
        return "reference"
    if not _DEVICES[name](dev):
        hint = " (set TRITON_INTERPRET=1 before importing triton to run it on the CPU)" if name == "triton" else ""
        raise BackendUnavailable(f"fastnas backend {name!r} cannot run tensors on {dev}{hint}")
    if _load(name) is None:
        raise BackendUnavailable(f"fastnas backend {name!r} is unavailable: {_load_errors.get(name)}")
    return name


def implementation(device: torch.device, name: str | None = None) -> ModuleType:
    """The module implementing the ops for ``device`` under backend ``name``."""
    return _loaded[resolve_backend(device, name)]
