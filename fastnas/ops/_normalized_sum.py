"""A search-cell node sum fused with the batch norms that end its candidates (the ``cpu`` backend's kernels).

``Σ_k w_k·BN(z_k) + Σ_j w_j·z_j`` with affine-free training-mode batch norms: the normalised tensors are never
written. Forward: each z_k is read once for its statistics and once for the sum; backward: g and every z_k once for
the per-channel sums, once more for the input gradients (per-channel affine in g and z_k). The batch norms' running
statistics move as ``nn.BatchNorm2d`` moves them. Saved for the backward: the normalised inputs z_k (what the batch
norms would have saved as their outputs), and the others only when the weights need a gradient.
"""
from __future__ import annotations

import torch


class NormalizedMixedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weights: torch.Tensor, num_normalized: int, running_means: list, running_vars: list,
                momentum: float, eps: float, *zs: torch.Tensor) -> torch.Tensor:
        out, means, invstds = torch.ops.fastnas.normalized_mixed_sum(list(zs), weights, num_normalized,
                                                                     running_means, running_vars, momentum, eps)
        need_w = ctx.needs_input_grad[0]
        ctx.num_inputs = len(zs)
        kept = zs if need_w else zs[:num_normalized]
        ctx.save_for_backward(weights, means, invstds, *kept)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weights, means, invstds, *zs = ctx.saved_tensors
        need_w = ctx.needs_input_grad[0]
        need_z = any(ctx.needs_input_grad[6:])
        gzs, gw = torch.ops.fastnas.normalized_mixed_sum_backward(grad, zs, weights, means, invstds, need_z, need_w)
        grads_z = list(gzs) if need_z else [None] * ctx.num_inputs
        return (gw.to(weights.dtype) if need_w else None), None, None, None, None, None, *grads_z


def normalized_mixed_sum(normalized: list[tuple[torch.Tensor, torch.nn.BatchNorm2d]], plain: list[torch.Tensor],
                         weights: torch.Tensor) -> torch.Tensor:
    """Σ_k weights[k]·norm_k(z_k) over ``normalized`` (pairs of an input and its affine-free batch norm in training
    mode, all with one momentum and eps), then the ``plain`` inputs with the remaining weights."""
    norms = [bn for _, bn in normalized]
    momentum, eps = norms[0].momentum, norms[0].eps
    torch._foreach_add_([bn.num_batches_tracked for bn in norms], 1)
    return NormalizedMixedSum.apply(weights, len(norms), [bn.running_mean for bn in norms],
                                    [bn.running_var for bn in norms], momentum, eps,
                                    *[z for z, _ in normalized], *plain)
