"""What a def module declares (its kernels, its public ops and their sample inputs), and the registration of custom
operators, fakes and autograd, once per operator."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

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
    """``backward``/``setup_context`` as the autograd of ``op``, once per operator (:func:`autograd_kernel`)."""
    key = (qualname(op), "autograd")
    if key in _registered:
        return
    namespace, name = qualname(op).split("::")
    library(namespace).impl(name, autograd_kernel(op, backward, setup_context), "Autograd", with_keyset=True)
    _registered.add(key)


def autograd_kernel(op, backward: Callable, setup_context: Callable) -> Callable:
    """The Autograd-key kernel of ``op``: what ``torch.library.register_autograd`` builds (the same
    ``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)`` contract, tensor-list inputs included),
    with the per-call work of its generality done once here: the arguments the dispatcher drops at their defaults
    come from a table, list inputs are spread by their lengths. It runs on every call of every op (torch's spends
    more time than a small op's kernel). Mutable schemas are served too: the mutated inputs (running statistics)
    never need a gradient. ``setup_context`` sees ``ctx.needs_input_grad`` flat with two trailing entries, as
    torch's gives it; ``backward`` sees one entry per schema argument (a list for a list), as torch's does."""
    arguments = op._schema.arguments
    if any(a.kwarg_only for a in arguments):
        raise ValueError(f"{qualname(op)}: keyword-only arguments are not supported by the ops' autograd")
    defaults = tuple(a.default_value if a.has_default_value() else None for a in arguments)
    lists = frozenset(i for i, a in enumerate(arguments) if torch._library.utils.is_tensorlist_like_type(a.type))
    after_autograd = torch._C._after_autograd_keyset
    below_autograd = torch._C._AutoDispatchBelowAutograd

    def nested(flat: tuple, sizes: tuple) -> tuple:
        """``flat`` regrouped as the arguments are: a list per list argument."""
        if not lists:
            return flat
        out, k = [], 0
        for size in sizes:
            out.append(flat[k] if size < 0 else list(flat[k:k + size]))
            k += 1 if size < 0 else size
        return tuple(out)

    def run_forward(ctx, *flat):
        *flat, keyset, sizes = flat
        args = nested(tuple(flat), sizes)
        with below_autograd():
            output = op.redispatch(keyset & after_autograd, *args)
        ctx.list_sizes = sizes
        setup_context(ctx, args + defaults[len(args):], output)
        return output

    def run_backward(ctx, *grads):
        needs = ctx.needs_input_grad
        ctx.needs_input_grad = nested(needs[:-2], ctx.list_sizes)
        try:
            result = backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = needs
        result = result if isinstance(result, tuple) else (result,)
        if lists:
            result = [g for i, size in enumerate(ctx.list_sizes) for g in (
                (result[i],) if size < 0 else (result[i] if result[i] is not None else (None,) * size))]
        return (*result[:len(needs) - 2], None, None)

    # torch's name, so that a grad_fn reads as it does with torch.library.register_autograd
    Generated = type(f"GeneratedBackwardFor_{op._namespace}_{op._opname}_{op._overloadname}",
                     (torch.autograd.Function,),
                     {"forward": staticmethod(run_forward), "backward": staticmethod(run_backward)})

    def kernel(keyset, *args):
        if torch._C.is_grad_enabled() and torch._C._any_requires_grad(*args):
            if lists:
                sizes = tuple(len(a) if i in lists else -1 for i, a in enumerate(args))
                flat = [t for i, a in enumerate(args) for t in (a if i in lists else (a,))]
                return Generated.apply(*flat, keyset, sizes)
            return Generated.apply(*args, keyset, None)
        with below_autograd():
            return op.redispatch(keyset & after_autograd, *args)

    return kernel


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
