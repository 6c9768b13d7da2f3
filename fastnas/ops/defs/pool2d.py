"""max_pool2d and avg_pool2d over kh×kw windows (DARTS's pooling candidates), and pool_pair: both of one input in
one call, stacked along the channels (max, then average), as the batched plan runs a state's two pooling candidates.

The max kernel returns, beside the pooled tensor, the window position of each first maximum in one byte (ATen keeps
an int64 index per output element); the average divides by the number of window elements inside the input
(``count_include_pad=False``). Both backwards are linear in the gradient; their references scatter by the saved
positions (max) or run ATen's average-pool backward, which does not read x, so higher derivatives are exact.
Windows of more than :data:`MAX_WINDOW` elements (whose positions do not fit a byte) run the reference. pool_pair's
backward sums both poolings' input gradients in one pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import checks, layout
from ..backend import select
from ..opdef import Kernel, Op, Sample, backward_kernels, tensor

_IntPair = tuple[int, int]
MAX_WINDOW = 255  # window positions are stored in one byte


def pool_args(op: str, kernel_size, stride, padding) -> tuple[_IntPair, _IntPair, _IntPair]:
    """(kernel_size, stride, padding) as pairs (stride defaults to the kernel size, as in ``F.max_pool2d``)."""
    k = checks.int_pair(op, "kernel_size", kernel_size, 1)
    s = k if stride is None or stride == () or stride == [] else checks.int_pair(op, "stride", stride, 1)
    p = checks.int_pair(op, "padding", padding, 0)
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise ValueError(f"fastnas.{op}: padding {list(p)} must be at most half the kernel size {list(k)}")
    return k, s, p


def check(op: str, x: torch.Tensor, kernel: _IntPair, padding: _IntPair) -> None:
    checks.check_4d(op, "x", x)
    if any(n + 2 * p < k for n, k, p in zip(x.shape[2:], kernel, padding)):
        raise ValueError(f"fastnas.{op}: the {kernel[0]}x{kernel[1]} window (padding {list(padding)}) does not fit "
                         f"an input of {x.shape[2]}x{x.shape[3]}")


def reference_max_pool2d(x: torch.Tensor, kernel: _IntPair, stride: _IntPair, padding: _IntPair) -> torch.Tensor:
    """The maximum of each kh×kw window (padding ignored)."""
    return F.max_pool2d(x, kernel, stride, padding)


def reference_avg_pool2d(x: torch.Tensor, kernel: _IntPair, stride: _IntPair, padding: _IntPair) -> torch.Tensor:
    """The mean of the window elements inside the input (count_include_pad=False)."""
    return F.avg_pool2d(x, kernel, stride, padding, count_include_pad=False)


def reference_pool_pair(x: torch.Tensor, kernel: _IntPair, stride: _IntPair, padding: _IntPair) -> torch.Tensor:
    """The max pool's then the average pool's outputs, concatenated along the channels."""
    return torch.cat([reference_max_pool2d(x, kernel, stride, padding),
                      reference_avg_pool2d(x, kernel, stride, padding)], 1)


def _out(shape, x: torch.Tensor, channels_last: bool, value: torch.Tensor) -> torch.Tensor:
    return layout.shaped(shape, x, channels_last, value.dtype).copy_(value)


def _max_kernel(x, kernel_size, stride, padding):
    out, index = F.max_pool2d_with_indices(x, kernel_size, stride, padding)
    w, kw = x.shape[3], kernel_size[1]
    oh = torch.arange(out.shape[2], device=x.device)[:, None] * stride[0] - padding[0]
    ow = torch.arange(out.shape[3], device=x.device)[None, :] * stride[1] - padding[1]
    pos = (index // w - oh) * kw + (index % w - ow)  # the window position kh_i·kw + kw_i
    cl = layout.prefers_channels_last(x)
    return _out(out.shape, x, cl, out), layout.shaped(out.shape, x, True, torch.uint8).copy_(pos)


def _max_backward_kernel(grad, argmax, H, W, kernel_size, stride, padding, channels_last):
    n, c, oh, ow = grad.shape
    pos = argmax.long()
    rows = torch.arange(oh, device=grad.device)[:, None] * stride[0] - padding[0] + pos // kernel_size[1]
    cols = torch.arange(ow, device=grad.device)[None, :] * stride[1] - padding[1] + pos % kernel_size[1]
    acc = layout.acc_dtype(grad.dtype)
    gx = grad.new_zeros((n, c, H * W), dtype=acc).scatter_add(2, (rows * W + cols).reshape(n, c, -1),
                                                              grad.to(acc).reshape(n, c, -1))
    return _out((n, c, H, W), grad, channels_last, gx.view(n, c, H, W).to(grad.dtype))


def _avg_kernel(x, kernel_size, stride, padding):
    out = reference_avg_pool2d(x, kernel_size, stride, padding)
    return _out(out.shape, x, layout.prefers_channels_last(x), out)


def _avg_backward_kernel(grad, H, W, kernel_size, stride, padding, channels_last):
    n, c = grad.shape[:2]
    shape_only = grad.new_empty((n, c, H, W))  # only its shape is read
    gx = torch.ops.aten.avg_pool2d_backward(grad, shape_only, kernel_size, stride, padding, False, False, None)
    return _out((n, c, H, W), grad, channels_last, gx)


def _pair_kernel(x, kernel_size, stride, padding):
    (out_max, pos), out_avg = _max_kernel(x, kernel_size, stride, padding), _avg_kernel(x, kernel_size, stride, padding)
    out = torch.cat([out_max, out_avg], 1)
    return _out(out.shape, x, layout.prefers_channels_last(x), out), pos


def _pair_backward_kernel(grad, argmax, H, W, kernel_size, stride, padding, channels_last):
    g_max, g_avg = grad.chunk(2, 1)
    return (_max_backward_kernel(g_max, argmax, H, W, kernel_size, stride, padding, channels_last)
            + _avg_backward_kernel(g_avg, H, W, kernel_size, stride, padding, channels_last))


KERNELS = {
    # (the pooled tensor, uint8 window position kh_i·kw + kw_i of each first maximum)
    "max_pool2d": Kernel("(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding) -> (Tensor, Tensor)",
                         _max_kernel),
    "max_pool2d_backward": Kernel("(Tensor grad, Tensor argmax, SymInt H, SymInt W, int[2] kernel_size, "
                                  "int[2] stride, int[2] padding, bool channels_last) -> Tensor", _max_backward_kernel),
    "avg_pool2d": Kernel("(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding) -> Tensor", _avg_kernel),
    "avg_pool2d_backward": Kernel("(Tensor grad, SymInt H, SymInt W, int[2] kernel_size, int[2] stride, "
                                  "int[2] padding, bool channels_last) -> Tensor", _avg_backward_kernel),
    # (max then average pooling [N, 2C, Ho, Wo], the max pool's uint8 window positions [N, C, Ho, Wo])
    "pool_pair": Kernel("(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding) -> (Tensor, Tensor)",
                        _pair_kernel),
    "pool_pair_backward": Kernel("(Tensor grad, Tensor argmax, SymInt H, SymInt W, int[2] kernel_size, "
                                 "int[2] stride, int[2] padding, bool channels_last) -> Tensor",
                                 _pair_backward_kernel),
}
REFERENCES = {name: k.reference for name, k in KERNELS.items()}


def _setup_context(ctx, inputs, output):
    x, ctx.kernel, ctx.stride, ctx.padding = inputs
    ctx.hw = (x.shape[2], x.shape[3])
    ctx.channels_last = layout.prefers_channels_last(x)
    if isinstance(output, tuple):  # max: keep the positions only (they have no gradient: none is made for them)
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(output[1])


def _positions_autograd(op: str):
    """The autograd of a pooling that keeps the max pool's window positions (max_pool2d, pool_pair)."""
    def factory(kernels: dict):
        def backward(ctx, grad, _grad_pos):
            if grad is None:
                return None, None, None, None
            (pos,) = ctx.saved_tensors
            run = backward_kernels(kernels, REFERENCES)
            return (run[f"{op}_backward"](grad, pos, *ctx.hw, ctx.kernel, ctx.stride, ctx.padding, ctx.channels_last),
                    None, None, None)

        return backward, _setup_context

    return factory


def _avg_autograd(kernels: dict):
    def backward(ctx, grad):
        run = backward_kernels(kernels, REFERENCES)
        return (run["avg_pool2d_backward"](grad, *ctx.hw, ctx.kernel, ctx.stride, ctx.padding, ctx.channels_last),
                None, None, None)

    return backward, _setup_context


AUTOGRAD = {"max_pool2d": _positions_autograd("max_pool2d"), "avg_pool2d": _avg_autograd,
            "pool_pair": _positions_autograd("pool_pair")}


_REFERENCE_OPS = {"max_pool2d": reference_max_pool2d, "avg_pool2d": reference_avg_pool2d,
                  "pool_pair": reference_pool_pair}


def _pool(op: str, x: torch.Tensor, kernel_size, stride, padding, backend: str | None) -> torch.Tensor:
    kernel, stride, padding = pool_args(op, kernel_size, stride, padding)
    check(op, x, kernel, padding)
    fused = select(x.device.type, backend).kernels.get(op)
    if fused is None or kernel[0] * kernel[1] > MAX_WINDOW:
        return _REFERENCE_OPS[op](x, kernel, stride, padding)
    out = fused(x, list(kernel), list(stride), list(padding))
    return out if op == "avg_pool2d" else out[0]


def max_pool2d(x: torch.Tensor, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] | None = None,
               padding: int | tuple[int, int] = 0, *, backend: str | None = None) -> torch.Tensor:
    """``F.max_pool2d(x, kernel_size, stride, padding)`` (no dilation, floor mode) on the backend's kernels where it
    has them."""
    return _pool("max_pool2d", x, kernel_size, stride, padding, backend)


def avg_pool2d(x: torch.Tensor, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] | None = None,
               padding: int | tuple[int, int] = 0, *, backend: str | None = None) -> torch.Tensor:
    """``F.avg_pool2d(x, kernel_size, stride, padding, count_include_pad=False)``: each output averages the window
    elements inside the input (DARTS's average pooling)."""
    return _pool("avg_pool2d", x, kernel_size, stride, padding, backend)


def pool_pair(x: torch.Tensor, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] | None = None,
              padding: int | tuple[int, int] = 0, *, backend: str | None = None) -> torch.Tensor:
    """``torch.cat([max_pool2d(x, ...), avg_pool2d(x, ...)], 1)`` in one call: [N, 2C, Ho, Wo], the max pool's
    channels first (the state's two pooling candidates in the batched plan)."""
    return _pool("pool_pair", x, kernel_size, stride, padding, backend)


OPS = {"max_pool2d": Op(max_pool2d, reference_max_pool2d), "avg_pool2d": Op(avg_pool2d, reference_avg_pool2d),
       "pool_pair": Op(pool_pair, reference_pool_pair)}


def sample_inputs(device, dtype, shape=(2, 3, 5, 3)) -> list[Sample]:
    x = tensor(shape, device, dtype, channels_last=True)
    return [Sample("max_pool2d", [x], lambda b, x: max_pool2d(x, 3, 2, 1, backend=b), amp=True),
            Sample("avg_pool2d", [x], lambda b, x: avg_pool2d(x, 3, 1, 1, backend=b), amp=True),
            Sample("pool_pair", [x], lambda b, x: pool_pair(x, 3, 1, 1, backend=b), amp=True),
            Sample("pool_pair_strided", [x], lambda b, x: pool_pair(x, 3, 2, 1, backend=b))]
