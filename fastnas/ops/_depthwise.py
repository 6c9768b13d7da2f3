"""Depthwise convolution (groups = channels, one filter per channel) whose CPU backward uses fastnas's kernels.

The forward is PyTorch's convolution (oneDNN on the CPU). The backward on the CPU:

* the weight gradient by ``fastnas::depthwise_conv2d_weight_grad`` (channels_last, vectorised over channels);
  oneDNN's depthwise weight gradient is 4-6x slower than its forward for 5x5 filters;
* at stride 1, the input gradient as the forward convolution of the gradient with the flipped filter (exact: a
  stride-1 convolution's transpose is the correlation with the flipped filter); oneDNN's backward-data path for
  depthwise filters is up to 10x slower than its forward path (dilated or 3x3 filters, channels_last).

The input is saved only when the weight needs a gradient. Double backward (``create_graph``) uses ATen's
differentiable formulas. Autocast and other devices run plain ``F.conv2d``; under ``torch.compile`` the function is
traced like any other (the weight-gradient kernel has a fake implementation).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _checks

_IntPair = tuple[int, int]


def check_inputs(x: torch.Tensor, weight: torch.Tensor) -> None:
    op = "depthwise_conv2d"
    _checks.check_4d(op, "x", x)
    _checks.check_4d(op, "weight", weight)
    C = x.shape[1]
    if weight.shape[0] != C or weight.shape[1] != 1:
        raise ValueError(f"fastnas.{op}: weight must have shape [{C}, 1, kh, kw] (one filter per channel of x), "
                         f"got {list(weight.shape)}")
    _checks.check_same_device(op, "weight", weight, "x", x)


def input_grad(grad: torch.Tensor, weight: torch.Tensor, like: torch.Tensor | tuple, stride: _IntPair,
               padding: _IntPair, dilation: _IntPair) -> torch.Tensor:
    """The input gradient; ``like`` is the input or its (shape, strides)."""
    kernel = weight.shape[-2:]
    flipped_padding = tuple(d * (k - 1) - p for k, p, d in zip(kernel, padding, dilation))
    if stride == (1, 1) and min(flipped_padding) >= 0:
        return F.conv2d(grad, weight.flip(-2, -1), None, 1, flipped_padding, dilation, weight.shape[0])
    shape, strides = (like.shape, like.stride()) if isinstance(like, torch.Tensor) else like
    # only the shape and layout of the input are read when only its gradient is asked for
    return torch.ops.aten.convolution_backward(grad, _checks.stand_in(shape, strides, grad), weight, None, stride,
                                               padding, dilation, False, [0, 0], weight.shape[0],
                                               [True, False, False])[0]


class DepthwiseConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, stride: _IntPair, padding: _IntPair,
                dilation: _IntPair) -> torch.Tensor:
        ctx.conf = (x.shape, x.stride(), stride, padding, dilation)
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        return F.conv2d(x, weight, None, stride, padding, dilation, x.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        shape, strides, stride, padding, dilation = ctx.conf
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_x = input_grad(grad, weight, (shape, strides), stride, padding, dilation) if need_x else None
        grad_w = None
        if need_w and torch.is_grad_enabled():  # double backward: ATen's formula is differentiable
            grad_w = torch.ops.aten.convolution_backward(grad, x, weight, None, stride, padding, dilation, False,
                                                         [0, 0], weight.shape[0], [False, True, False])[1]
        elif need_w:
            grad_w = torch.ops.fastnas.depthwise_conv2d_weight_grad(grad, x, list(weight.shape[-2:]), list(stride),
                                                                    list(padding), list(dilation))
        return grad_x, grad_w, None, None, None


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, stride: _IntPair, padding: _IntPair,
                     dilation: _IntPair) -> torch.Tensor:
    """The cpu backend's depthwise convolution (arguments already checked and normalised)."""
    if (x.device.type != "cpu" or torch.is_autocast_enabled("cpu") or x.dtype != weight.dtype
            or not (x.requires_grad or weight.requires_grad) or not torch.is_grad_enabled()):
        return F.conv2d(x, weight, None, stride, padding, dilation, x.shape[1])
    return DepthwiseConv2d.apply(x, weight, stride, padding, dilation)

