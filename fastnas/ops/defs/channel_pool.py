"""channel_pool: the mean and the maximum of every channel over H×W (a CBAM channel gate's pooling).

The kernel also returns the int32 index in H·W of each first maximum, which is all its backward keeps.
"""
from __future__ import annotations

import torch

from .. import checks, layout
from ..backend import select
from ..opdef import Kernel, Op, Sample, backward_kernels, tensor

OP = "channel_pool"


def check(x: torch.Tensor) -> None:
    checks.check_4d(OP, "x", x)
    if x.shape[2] * x.shape[3] == 0:
        raise ValueError(f"fastnas.{OP}: x has no spatial elements (shape {list(x.shape)}), the max is undefined")


def _pooled(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check(x)
    n, c = x.shape[:2]
    flat = x.reshape(n, c, x.shape[2] * x.shape[3])
    mx, argmax = flat.max(dim=2)
    return flat.to(layout.acc_dtype(x.dtype)).mean(dim=2).to(x.dtype), mx, argmax


def reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, max) of every channel over H×W, each [N, C]."""
    avg, mx, _ = _pooled(x)
    return avg, mx


def _forward_kernel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    avg, mx, argmax = _pooled(x)
    return avg.contiguous(), mx.contiguous(), argmax.to(torch.int32).contiguous()


def input_grad(grad_avg: torch.Tensor, grad_max: torch.Tensor, argmax: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """grad_avg / (H·W) everywhere plus grad_max at each channel's first maximum, [N, C, H·W] (differentiable)."""
    n, c = grad_avg.shape
    acc = layout.acc_dtype(grad_avg.dtype)
    gx = (grad_avg.to(acc) / (h * w))[:, :, None].expand(n, c, h * w)
    return gx.scatter_add(2, argmax.long()[:, :, None], grad_max.to(acc)[:, :, None])


def _backward_kernel(grad_avg: torch.Tensor, grad_max: torch.Tensor, argmax: torch.Tensor, H: int, W: int,
                     channels_last: bool) -> torch.Tensor:
    n, c = grad_avg.shape
    out = layout.shaped((n, c, H, W), grad_avg, channels_last)
    return out.copy_(input_grad(grad_avg, grad_max, argmax, H, W).view(n, c, H, W))


KERNELS = {
    # (mean over H·W, max over H·W, int32 index of the first maximum in H·W)
    "channel_pool": Kernel("(Tensor x) -> (Tensor, Tensor, Tensor)", _forward_kernel, required=True),
    "channel_pool_backward": Kernel("(Tensor grad_avg, Tensor grad_max, Tensor argmax, SymInt H, SymInt W, "
                                    "bool channels_last) -> Tensor", _backward_kernel, required=True),
}
REFERENCES = {name: k.reference for name, k in KERNELS.items()}


def _autograd(kernels: dict):
    def setup_context(ctx, inputs, output):
        (x,) = inputs
        argmax = output[2]
        ctx.mark_non_differentiable(argmax)
        ctx.set_materialize_grads(False)  # (no zero gradient is made for the positions)
        ctx.save_for_backward(argmax)
        ctx.hw = (x.shape[2], x.shape[3])
        ctx.channels_last = layout.prefers_channels_last(x)

    def backward(ctx, grad_avg, grad_max, _grad_argmax):
        if grad_avg is None and grad_max is None:
            return None
        (argmax,) = ctx.saved_tensors
        grad_avg = torch.zeros_like(grad_max) if grad_avg is None else grad_avg
        grad_max = torch.zeros_like(grad_avg) if grad_max is None else grad_max
        run = backward_kernels(kernels, REFERENCES)
        return run["channel_pool_backward"](grad_avg, grad_max, argmax, *ctx.hw, ctx.channels_last)

    return backward, setup_context


AUTOGRAD = {"channel_pool": _autograd}


def channel_pool(x: torch.Tensor, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, max) over H×W of x [N, C, H, W], each [N, C]."""
    checks.check_4d(OP, "x", x)
    kernel = select(x.device.type, backend).kernels.get(OP)
    if kernel is None:
        return reference(x)
    check(x)
    avg, mx, _ = kernel(x)
    return avg, mx


OPS = {"channel_pool": Op(channel_pool, reference)}


def sample_inputs(device, dtype, shape=(2, 3, 5, 3)) -> list[Sample]:
    return [Sample("channel_pool", [tensor(shape, device, dtype, channels_last=True)],
                   lambda b, x: channel_pool(x, backend=b), amp=True)]
