"""What a def module declares about each kernel, and the registration of fakes and autograd once per operator."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Kernel:
    """A kernel of the backend interface: its schema (``csrc/fastnas.cpp`` holds the same), its plain-PyTorch
    reference (the canonical results, layouts included; differentiable, so it also serves double backward and as
    the fake), and whether every backend must provide it."""

    schema: str
    reference: Callable
    required: bool = False


_registered: set[tuple[str, str]] = set()


def qualname(op) -> str:
    return op._schema.name


def register_fake(op, fn: Callable) -> None:
    """``fn`` as the fake of ``op`` (once per operator: the cpu and cuda backends share theirs)."""
    key = (qualname(op), "fake")
    if key not in _registered:
        torch.library.register_fake(op, fn)
        _registered.add(key)


def register_autograd(op, backward: Callable, setup_context: Callable) -> None:
    key = (qualname(op), "autograd")
    if key not in _registered:
        torch.library.register_autograd(op, backward, setup_context=setup_context)
        _registered.add(key)


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
