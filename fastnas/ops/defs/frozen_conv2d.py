"""frozen_conv2d: a convolution without bias that keeps its input for the backward only where the weight needs a
gradient.

PyTorch's convolution keeps its input whatever needs a gradient, though only the weight gradient reads it. With a
frozen weight (the architecture step of a first-order search) this op keeps the weight alone. Its input gradient is
the transposed convolution of the gradient with the weight (one call, no stand-in input, and several times faster
than ATen's input-only convolution backward on the CPU for the grouped 1×1 convolutions of the batched plan); the
weight gradient is ATen's convolution backward. Both are linear in the gradient and differentiable, so double
backward is exact.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import checks, layout
from ..opdef import Op, Sample, autocast_inputs, define_op, tensor

OP = "frozen_conv2d"
_IntPair = tuple[int, int]


def reference(x: torch.Tensor, weight: torch.Tensor, stride: int | _IntPair = 1, padding: int | _IntPair = 0,
              dilation: int | _IntPair = 1, groups: int = 1) -> torch.Tensor:
    """``F.conv2d(x, weight, None, stride, padding, dilation, groups)``."""
    return F.conv2d(x, weight, None, stride, padding, dilation, groups)


def _forward(x, weight, stride, padding, dilation, groups: int):
    return F.conv2d(x, weight, None, stride, padding, dilation, groups)


def _setup_context(ctx, inputs, output):
    x, weight, stride, padding, dilation, groups = inputs
    ctx.conf = (x.shape, x.dtype, x.stride(), stride, padding, dilation, groups)
    ctx.weight_dtype = weight.dtype
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)


def _input_grad(grad: torch.Tensor, weight: torch.Tensor, shape, strides, stride, padding, dilation,
                groups: int) -> torch.Tensor:
    """The input gradient as a transposed convolution; its output padding restores the rows and columns that the
    stride left out, and its layout is the input's."""
    extra = [(size + 2 * p - d * (k - 1) - 1) % s for size, k, s, p, d in
             zip(shape[2:], weight.shape[2:], stride, padding, dilation)]
    gx = F.conv_transpose2d(grad, weight, None, stride, padding, extra, groups, dilation)
    return gx if gx.stride() == tuple(strides) else layout.stand_in(shape, strides, gx).copy_(gx)


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    shape, dtype, strides, stride, padding, dilation, groups = ctx.conf
    need_x, need_w = ctx.needs_input_grad[:2]
    weight = weight.to(grad.dtype)  # (the dtype the forward ran in under autocast)
    gx = _input_grad(grad, weight, shape, strides, stride, padding, dilation, groups).to(dtype) if need_x else None
    gw = None
    if need_w:
        gw = torch.ops.aten.convolution_backward(grad, x.to(grad.dtype), weight, None, stride, padding, dilation,
                                                 False, [0, 0], groups, [False, True, False])[1].to(ctx.weight_dtype)
    return gx, gw, None, None, None, None


LEAN = define_op(OP, "(Tensor x, Tensor weight, int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor",
                 _forward, _backward, _setup_context)


def frozen_conv2d(x: torch.Tensor, weight: torch.Tensor, stride: int | _IntPair = 1, padding: int | _IntPair = 0,
                  dilation: int | _IntPair = 1, groups: int = 1, *, backend: str | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, None, stride, padding, dilation, groups)`` that saves x only where the weight needs a
    gradient (``backend`` is accepted for the ops' common signature: every backend runs ATen's convolution)."""
    checks.check_4d(OP, "x", x)
    checks.check_4d(OP, "weight", weight)
    args = (checks.int_pair(OP, "stride", stride, 1), checks.int_pair(OP, "padding", padding, 0),
            checks.int_pair(OP, "dilation", dilation, 1), groups)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return F.conv2d(x, weight, None, *args)
    return LEAN(*autocast_inputs(x.device.type, x, weight), *args)


OPS = {OP: Op(frozen_conv2d, reference)}


def sample_inputs(device, dtype, shape=(2, 3, 5, 3)) -> list[Sample]:
    c = shape[1]
    x, w = tensor(shape, device, dtype, channels_last=True), tensor((4, c, 3, 3), device, dtype, seed=1)
    return [Sample(OP, [x, w], lambda b, x, w: frozen_conv2d(x, w, 1, 1, backend=b)),
            Sample("frozen_conv2d_frozen", [x], lambda b, x: frozen_conv2d(x, w, 2, 1, backend=b))]
