"""What a def module declares (its kernels, its public ops and their sample inputs), and the registration of custom
operators, fakes and autograd, once per operator."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch._library import autograd as _library_autograd

OP_NAMESPACE = "fastnas_ops"  # the ops' own custom operators (a backend's kernels live in its namespace)


@dataclass(frozen=True)
class Kernel:
    """A kernel of the backend interface: its schema (the one definition: the compiled library registers only
    implementations of it), its plain-PyTorch reference (the canonical results, layouts included; differentiable,
    so it also serves double backward and as the fake), and whether every backend must provide it."""

    schema: str
    reference: Callable
    required: bool = False


@dataclass(frozen=True)
class Op:
    """A public op: ``function`` is ``fastnas.ops.<name>``, ``reference`` (``fastnas.ops.reference.<name>``) its
    meaning in plain PyTorch, without the ``backend=`` keyword."""

    function: Callable
    reference: Callable


@dataclass(frozen=True)
class Sample:
    """Inputs on which the shared test suite runs an op: ``call(backend, *inputs)`` (the inputs are differentiated
    and compared with the float64 reference); ``amp``: also run in bfloat16 and float16."""

    name: str
    inputs: Sequence[torch.Tensor]
    call: Callable
    amp: bool = False


_registered: set[tuple[str, str]] = set()
_libraries: dict[str, torch.library.Library] = {}


def library(namespace: str) -> torch.library.Library:
    """This package's fragment of the operator namespace ``namespace``."""
    lib = _libraries.get(namespace)
    if lib is None:
        lib = _libraries[namespace] = torch.library.Library(namespace, "FRAGMENT")
    return lib


def qualname(op) -> str:
    return op._schema.name


def register_fake(op, fn: Callable) -> None:
    """``fn`` as the fake of ``op`` (once per operator: the cpu and cuda backends share theirs)."""
    key = (qualname(op), "fake")
    if key not in _registered:
        torch.library.register_fake(op, fn)
        _registered.add(key)


def register_autograd(op, backward: Callable, setup_context: Callable) -> None:
    """``torch.library.register_autograd``, once per operator, for mutable schemas too: torch's function refuses
    them, though the autograd kernel it builds serves them unchanged where the mutated inputs (running statistics)
    never need a gradient."""
    key = (qualname(op), "autograd")
    if key in _registered:
        return
    if torch._library.utils.is_functional_schema(op._schema):
        torch.library.register_autograd(op, backward, setup_context=setup_context)
    else:
        namespace, name = qualname(op).split("::")
        kernel = _library_autograd.make_autograd_impl(op, _library_autograd.Info(backward, setup_context))
        library(namespace).impl(name, kernel, "Autograd", with_keyset=True)
    _registered.add(key)


def define_op(name: str, schema: str, impl: Callable, backward: Callable, setup_context: Callable,
              fake: Callable | None = None):
    """The custom operator ``fastnas_ops::<name>`` with ``schema``: ``impl`` on every device, ``fake`` (default:
    ``impl``, which then runs on fake tensors too) and the autograd ``backward``/``setup_context``. Returns the
    overload to call."""
    lib = library(OP_NAMESPACE)
    lib.define(name + schema)
    lib.impl(name, impl, "CompositeExplicitAutograd")
    op = getattr(getattr(torch.ops, OP_NAMESPACE), name).default
    register_fake(op, fake or impl)
    register_autograd(op, backward, setup_context)
    return op


def autocast_inputs(device_type: str, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in the autocast dtype where autocast is on (what it does to a convolution's inputs), so that an
    operator computes in the dtype it is given, eager and compiled alike."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


def flat_needs(ctx, n: int) -> list[bool]:
    """``ctx.needs_input_grad`` as one bool per tensor input (list inputs spread out), the first ``n``."""
    flat: list[bool] = []
    for v in ctx.needs_input_grad:
        flat.extend(v if isinstance(v, (list, tuple)) else (v,))
    return [bool(b) for b in flat[:n]]


def backward_kernels(kernels: dict, references: dict) -> dict:
    """The kernels a backward runs: the backend's, or under ``create_graph`` (grad mode on in the backward) the
    differentiable references, so that higher derivatives are exact on every backend."""
    return references if torch.is_grad_enabled() else kernels


def partial_vjp(fn: Callable, inputs: tuple, grad: torch.Tensor, needs: tuple) -> list:
    """The vector-Jacobian product of ``fn(*inputs)`` with ``grad``, with a graph (for higher derivatives): one
    partial derivative per needed input, None for the others.

    ``fn`` runs on aliases of the inputs: when one input is computed from another (a node sum's skip input and a
    candidate's output), the gradient of each alias holds only its own path, not the path through the other input,
    which autograd adds once itself."""
    with torch.enable_grad():
        aliases = [t.view_as(t) if isinstance(t, torch.Tensor) and t.requires_grad else t for t in inputs]
        y = fn(*aliases)
    wanted = [need and isinstance(a, torch.Tensor) and a.requires_grad for a, need in zip(aliases, needs)]
    grads = iter(torch.autograd.grad(y, [a for a, w in zip(aliases, wanted) if w], grad, create_graph=True,
                                     allow_unused=True))
    return [next(grads) if w else None for w in wanted]


def tensor(shape, device, dtype=torch.float64, channels_last: bool = False, seed: int = 0,
           scale: float = 1.0) -> torch.Tensor:
    """A seeded random tensor for sample inputs (float64 draws, then cast: the same values in every dtype)."""
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def param_dtype(dtype: torch.dtype) -> torch.dtype:
    """Parameters beside activations of ``dtype``, as under AMP: float32 beside half activations."""
    return torch.float64 if dtype == torch.float64 else torch.float32
