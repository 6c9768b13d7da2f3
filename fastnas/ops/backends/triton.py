"""The ``triton`` backend: the required kernels of the interface as Triton kernels (``fastnas.kernels``).

Each kernel is a torch custom op ``fastnas_triton::<kernel>`` with the interface's schema, whose body calls the
kernel launcher; fakes and autograd come from the op modules through
:func:`fastnas.ops.backend.register_backend`. This registration works for CUDA tensors and, under
``TRITON_INTERPRET=1``, for CPU tensors in the Triton interpreter, with ``opcheck`` and
``torch.compile(fullgraph=True)``; the ops are opaque to Inductor. All dtypes run in Triton (float64 accumulation for
float64). Outputs follow :mod:`fastnas.ops.layout`; where an output's H and W do not merge into one strided axis
(which the kernels need), the kernel writes a contiguous buffer that is then copied into it.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable

import torch
import triton  # noqa: F401  (fails here, not in a kernel module, where triton is missing)

from fastnas.kernels import mixed_sum as _k_mixed_sum
from fastnas.kernels import pooling as _k_pool
from fastnas.kernels import scale as _k_scale
from fastnas.kernels._common import hw_mergeable

from .. import layout
from ..backend import define_kernels, register_backend

NAMESPACE = "fastnas_triton"
Tensor = torch.Tensor


def _device_guard(t: Tensor):
    """Triton launches on the current CUDA device: make it the tensor's."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _into(out: Tensor, fill: Callable[[Tensor], object]) -> Tensor:
    """``fill(out)``, through a contiguous buffer where out's H and W do not merge."""
    if out.dim() != 4 or hw_mergeable(out):
        fill(out)
        return out
    buffer = torch.empty(out.shape, dtype=out.dtype, device=out.device)
    fill(buffer)
    return out.copy_(buffer)


def mixed_sum(xs: list[Tensor], weights: Tensor) -> Tensor:
    with _device_guard(xs[0]):
        return _k_mixed_sum.mixed_sum_forward(xs, weights)


def mixed_sum_backward(grad: Tensor, xs: list[Tensor], weights: Tensor, need_xs_grad: bool):
    with _device_guard(grad):
        return _k_mixed_sum.mixed_sum_backward(grad, xs, weights, need_xs_grad, True)


def mixed_sum_backward_xs(grad: Tensor, weights: Tensor) -> list[Tensor]:
    with _device_guard(grad):
        return _k_mixed_sum.mixed_sum_backward(grad, [], weights, True, False)[0]


def channel_pool(x: Tensor):
    n, c = x.shape[:2]
    mean, mx = x.new_empty(n, c), x.new_empty(n, c)
    idx = torch.empty(n, c, dtype=torch.int32, device=x.device)
    with _device_guard(x):
        _k_pool.pool_forward(x, False, mean, mx, idx)
    return mean, mx, idx


def channel_pool_backward(grad_avg: Tensor, grad_max: Tensor, argmax: Tensor, H: int, W: int,
                          channels_last: bool) -> Tensor:
    gx = layout.shaped((grad_avg.shape[0], grad_avg.shape[1], H, W), grad_avg, channels_last)
    with _device_guard(gx):
        return _k_pool.pool_backward(gx, False, grad_avg, grad_max, argmax)


def spatial_pool(x: Tensor):
    n, _, h, w = x.shape
    out = layout.shaped((n, 2, h, w), x, True)
    idx = torch.empty(n, h * w, dtype=torch.int32, device=x.device)
    o3 = out.view(n, 2, h * w)
    with _device_guard(x):
        _k_pool.pool_forward(x, True, o3[:, 1], o3[:, 0], idx)
    return out, idx.view(n, h, w)


def spatial_pool_backward(grad: Tensor, argmax: Tensor, C: int, channels_last: bool) -> Tensor:
    n, _, h, w = grad.shape
    gx = layout.shaped((n, C, h, w), grad, channels_last)
    if gx.numel() == 0:
        return gx
    g3 = (grad if hw_mergeable(grad) else grad.contiguous()).reshape(n, 2, h * w)
    with _device_guard(grad):
        return _k_pool.pool_backward(gx, True, g3[:, 1], g3[:, 0], argmax.reshape(n, h * w))


def _scale_kernels(op: str, spatial: bool) -> dict[str, Callable]:
    def forward(x: Tensor, logits: Tensor) -> Tensor:
        with _device_guard(x):
            return _into(layout.like(x), lambda y: _k_scale.scale_forward(x, logits, spatial, y))

    def backward(grad: Tensor, x: Tensor, logits: Tensor, need_x_grad: bool):
        gl = layout.like(logits)
        gl_buffer = gl if gl.is_contiguous() else torch.empty(logits.shape, dtype=gl.dtype, device=gl.device)
        with _device_guard(grad):
            if need_x_grad:
                gx = _into(layout.like(grad), lambda out: _k_scale.scale_backward(grad, x, logits, spatial, out,
                                                                                   gl_buffer))
            else:
                gx = grad.new_empty(0)
                _k_scale.scale_backward(grad, x, logits, spatial, None, gl_buffer)
        return gx, gl if gl_buffer is gl else gl.copy_(gl_buffer)

    return {op: forward, f"{op}_backward": backward}


custom_ops = define_kernels(NAMESPACE, {
    "mixed_sum": mixed_sum, "mixed_sum_backward": mixed_sum_backward, "mixed_sum_backward_xs": mixed_sum_backward_xs,
    "channel_pool": channel_pool, "channel_pool_backward": channel_pool_backward,
    "spatial_pool": spatial_pool, "spatial_pool_backward": spatial_pool_backward,
    **_scale_kernels("channel_scale", False), **_scale_kernels("spatial_scale", True),
})


def _runs_on(device_type: str) -> bool:
    """CUDA tensors; CPU tensors under the Triton interpreter only."""
    return device_type == "cuda" or (device_type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1")


register_backend("triton", custom_ops, _runs_on)
