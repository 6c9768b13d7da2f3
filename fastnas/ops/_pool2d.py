"""Max and average pooling over kh×kw windows (DARTS's pooling candidates) on the ``cpu`` backend's kernels.

``fastnas::max_pool2d`` returns the pooled tensor and the window position of each maximum in one byte (ATen keeps an
int64 index per output element); ``fastnas::avg_pool2d`` divides by the number of window elements inside the input
(``count_include_pad=False``). Both are vectorised over channels on channels_last data and keep channels_last
results for channels_last inputs. This module registers their fake implementations and autograd formulas (the
backward ops are linear in the gradient and are not differentiated again).
"""
from __future__ import annotations

import torch

from . import _checks, reference

_IntPair = tuple[int, int]


def pool_args(op: str, kernel_size, stride, padding) -> tuple[_IntPair, _IntPair, _IntPair]:
    """(kernel_size, stride, padding) as pairs (stride defaults to the kernel size, as in ``F.max_pool2d``); a clear
    error for anything else."""
    k = _checks.int_pair(op, "kernel_size", kernel_size, 1)
    s = k if stride is None or stride == () or stride == [] else _checks.int_pair(op, "stride", stride, 1)
    p = _checks.int_pair(op, "padding", padding, 0)
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise ValueError(f"fastnas.{op}: padding {list(p)} must be at most half the kernel size {list(k)}")
    return k, s, p


def output_shape(x: torch.Tensor, kernel: _IntPair, stride: _IntPair, padding: _IntPair) -> list[int]:
    return [x.shape[0], x.shape[1]] + [(n + 2 * p - k) // s + 1 for n, k, s, p in
                                       zip(x.shape[2:], kernel, stride, padding)]


def check_input(op: str, x: torch.Tensor, kernel: _IntPair, padding: _IntPair) -> None:
    _checks.check_4d(op, "x", x)
    if any(n + 2 * p < k for n, k, p in zip(x.shape[2:], kernel, padding)):
        raise ValueError(f"fastnas.{op}: the {kernel[0]}x{kernel[1]} window (padding {list(padding)}) does not fit "
                         f"an input of {x.shape[2]}x{x.shape[3]}")


def max_pool2d(x: torch.Tensor, kernel: _IntPair, stride: _IntPair, padding: _IntPair) -> torch.Tensor:
    """The cpu backend's max pool (CPU tensors; others: PyTorch's)."""
    if x.device.type != "cpu":
        return reference.max_pool2d(x, kernel, stride, padding)
    return torch.ops.fastnas.max_pool2d.default(x, list(kernel), list(stride), list(padding))[0]


def avg_pool2d(x: torch.Tensor, kernel: _IntPair, stride: _IntPair, padding: _IntPair) -> torch.Tensor:
    """The cpu backend's average pool, count_include_pad=False (CPU tensors; others: PyTorch's)."""
    if x.device.type != "cpu":
        return reference.avg_pool2d(x, kernel, stride, padding)
    return torch.ops.fastnas.avg_pool2d.default(x, list(kernel), list(stride), list(padding))


def register() -> None:
    """Fake implementations and autograd of the pool ops (called once the compiled library is loaded)."""
    ops = torch.ops.fastnas

    @torch.library.register_fake("fastnas::max_pool2d")
    def _(x, kernel_size, stride, padding):
        shape = output_shape(x, kernel_size, stride, padding)
        pos = torch.empty(shape, dtype=torch.uint8, device=x.device, memory_format=torch.channels_last)
        return _checks.empty_in_layout(shape, x, _checks.prefers_channels_last(x)), pos

    @torch.library.register_fake("fastnas::avg_pool2d")
    def _(x, kernel_size, stride, padding):
        return _checks.empty_in_layout(output_shape(x, kernel_size, stride, padding), x,
                                       _checks.prefers_channels_last(x))

    def grad_like(grad, H, W, channels_last):
        return _checks.empty_in_layout((grad.shape[0], grad.shape[1], H, W), grad, channels_last)

    @torch.library.register_fake("fastnas::max_pool2d_backward")
    def _(grad, argmax, H, W, kernel_size, stride, padding, channels_last):
        return grad_like(grad, H, W, channels_last)

    @torch.library.register_fake("fastnas::avg_pool2d_backward")
    def _(grad, H, W, kernel_size, stride, padding, channels_last):
        return grad_like(grad, H, W, channels_last)

    def setup(ctx, inputs, output):
        x, ctx.kernel, ctx.stride, ctx.padding = inputs
        ctx.hw = (x.shape[2], x.shape[3])
        ctx.channels_last = _checks.prefers_channels_last(x)
        if isinstance(output, tuple):  # max: keep the positions only
            ctx.mark_non_differentiable(output[1])
            ctx.save_for_backward(output[1])

    def max_backward(ctx, grad, _grad_pos):
        (pos,) = ctx.saved_tensors
        return (ops.max_pool2d_backward(grad, pos, *ctx.hw, ctx.kernel, ctx.stride, ctx.padding, ctx.channels_last),
                None, None, None)

    def avg_backward(ctx, grad):
        return (ops.avg_pool2d_backward(grad, *ctx.hw, ctx.kernel, ctx.stride, ctx.padding, ctx.channels_last),
                None, None, None)

    torch.library.register_autograd("fastnas::max_pool2d", max_backward, setup_context=setup)
    torch.library.register_autograd("fastnas::avg_pool2d", avg_backward, setup_context=setup)
