"""channel_scale and spatial_scale: x·sigmoid(logits), broadcast over H×W (logits [N, C]) or over channels (logits
[N, 1, H, W]); the gates' last step.

Autograd keeps x only when the logits need a gradient (grad x = grad·sigmoid(logits) needs the logits alone).
"""
from __future__ import annotations

import torch

from .. import checks, layout
from ..backend import select
from ..opdef import Kernel, Op, Sample, backward_kernels, flat_needs, param_dtype, tensor


def _logits_shape(op: str, x: torch.Tensor) -> list[int]:
    return [x.shape[0], x.shape[1]] if op == "channel_scale" else [x.shape[0], 1, x.shape[2], x.shape[3]]


def check(op: str, x: torch.Tensor, logits: torch.Tensor) -> None:
    checks.check_4d(op, "x", x)
    checks.check_float(op, "logits", logits)
    expected = _logits_shape(op, x)
    if list(logits.shape) != expected:
        raise ValueError(f"fastnas.{op}: logits must have shape {expected} for x of shape {list(x.shape)}, "
                         f"got {list(logits.shape)}")
    checks.check_same_device(op, "logits", logits, "x", x)


def _gate(op: str, logits: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    s = torch.sigmoid(logits.to(acc))
    return s[:, :, None, None] if op == "channel_scale" else s


def _scaled(op: str, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    check(op, x, logits)
    acc = layout.acc_dtype(x.dtype)
    return (x.to(acc) * _gate(op, logits, acc)).to(x.dtype)


def reference_channel_scale(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """x·sigmoid(logits)[:, :, None, None]."""
    return _scaled("channel_scale", x, logits)


def reference_spatial_scale(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """x·sigmoid(logits), logits [N, 1, H, W]."""
    return _scaled("spatial_scale", x, logits)


def _kernels(op: str) -> dict[str, Kernel]:
    def forward(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return layout.like(x).copy_(_scaled(op, x, logits))

    def backward(grad: torch.Tensor, x: torch.Tensor, logits: torch.Tensor,
                 need_x_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        acc = layout.acc_dtype(grad.dtype)
        s = _gate(op, logits, acc)
        g = grad.to(acc)
        dims = (2, 3) if op == "channel_scale" else (1,)
        glogits = ((g * x.to(acc)).sum(dims, keepdim=op == "spatial_scale") * s.view(logits.shape) *
                   (1 - s.view(logits.shape)))
        gx = layout.like(grad).copy_(g * s) if need_x_grad else grad.new_empty(0)
        return gx, layout.like(logits).copy_(glogits)

    return {
        op: Kernel("(Tensor x, Tensor logits) -> Tensor", forward, required=True),
        # (grad x (an empty tensor unless need_x_grad), grad logits)
        f"{op}_backward": Kernel("(Tensor grad, Tensor x, Tensor logits, bool need_x_grad) -> (Tensor, Tensor)",
                                 backward, required=True),
    }


KERNELS = {**_kernels("channel_scale"), **_kernels("spatial_scale")}
REFERENCES = {name: k.reference for name, k in KERNELS.items()}


def _autograd_of(op: str):
    def factory(kernels: dict):
        def setup_context(ctx, inputs, output):
            x, logits = inputs
            ctx.need_x, ctx.need_logits = flat_needs(ctx, 2)
            # grad x = grad·sigmoid(logits) needs the logits alone; grad logits also reads x
            ctx.save_for_backward(logits, x if ctx.need_logits else None)

        def backward(ctx, grad):
            logits, x = ctx.saved_tensors
            run = backward_kernels(kernels, REFERENCES)
            if not ctx.need_logits:
                return (run[op](grad, logits) if ctx.need_x else None), None
            gx, glogits = run[f"{op}_backward"](grad, x, logits, ctx.need_x)
            return (gx if ctx.need_x else None), glogits

        return backward, setup_context

    return factory


AUTOGRAD = {"channel_scale": _autograd_of("channel_scale"), "spatial_scale": _autograd_of("spatial_scale")}


def _scale(op: str, x: torch.Tensor, logits: torch.Tensor, backend: str | None) -> torch.Tensor:
    checks.check_4d(op, "x", x)
    kernel = select(x.device.type, backend).kernels.get(op)
    if kernel is None:
        return _scaled(op, x, logits)
    check(op, x, logits)
    return kernel(x, logits)


def channel_scale(x: torch.Tensor, logits: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """x·sigmoid(logits)[:, :, None, None] with logits [N, C]."""
    return _scale("channel_scale", x, logits, backend)


def spatial_scale(x: torch.Tensor, logits: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """x·sigmoid(logits) with logits [N, 1, H, W]."""
    return _scale("spatial_scale", x, logits, backend)


OPS = {"channel_scale": Op(channel_scale, reference_channel_scale),
       "spatial_scale": Op(spatial_scale, reference_spatial_scale)}


def sample_inputs(device, dtype, shape=(2, 3, 5, 3)) -> list[Sample]:
    n, c, h, w = shape
    x, pdt = tensor(shape, device, dtype, channels_last=True), param_dtype(dtype)
    return [Sample("channel_scale", [x, tensor((n, c), device, pdt, seed=1)],
                   lambda b, x, lg: channel_scale(x, lg, backend=b), amp=True),
            Sample("spatial_scale", [x, tensor((n, 1, h, w), device, pdt, seed=1)],
                   lambda b, x, lg: spatial_scale(x, lg, backend=b), amp=True)]
