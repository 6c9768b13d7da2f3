"""Stride-1 convolution of a few channels to one (a CBAM spatial gate's k×k convolution) on the ``cpu`` backend's
kernels (``fastnas::single_channel_conv2d`` and its backward): oneDNN spends 0.4–0.6 ms on the 2 → 1 7×7
convolution at batch 32, 32×32, for 3 MFLOP of arithmetic. The input is saved only when the weight needs a gradient;
double backward uses ATen's differentiable formulas.
"""
from __future__ import annotations

import torch

from . import _checks

# more input channels than this: oneDNN's GEMM-based convolution is the better choice
MAX_CHANNELS = 8


def applies(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int) -> bool:
    """Whether the kernels cover this convolution."""
    return (weight.shape[0] == 1 and groups == 1 and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)
            and isinstance(padding, tuple) and all(0 <= p < k for p, k in zip(padding, weight.shape[2:]))
            and x.shape[1] <= MAX_CHANNELS and x.device.type == "cpu" and x.dtype == weight.dtype
            and not torch.is_autocast_enabled("cpu"))


class SingleChannelConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
        ctx.conf = (x.shape, x.stride(), padding)
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        return torch.ops.fastnas.single_channel_conv2d(x, weight, list(padding))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        shape, strides, padding = ctx.conf
        need_x, need_w = ctx.needs_input_grad[:2]
        if x is None:  # only the input gradient: the kernel reads the input's shape and layout, not its values
            x = _checks.stand_in(shape, strides, grad)
        if torch.is_grad_enabled():  # double backward: ATen's formula is differentiable
            gx, gw, _ = torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1], list(padding), [1, 1],
                                                            False, [0, 0], 1, [need_x, need_w, False])
        else:
            gx, gw = torch.ops.fastnas.single_channel_conv2d_backward(grad, x, weight, list(padding), need_x, need_w)
        return (gx if need_x else None), (gw if need_w else None), None


def single_channel_conv2d(x: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
    """The cpu backend's stride-1 convolution to one channel (:func:`applies` must hold)."""
    if not (x.requires_grad or weight.requires_grad) or not torch.is_grad_enabled():
        return torch.ops.fastnas.single_channel_conv2d(x, weight, list(padding))
    return SingleChannelConv2d.apply(x, weight, padding)
