"""mixed_sum: Σ_k weights[k]·xs[k], the DARTS MixedOp (and a search cell's node sum).

Autograd keeps the inputs only when the weights need a gradient (grad xs[k] = weights[k]·grad needs the weights
alone), so a node sum whose weights are frozen frees its inputs.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import checks, layout
from ..backend import select
from ..opdef import Kernel, Op, Sample, backward_kernels, flat_needs, param_dtype, tensor

OP = "mixed_sum"


def check(xs: Sequence[torch.Tensor], weights: torch.Tensor) -> None:
    checks.check_tensor_list(OP, "xs", xs)
    if len(xs) == 0:
        raise ValueError(f"fastnas.{OP}: xs must hold at least one tensor")
    x0 = xs[0]
    checks.check_float(OP, "xs[0]", x0)
    for k, x in enumerate(xs[1:], start=1):
        checks.check_float(OP, f"xs[{k}]", x)
        if x.shape != x0.shape:
            raise ValueError(f"fastnas.{OP}: xs[{k}] has shape {list(x.shape)}, expected {list(x0.shape)} "
                             "(the shape of xs[0])")
        if x.dtype != x0.dtype:
            raise TypeError(f"fastnas.{OP}: xs[{k}] has dtype {x.dtype}, expected {x0.dtype} (the dtype of xs[0])")
        checks.check_same_device(OP, f"xs[{k}]", x, "xs[0]", x0)
    checks.check_float(OP, "weights", weights)
    if weights.dim() != 1 or weights.shape[0] != len(xs):
        raise ValueError(f"fastnas.{OP}: weights must have shape [{len(xs)}] (one per input), "
                         f"got {list(weights.shape)}")
    checks.check_same_device(OP, "weights", weights, "xs[0]", x0)


def reference(xs: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Σ_k weights[k]·xs[k], accumulated in float32 for half inputs (float64 for float64)."""
    check(xs, weights)
    return _weighted_sum(xs, weights)


def _weighted_sum(xs: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    dtype = xs[0].dtype
    acc = layout.acc_dtype(dtype)
    w = weights.to(acc)
    out = xs[0].to(acc) * w[0]
    for k in range(1, len(xs)):
        out = out + xs[k].to(acc) * w[k]
    return out.to(dtype)


def _forward_kernel(xs: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    return layout.like(xs[0]).copy_(reference(xs, weights))


def _backward_xs_kernel(grad: torch.Tensor, weights: torch.Tensor) -> list[torch.Tensor]:
    g, w = grad.to(layout.acc_dtype(grad.dtype)), weights.to(layout.acc_dtype(grad.dtype))
    return [layout.like(grad).copy_(g * w[k]) for k in range(weights.shape[0])]


def _backward_kernel(grad: torch.Tensor, xs: list[torch.Tensor], weights: torch.Tensor,
                     need_xs_grad: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = grad.to(layout.acc_dtype(grad.dtype))
    gw = torch.stack([(g * x.to(g.dtype)).sum() for x in xs])
    return (_backward_xs_kernel(grad, weights) if need_xs_grad else []), layout.like(weights).copy_(gw)


KERNELS = {
    "mixed_sum": Kernel("(Tensor[] xs, Tensor weights) -> Tensor", _forward_kernel, required=True),
    # the weights need a gradient: (grad of every xs[k] (empty unless need_xs_grad), grad of weights) in one pass
    "mixed_sum_backward": Kernel("(Tensor grad, Tensor[] xs, Tensor weights, bool need_xs_grad) -> (Tensor[], Tensor)",
                                 _backward_kernel, required=True),
    # only the xs need a gradient: weights[k]·grad for every k
    "mixed_sum_backward_xs": Kernel("(Tensor grad, Tensor weights) -> Tensor[]", _backward_xs_kernel, required=True),
}
REFERENCES = {name: k.reference for name, k in KERNELS.items()}


def _autograd(kernels: dict):
    def setup_context(ctx, inputs, output):
        xs, weights = inputs
        k = len(xs)
        need = flat_needs(ctx, k + 1)
        ctx.num_inputs, ctx.need_xs, ctx.need_w = k, any(need[:k]), need[k]
        ctx.save_for_backward(weights, *(xs if ctx.need_w else ()))

    def backward(ctx, grad):
        weights, *xs = ctx.saved_tensors
        run = backward_kernels(kernels, REFERENCES)
        gxs, gw = [None] * ctx.num_inputs, None
        if ctx.need_w:
            grads, gw = run["mixed_sum_backward"](grad, xs, weights, ctx.need_xs)
            if ctx.need_xs:
                gxs = list(grads)
        elif ctx.need_xs:
            gxs = list(run["mixed_sum_backward_xs"](grad, weights))
        return gxs, gw

    return backward, setup_context


AUTOGRAD = {"mixed_sum": _autograd}


def mixed_sum(xs: Sequence[torch.Tensor], weights: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Σ_k weights[k]·xs[k]; ``xs`` share shape, dtype and device, ``weights`` is [K] (may be float32 beside half
    ``xs``)."""
    check(xs, weights)
    kernel = select(xs[0].device.type, backend).kernels.get(OP)
    return _weighted_sum(xs, weights) if kernel is None else kernel(list(xs), weights)


OPS = {OP: Op(mixed_sum, reference)}


def sample_inputs(device, dtype, shape=(2, 3, 5, 3)) -> list[Sample]:
    xs = [tensor(shape, device, dtype, channels_last=True)] + [tensor(shape, device, dtype, seed=k) for k in (2, 3)]
    return [Sample(OP, [tensor(3, device, param_dtype(dtype), seed=1), *xs],
                   lambda b, w, *xs: mixed_sum(list(xs), w, backend=b), amp=True)]
