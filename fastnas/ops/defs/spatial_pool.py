"""spatial_pool: the maximum and the mean over channels at every position (a CBAM spatial gate's pooling).

The result [N, 2, H, W] is channels_last on every backend (see :mod:`fastnas.ops.layout`); the kernel also returns
the int32 index of each position's first maximal channel [N, H, W], which is all its backward keeps.
"""
from __future__ import annotations

import torch

from .. import checks, layout
from ..backend import select
from ..opdef import Kernel, Op, Sample, backward_kernels, tensor

OP = "spatial_pool"


def check(x: torch.Tensor) -> None:
    checks.check_4d(OP, "x", x)
    if x.shape[1] == 0:
        raise ValueError(f"fastnas.{OP}: x has no channels (shape {list(x.shape)}), the max is undefined")


def _pooled(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check(x)
    mx, argmax = x.max(dim=1, keepdim=True)
    avg = x.to(layout.acc_dtype(x.dtype)).mean(dim=1, keepdim=True).to(x.dtype)
    return torch.cat([mx, avg], dim=1), argmax[:, 0]


def reference(x: torch.Tensor) -> torch.Tensor:
    """[N, 2, H, W]: channel 0 the max over C, channel 1 the mean over C."""
    return _pooled(x)[0]


def _forward_kernel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out, argmax = _pooled(x)
    return layout.shaped(out.shape, x, True).copy_(out), argmax.to(torch.int32).contiguous()


def _backward_kernel(grad: torch.Tensor, argmax: torch.Tensor, C: int, channels_last: bool) -> torch.Tensor:
    n, _, h, w = grad.shape
    acc = layout.acc_dtype(grad.dtype)
    g = grad.to(acc)
    gx = (g[:, 1:2] / C).expand(n, C, h, w).scatter_add(1, argmax.long()[:, None], g[:, :1])
    return layout.shaped((n, C, h, w), grad, channels_last).copy_(gx)


KERNELS = {
    # ([N, 2, H, W], channels_last, with the max over C in channel 0 and the mean in channel 1; int32 index of the
    # first maximal channel [N, H, W])
    "spatial_pool": Kernel("(Tensor x) -> (Tensor, Tensor)", _forward_kernel, required=True),
    "spatial_pool_backward": Kernel("(Tensor grad, Tensor argmax, SymInt C, bool channels_last) -> Tensor",
                                    _backward_kernel, required=True),
}
REFERENCES = {name: k.reference for name, k in KERNELS.items()}


def _autograd(kernels: dict):
    def setup_context(ctx, inputs, output):
        (x,) = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # (no zero gradient is made for the positions)
        ctx.save_for_backward(output[1])
        ctx.channels = x.shape[1]
        ctx.channels_last = layout.prefers_channels_last(x)

    def backward(ctx, grad, _grad_argmax):
        if grad is None:
            return None
        (argmax,) = ctx.saved_tensors
        run = backward_kernels(kernels, REFERENCES)
        return run["spatial_pool_backward"](grad, argmax, ctx.channels, ctx.channels_last)

    return backward, setup_context


AUTOGRAD = {"spatial_pool": _autograd}


def spatial_pool(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """[N, 2, H, W]: max over C in channel 0, mean over C in channel 1."""
    checks.check_4d(OP, "x", x)
    kernel = select(x.device.type, backend).kernels.get(OP)
    if kernel is None:
        return reference(x)
    check(x)
    return kernel(x)[0]


OPS = {"spatial_pool": Op(spatial_pool, reference)}


def sample_inputs(device, dtype, shape=(2, 3, 5, 3)) -> list[Sample]:
    return [Sample("spatial_pool", [tensor(shape, device, dtype, channels_last=True)],
                   lambda b, x: spatial_pool(x, backend=b), amp=True)]
