"""normalized_mixed_sum: a search-cell node sum fused with the batch norms that end its candidates.

``Σ_k w_k·BN(z_k) + Σ_j w_j·z_j`` with affine-free training-mode batch norms: on a backend with the optional
``normalized_mixed_sum`` kernels (the ``cpu`` backend's) the normalised tensors are never written. Forward: each z_k
is read once for its statistics and once for the sum; backward: g and every z_k once for the per-channel sums, once
more for the input gradients. The running statistics move as ``nn.BatchNorm2d`` moves them. Saved for the backward:
the normalised inputs z_k (what the batch norms would have saved as their outputs), and the others only when the
weights need a gradient. Higher derivatives differentiate the reference composition again.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import checks, layout
from ..backend import get, select
from . import mixed_sum as _mixed_sum
from ._kernel import Kernel, partial_vjp

OP = "normalized_mixed_sum"
KERNEL = "normalized_mixed_sum"


def _momentum(bn: nn.BatchNorm2d) -> float:
    """The running statistics' update factor of this step (a cumulative average when momentum is None)."""
    return bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)


def reference(normalized: list[tuple[torch.Tensor, nn.BatchNorm2d]], plain: list[torch.Tensor],
              weights: torch.Tensor) -> torch.Tensor:
    """Σ_k weights[k]·bn_k(z_k) over ``normalized``, then the ``plain`` inputs with the remaining weights; each batch
    norm in training mode, its running statistics and batch count updated."""
    outs = []
    for z, bn in normalized:
        bn.num_batches_tracked.add_(1)
        outs.append(F.batch_norm(z, bn.running_mean, bn.running_var, None, None, True, _momentum(bn), bn.eps))
    return _mixed_sum.reference(outs + list(plain), weights)


def _forward_kernel(zs, weights, num_normalized, running_means, running_vars, momentum, eps):
    z0 = zs[0]
    acc = layout.acc_dtype(z0.dtype)
    outs, means, invstds = [], [], []
    for z, rm, rv in zip(zs[:num_normalized], running_means, running_vars):
        y, mean, invstd = torch.ops.aten.native_batch_norm(z.to(acc), None, None, rm, rv, True, momentum, eps)
        outs.append(y)
        means.append(mean)
        invstds.append(invstd)
    out = sum(w * o for w, o in zip(weights.to(acc), outs + [z.to(acc) for z in zs[num_normalized:]]))
    stats = z0.new_empty((0, z0.shape[1]), dtype=acc)
    return (layout.shaped(z0.shape, z0, layout.prefers_channels_last(z0)).copy_(out),
            torch.stack(means) if means else stats, torch.stack(invstds) if invstds else stats.clone())


def _backward_kernel(grad, zs, weights, means, invstds, need_zs_grad, need_weights_grad):
    acc = layout.acc_dtype(grad.dtype)
    g, w, n, dims = grad.to(acc), weights.to(acc), means.shape[0], (0, 2, 3)
    like = zs[0] if len(zs) else grad
    cl = layout.prefers_channels_last(grad) or layout.prefers_channels_last(like)
    xhats = [(z.to(acc) - m.view(1, -1, 1, 1)) * s.view(1, -1, 1, 1) for z, m, s in zip(zs[:n], means, invstds)]
    gzs = []
    if need_zs_grad:
        for k in range(weights.shape[0]):
            gk = w[k] * g
            if k < n:
                xh, s = xhats[k], invstds[k].view(1, -1, 1, 1)
                gk = s * (gk - gk.mean(dims, keepdim=True) - xh * (gk * xh).mean(dims, keepdim=True))
            gzs.append(layout.shaped(grad.shape, grad, cl).copy_(gk))
    gw = g.new_empty((0,))
    if need_weights_grad:
        gw = torch.stack([(g * t).sum() for t in xhats + [z.to(acc) for z in zs[n:]]])
    return gzs, gw


KERNELS = {
    # (Σ_k<n w_k (zs[k] - mean_k) invstd_k + Σ_k>=n w_k zs[k], means [n, C], invstds [n, C]); running statistics
    # updated
    "normalized_mixed_sum": Kernel("(Tensor[] zs, Tensor weights, int num_normalized, Tensor(a!)[] running_means, "
                                   "Tensor(b!)[] running_vars, float momentum, float eps) -> (Tensor, Tensor, Tensor)",
                                   _forward_kernel),
    # (grad of every zs[k] (empty unless need_zs_grad), grad of weights (empty unless need_weights_grad)); zs holds
    # every input when the weights need a gradient, else at least the normalised ones
    "normalized_mixed_sum_backward": Kernel("(Tensor grad, Tensor[] zs, Tensor weights, Tensor means, "
                                            "Tensor invstds, bool need_zs_grad, bool need_weights_grad) "
                                            "-> (Tensor[], Tensor)", _backward_kernel),
}
AUTOGRAD: dict = {}


class NormalizedMixedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: str, weights: torch.Tensor, num_normalized: int, running_means: list,
                running_vars: list, momentum: float, eps: float, *zs: torch.Tensor) -> torch.Tensor:
        kernels = get(backend).kernels
        out, means, invstds = kernels[KERNEL](list(zs), weights, num_normalized, running_means, running_vars,
                                              momentum, eps)
        need_w = ctx.needs_input_grad[1]
        ctx.conf = (backend, len(zs), num_normalized, eps)
        kept = zs if need_w else zs[:num_normalized]
        ctx.save_for_backward(weights, means, invstds, *kept)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weights, means, invstds, *zs = ctx.saved_tensors
        backend, count, num_normalized, eps = ctx.conf
        need_w, need_z = ctx.needs_input_grad[1], any(ctx.needs_input_grad[7:])
        if torch.is_grad_enabled():  # create_graph: differentiate the composition again
            gw, gzs = _differentiated(grad, weights, zs, count, num_normalized, eps, need_w)
        else:
            gzs, gw = get(backend).kernels[f"{KERNEL}_backward"](grad, zs, weights, means, invstds, need_z, need_w)
            gzs, gw = list(gzs), gw.to(weights.dtype)
        return (None, gw if need_w else None, None, None, None, None, None,
                *(gzs if need_z else [None] * count))


def _differentiated(grad, weights, zs, count, num_normalized, eps, need_w):
    """The gradients of the composition (batch norms with batch statistics, then the weighted sum) with a graph."""
    def composition(w, *zs):
        terms = [F.batch_norm(z, None, None, None, None, True, 0.0, eps) for z in zs[:num_normalized]]
        return sum(w[k] * t.to(grad.dtype) for k, t in enumerate(terms + list(zs[num_normalized:])))

    gw, *gzs = partial_vjp(composition, (weights, *zs), grad, (need_w,) + (True,) * len(zs))
    gzs += [weights[k] * grad for k in range(len(zs), count)]  # inputs not kept: linear in grad
    return gw, gzs


def fused_norms_apply(like: torch.Tensor, *, backend: str | None = None) -> bool:
    """Whether :func:`normalized_mixed_sum` runs the selected backend's fused kernels on activations like ``like``:
    eager with grad enabled, channels_last, float32/float64, no autocast, and the backend has the kernels."""
    return (torch.is_grad_enabled() and like.dtype in (torch.float32, torch.float64)
            and not torch.compiler.is_compiling() and layout.prefers_channels_last(like)
            and not torch.is_autocast_enabled(like.device.type)
            and KERNEL in select(like.device.type, backend).kernels)


def fused_norms_unsupported(device: torch.device | str, dtype: torch.dtype, channels_last: bool, autocast: bool,
                            backend: str | None = None) -> str | None:
    """None where :func:`normalized_mixed_sum` runs the backend's fused kernels for activations of this setting,
    else a one-line reason."""
    name = select(torch.device(device).type, backend).name
    if KERNEL not in get(name).kernels:
        return f"the {name} backend has no {KERNEL} kernel"
    if autocast:
        return "autocast is on (the kernels take float32 or float64 activations)"
    if dtype not in (torch.float32, torch.float64):
        return f"{dtype} activations (the kernels take float32 or float64)"
    if not channels_last:
        return "NCHW activations (the kernels take channels_last)"
    return None


def normalized_mixed_sum(normalized: list[tuple[torch.Tensor, nn.BatchNorm2d]], plain: list[torch.Tensor],
                         weights: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Σ_k weights[k]·bn_k(z_k) over ``normalized`` (pairs of an input and its affine-free batch norm in training
    mode, all with one momentum and eps), then the ``plain`` inputs with the remaining weights."""
    checks.check_tensor_list(OP, "plain", plain)
    if not normalized:
        raise ValueError(f"fastnas.{OP}: normalized must hold at least one (tensor, batch norm) pair")
    for k, pair in enumerate(normalized):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[1], nn.BatchNorm2d)):
            raise TypeError(f"fastnas.{OP}: normalized[{k}] must be a (tensor, nn.BatchNorm2d) pair, got {pair!r}")
        checks.check_4d(OP, f"normalized[{k}][0]", pair[0])
    if not fused_norms_apply(normalized[0][0], backend=backend):
        return reference(normalized, plain, weights)
    norms = [bn for _, bn in normalized]
    torch._foreach_add_([bn.num_batches_tracked for bn in norms], 1)
    momentum, eps = _momentum(norms[0]), norms[0].eps
    return NormalizedMixedSum.apply(select(weights.device.type, backend).name, weights, len(norms),
                                    [bn.running_mean for bn in norms], [bn.running_var for bn in norms], momentum, eps,
                                    *[z for z, _ in normalized], *plain)
