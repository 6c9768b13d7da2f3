"""depthwise_conv2d: the convolution of each channel with its own filter (groups = channels, no bias).

The forward is PyTorch's convolution (oneDNN on the CPU). A backend with the optional
``depthwise_conv2d_weight_grad`` kernel (the ``cpu`` backend's: channels_last, vectorised over channels; oneDNN's
depthwise weight gradient is 4-6x slower than its forward for 5x5 filters) computes the backward as:

* the weight gradient by that kernel;
* at stride 1, the input gradient as the forward convolution of the gradient with the flipped filter (exact: a
  stride-1 convolution's transpose is the correlation with the flipped filter; oneDNN's backward-data path for
  depthwise filters is up to 10x slower than its forward path).

The operator ``fastnas_ops::depthwise_conv2d`` saves the input only when the weight needs a gradient, on every
backend: with a frozen weight (the architecture step of a first-order search) only the weight is kept. Double
backward (``create_graph``) uses ATen's differentiable formulas. Otherwise (a trainable weight without the kernel or
under autocast, or no backward to come) it is ``F.conv2d``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import checks, layout
from ..backend import get, select
from ..opdef import Kernel, Op, Sample, autocast_inputs, define_op, tensor

OP = "depthwise_conv2d"
_IntPair = tuple[int, int]


def check(x: torch.Tensor, weight: torch.Tensor) -> None:
    checks.check_4d(OP, "x", x)
    checks.check_4d(OP, "weight", weight)
    c = x.shape[1]
    if weight.shape[0] != c or weight.shape[1] != 1:
        raise ValueError(f"fastnas.{OP}: weight must have shape [{c}, 1, kh, kw] (one filter per channel of x), "
                         f"got {list(weight.shape)}")
    checks.check_same_device(OP, "weight", weight, "x", x)


def reference(x: torch.Tensor, weight: torch.Tensor, stride: int | _IntPair = 1, padding: int | _IntPair = 0,
              dilation: int | _IntPair = 1) -> torch.Tensor:
    """The convolution of each channel of x with its own filter (weight [C, 1, kh, kw], groups = C)."""
    return F.conv2d(x, weight, None, stride, padding, dilation, x.shape[1])


def _weight_grad(grad, x, kernel_size, stride, padding, dilation):
    w = x.new_empty((x.shape[1], 1, *kernel_size))
    return torch.ops.aten.convolution_backward(grad, x, w, None, stride, padding, dilation, False, [0, 0],
                                               x.shape[1], [False, True, False])[1]


KERNELS = {
    # the weight gradient [C, 1, kh, kw] of a depthwise convolution of x [N, C, H, W]
    "depthwise_conv2d_weight_grad": Kernel("(Tensor grad, Tensor x, int[2] kernel_size, int[2] stride, "
                                           "int[2] padding, int[2] dilation) -> Tensor", _weight_grad),
}


def input_grad(grad: torch.Tensor, weight: torch.Tensor, like: tuple, stride: _IntPair, padding: _IntPair,
               dilation: _IntPair, flipped: bool) -> torch.Tensor:
    """The input gradient (``flipped``: at stride 1 as the forward convolution with the flipped filter); ``like``
    is the input's (shape, strides)."""
    kernel = weight.shape[-2:]
    flipped_padding = tuple(d * (k - 1) - p for k, p, d in zip(kernel, padding, dilation))
    if flipped and stride == (1, 1) and min(flipped_padding) >= 0:
        return F.conv2d(grad, weight.flip(-2, -1), None, 1, flipped_padding, dilation, weight.shape[0])
    # only the shape and layout of the input are read when only its gradient is asked for
    return torch.ops.aten.convolution_backward(grad, layout.stand_in(*like, grad), weight, None, stride, padding,
                                               dilation, False, [0, 0], weight.shape[0], [True, False, False])[0]


def _forward(x, weight, stride, padding, dilation, backend: str):
    return F.conv2d(x, weight, None, stride, padding, dilation, x.shape[1])


def _setup_context(ctx, inputs, output):
    x, weight, stride, padding, dilation, backend = inputs
    ctx.conf = (backend, x.shape, x.dtype, x.stride(), tuple(stride), tuple(padding), tuple(dilation))
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    backend, shape, dtype, strides, stride, padding, dilation = ctx.conf
    need_x, need_w = ctx.needs_input_grad[:2]
    kernels = get(backend).kernels
    grad_x = None
    if need_x:  # (in the forward's dtype under autocast, where the weight is frozen)
        grad_x = input_grad(grad, weight.to(grad.dtype), (shape, strides), stride, padding, dilation,
                            "depthwise_conv2d_weight_grad" in kernels).to(dtype)
    grad_w = None
    if need_w and torch.is_grad_enabled():  # double backward: ATen's formula is differentiable
        grad_w = torch.ops.aten.convolution_backward(grad, x, weight, None, stride, padding, dilation, False,
                                                     [0, 0], weight.shape[0], [False, True, False])[1]
    elif need_w:
        grad_w = kernels["depthwise_conv2d_weight_grad"](grad, x, list(weight.shape[-2:]), list(stride),
                                                         list(padding), list(dilation))
    return grad_x, grad_w, None, None, None, None


# the convolution with the backward of the module docstring (backend: whose weight-gradient kernel)
LEAN = define_op("depthwise_conv2d", "(Tensor x, Tensor weight, int[2] stride, int[2] padding, int[2] dilation, "
                 "str backend) -> Tensor", _forward, _backward, _setup_context)


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, stride: int | tuple[int, int] = 1,
                     padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1, *,
                     backend: str | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, None, stride, padding, dilation, groups=C)`` of x [N, C, H, W] with weight
    [C, 1, kh, kw], with the backward of the backend's kernels where it has them."""
    check(x, weight)
    args = (checks.int_pair(OP, "stride", stride, 1), checks.int_pair(OP, "padding", padding, 0),
            checks.int_pair(OP, "dilation", dilation, 1))
    chosen = select(x.device.type, backend)
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return reference(x, weight, *args)
    fused = ("depthwise_conv2d_weight_grad" in chosen.kernels and x.dtype == weight.dtype
             and not torch.is_autocast_enabled(x.device.type))
    if fused or not weight.requires_grad:  # a frozen weight: the backward needs no kernel and no input
        return LEAN(*autocast_inputs(x.device.type, x, weight), *args, chosen.name)
    return reference(x, weight, *args)


OPS = {"depthwise_conv2d": Op(depthwise_conv2d, reference)}


def sample_inputs(device, dtype, shape=(2, 3, 5, 3)) -> list[Sample]:
    x, w = tensor(shape, device, dtype, channels_last=True), tensor((shape[1], 1, 3, 3), device, dtype, seed=1)
    return [Sample("depthwise_conv2d", [x, w], lambda b, x, w: depthwise_conv2d(x, w, 1, 1, backend=b)),
            Sample("depthwise_conv2d_frozen", [x], lambda b, x: depthwise_conv2d(x, w, 2, 1, backend=b))]
