"""single_channel_conv2d: a stride-1 convolution of a few channels to one, no bias (a CBAM spatial gate's k×k
convolution).

A backend's optional kernels (the ``cpu`` backend's: oneDNN spends 0.4-0.6 ms on the 2 -> 1 7×7 convolution at batch
32, 32×32, for 3 MFLOP of arithmetic) run it where they cover it (:func:`applies`), else it is ``F.conv2d``. The
input is saved only when the weight needs a gradient; double backward uses ATen's differentiable formulas.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import checks, layout
from ..backend import select
from ..opdef import Kernel, Op, Sample, tensor

OP = "single_channel_conv2d"
MAX_CHANNELS = 8  # more input channels than this: oneDNN's GEMM-based convolution is the better choice


def check(x: torch.Tensor, weight: torch.Tensor) -> None:
    checks.check_4d(OP, "x", x)
    checks.check_4d(OP, "weight", weight)
    if weight.shape[0] != 1 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"fastnas.{OP}: weight must have shape [1, {x.shape[1]}, kh, kw], got {list(weight.shape)}")
    checks.check_same_device(OP, "weight", weight, "x", x)


def reference(x: torch.Tensor, weight: torch.Tensor, padding: int | tuple[int, int] = 0) -> torch.Tensor:
    """``F.conv2d(x, weight, None, 1, padding)``."""
    return F.conv2d(x, weight, None, 1, padding)


def _forward_kernel(x, weight, padding):
    out = reference(x, weight, padding)
    return layout.shaped(out.shape, x, layout.prefers_channels_last(x)).copy_(out)


def _backward_kernel(grad, x, weight, padding, need_x_grad, need_weight_grad):
    gx, gw, _ = torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1], padding, [1, 1], False, [0, 0], 1,
                                                    [need_x_grad, need_weight_grad, False])
    gx = layout.shaped(x.shape, x, layout.prefers_channels_last(x)).copy_(gx) if need_x_grad else x.new_empty((0,))
    gw = gw.contiguous() if need_weight_grad else x.new_empty((0,), dtype=layout.acc_dtype(x.dtype))
    return gx, gw


KERNELS = {
    "single_channel_conv2d": Kernel("(Tensor x, Tensor weight, int[2] padding) -> Tensor", _forward_kernel),
    # (grad x (empty unless need_x_grad), grad weight (empty unless need_weight_grad))
    "single_channel_conv2d_backward": Kernel("(Tensor grad, Tensor x, Tensor weight, int[2] padding, "
                                             "bool need_x_grad, bool need_weight_grad) -> (Tensor, Tensor)",
                                             _backward_kernel),
}


def _autograd(kernels: dict):
    """The input is saved only when the weight needs a gradient; double backward uses ATen's differentiable
    formulas."""
    def setup_context(ctx, inputs, output):
        x, weight, padding = inputs
        ctx.conf = (x.shape, x.stride(), list(padding))
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)

    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        shape, strides, padding = ctx.conf
        need_x, need_w = ctx.needs_input_grad[:2]
        if x is None:  # only the input gradient: the kernel reads the input's shape and layout, not its values
            x = layout.stand_in(shape, strides, grad)
        if torch.is_grad_enabled():  # double backward
            gx, gw, _ = torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1], padding, [1, 1], False,
                                                            [0, 0], 1, [need_x, need_w, False])
        else:
            gx, gw = kernels[f"{OP}_backward"](grad, x, weight, padding, need_x, need_w)
        return (gx if need_x else None), (gw if need_w else None), None

    return backward, setup_context


AUTOGRAD = {OP: _autograd}


def applies(kernels, x: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int]) -> bool:
    """Whether the backend's kernels cover this convolution."""
    return (OP in kernels and x.shape[1] <= MAX_CHANNELS and x.dtype == weight.dtype
            and all(0 <= p < k for p, k in zip(padding, weight.shape[2:]))
            and not torch.is_autocast_enabled(x.device.type))


def single_channel_conv2d(x: torch.Tensor, weight: torch.Tensor, padding: int | tuple[int, int] = 0, *,
                          backend: str | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, None, 1, padding)`` with weight [1, C, kh, kw], on the backend's kernels where they
    cover it."""
    check(x, weight)
    padding = checks.int_pair(OP, "padding", padding, 0)
    chosen = select(x.device.type, backend)
    if not applies(chosen.kernels, x, weight, padding):
        return reference(x, weight, padding)
    return chosen.kernels[OP](x, weight, list(padding))


OPS = {OP: Op(single_channel_conv2d, reference)}


def sample_inputs(device, dtype, shape=(2, 3, 5, 3)) -> list[Sample]:
    x = tensor(shape, device, dtype, channels_last=True)[:, :2]
    return [Sample(OP, [x, tensor((1, 2, 3, 3), device, dtype, seed=1)],
                   lambda b, x, w: single_channel_conv2d(x, w, 1, backend=b))]
