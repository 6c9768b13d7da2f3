"""normalized_mixed_sum: a search-cell node sum fused with the batch norms that end its candidates.

``Σ_k w_k·BN(z_k) + Σ_j w_j·z_j`` with affine-free training-mode batch norms: on a backend with the optional
``normalized_mixed_sum`` kernels (the ``cpu`` backend's) the normalised tensors are never written. Forward: each z_k
is read once for its statistics and once for the sum; backward: g and every z_k once for the per-channel sums, once
more for the input gradients. The running statistics move as ``nn.BatchNorm2d`` moves them. Saved for the backward:
the normalised inputs z_k (what the batch norms would have saved as their outputs), and the others only when the
weights need a gradient. Higher derivatives differentiate the reference composition again.
:func:`fused_norms_unsupported` says, when a network is built, whether the kernels will run for its activations.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import checks, layout
from ..backend import select
from ..opdef import Kernel, Op, Sample, flat_needs, param_dtype, partial_vjp, tensor
from . import mixed_sum as _mixed_sum
from .batch_norm import update_factor

OP = "normalized_mixed_sum"
KERNEL = "normalized_mixed_sum"


def reference(normalized: list[tuple[torch.Tensor, nn.BatchNorm2d]], plain: list[torch.Tensor],
              weights: torch.Tensor) -> torch.Tensor:
    """Σ_k weights[k]·bn_k(z_k) over ``normalized``, then the ``plain`` inputs with the remaining weights; each batch
    norm in training mode, its running statistics and batch count updated."""
    outs = []
    for z, bn in normalized:
        bn.num_batches_tracked.add_(1)
        momentum = update_factor(bn.momentum, bn.num_batches_tracked)
        outs.append(F.batch_norm(z, bn.running_mean, bn.running_var, None, None, True, momentum, bn.eps))
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


def _autograd(kernels: dict):
    def setup_context(ctx, inputs, output):
        zs, weights, num_normalized, _, _, _, eps = inputs
        _, means, invstds = output
        ctx.mark_non_differentiable(means, invstds)
        ctx.set_materialize_grads(False)
        need = flat_needs(ctx, len(zs) + 1)
        ctx.conf = (len(zs), num_normalized, eps, any(need[:-1]), need[-1])
        ctx.no_stats = [None] * num_normalized  # (the running statistics get no gradient)
        ctx.save_for_backward(weights, means, invstds, *(zs if need[-1] else zs[:num_normalized]))

    def backward(ctx, grad, _grad_means, _grad_invstds):
        weights, means, invstds, *zs = ctx.saved_tensors
        count, num_normalized, eps, need_z, need_w = ctx.conf
        if grad is None:
            return [None] * count, None, None, ctx.no_stats, ctx.no_stats, None, None
        if torch.is_grad_enabled():  # create_graph: differentiate the composition again
            gw, gzs = _differentiated(grad, weights, zs, count, num_normalized, eps, need_w)
        else:
            gzs, gw = kernels[f"{KERNEL}_backward"](grad, zs, weights, means, invstds, need_z, need_w)
            gzs, gw = list(gzs), gw.to(weights.dtype)
        return (gzs if need_z else [None] * count), (gw if need_w else None), None, ctx.no_stats, ctx.no_stats, None, \
            None

    return backward, setup_context


AUTOGRAD = {KERNEL: _autograd}


def _differentiated(grad, weights, zs, count, num_normalized, eps, need_w):
    """The gradients of the composition (batch norms with batch statistics, then the weighted sum) with a graph."""
    def composition(w, *zs):
        terms = [F.batch_norm(z, None, None, None, None, True, 0.0, eps) for z in zs[:num_normalized]]
        return sum(w[k] * t.to(grad.dtype) for k, t in enumerate(terms + list(zs[num_normalized:])))

    gw, *gzs = partial_vjp(composition, (weights, *zs), grad, (need_w,) + (True,) * len(zs))
    gzs += [weights[k] * grad for k in range(len(zs), count)]  # inputs not kept: linear in grad
    return gw, gzs


def fused_norms_unsupported(device: torch.device | str, dtype: torch.dtype, channels_last: bool, autocast: bool,
                            backend: str | None = None) -> str | None:
    """None where :func:`normalized_mixed_sum` runs the fused kernels of the backend selected by ``backend`` (default:
    the current selection) for activations of this device, dtype and layout, with or without autocast; else why
    not, in a few words (the op then runs its reference composition)."""
    chosen = select(torch.device(device).type, backend)
    if KERNEL not in chosen.kernels:
        return f"the {chosen.name} backend has no {KERNEL} kernel"
    if autocast:
        return "autocast"
    if dtype not in (torch.float32, torch.float64):
        return f"{str(dtype).removeprefix('torch.')} activations"
    if not channels_last:
        return "NCHW activations"
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
    z0 = normalized[0][0]
    kernel = select(z0.device.type, backend).kernels.get(KERNEL)
    if (kernel is None or z0.dtype not in (torch.float32, torch.float64) or not layout.prefers_channels_last(z0)
            or torch.is_autocast_enabled(z0.device.type)):  # where fused_norms_unsupported gives a reason
        return reference(normalized, plain, weights)
    norms = [bn for _, bn in normalized]
    torch._foreach_add_([bn.num_batches_tracked for bn in norms], 1)
    momentum, eps = update_factor(norms[0].momentum, norms[0].num_batches_tracked), norms[0].eps
    return kernel([z for z, _ in normalized] + list(plain), weights, len(norms), [bn.running_mean for bn in norms],
                  [bn.running_var for bn in norms], momentum, eps)[0]


OPS = {OP: Op(normalized_mixed_sum, reference)}


def sample_inputs(device, dtype, shape=(2, 3, 5, 3)) -> list[Sample]:
    c, pdt = shape[1], param_dtype(dtype)

    def node(b, w, z0, z1, z2):
        norms = [nn.BatchNorm2d(c, affine=False).to(device, pdt) for _ in range(2)]
        return normalized_mixed_sum([(z0, norms[0]), (z1, norms[1])], [z2], w, backend=b)
    return [Sample(OP, [tensor(3, device, pdt, seed=1), tensor(shape, device, dtype, True),
                        tensor(shape, device, dtype, True, seed=2), tensor(shape, device, dtype, True, seed=3)], node)]
