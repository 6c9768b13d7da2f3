"""The ``triton`` backend: the five fused ops as Triton kernels (``fastnas.kernels``), registered as torch custom ops.

Every op, forward and backward, is a ``torch.library.custom_op`` in the ``fastnas_triton`` namespace whose body calls
the kernel launcher, with a ``register_fake`` implementation (shapes, dtypes and strides only) and, for the forward
ops, ``register_autograd``. This is the registration that works for CUDA tensors and, under ``TRITON_INTERPRET=1``,
for CPU tensors in the Triton interpreter, with ``opcheck`` and ``torch.compile(fullgraph=True)`` (``triton_op`` with
``wrap_triton`` does not under the interpreter). The ops are opaque to Inductor: it schedules them, it does not fuse
into them.

All dtypes run in Triton, fp64 included (fp64 accumulation); nothing falls back to the reference implementation.

Public functions check their arguments with :mod:`fastnas.ops._checks` (the same errors as every backend) and return
what the contract says; the custom ops in :data:`custom_ops` may return more (the pools also return the int32 index
of the maximum, which their backward uses instead of reading x again).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch

from . import _checks, _gates

try:
    import triton  # noqa: F401

    from fastnas.kernels import mixed_sum as _k_mixed_sum
    from fastnas.kernels import pooling as _k_pool
    from fastnas.kernels import scale as _k_scale
    from fastnas.kernels._common import empty_like_npr

    _IMPORT_ERROR: str | None = None
except Exception as exc:  # pragma: no cover - exercised only where triton is missing
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

NAMESPACE = "fastnas_triton"


def backend_available(name: str = "triton") -> tuple[bool, str]:
    """Whether triton and the kernels import here (the device rules are the dispatcher's)."""
    if _IMPORT_ERROR is not None:
        return False, f"triton kernels cannot be imported ({_IMPORT_ERROR})"
    return True, ""


if _IMPORT_ERROR is not None:  # pragma: no cover
    raise ImportError(_IMPORT_ERROR)


Tensor = torch.Tensor


def _device_guard(t: Tensor):
    """Triton launches on the current CUDA device: make it the tensor's."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _needs(ctx, n_inputs: int) -> list[bool]:
    """``ctx.needs_input_grad`` flattened to one bool per tensor input (list inputs spread out)."""
    flat: list[bool] = []
    for v in ctx.needs_input_grad:
        if isinstance(v, (list, tuple)):
            flat.extend(bool(b) for b in v)
        else:
            flat.append(bool(v))
    return flat[:n_inputs]


def _grad_buffer(shape: Sequence[int], dtype: torch.dtype, device: torch.device, channels_last: bool) -> Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device=device, memory_format=fmt)


# ---------------------------------------------------------------------------------------------------------------------
# mixed_sum


@torch.library.custom_op(f"{NAMESPACE}::mixed_sum", mutates_args=())
def _mixed_sum(xs: list[Tensor], weights: Tensor) -> Tensor:
    with _device_guard(xs[0]):
        return _k_mixed_sum.mixed_sum_forward(xs, weights)


@_mixed_sum.register_fake
def _(xs, weights):
    return _k_mixed_sum.output_like(xs[0])


@torch.library.custom_op(f"{NAMESPACE}::mixed_sum_backward", mutates_args=())
def _mixed_sum_backward(
    grad: Tensor, xs: list[Tensor], weights: Tensor, need_xs: bool, need_w: bool
) -> tuple[list[Tensor], Tensor]:
    """(grad of each xs[k] or [] , grad of the weights or an empty tensor). ``xs`` is [] unless ``need_w``."""
    with _device_guard(grad):
        gxs, gw = _k_mixed_sum.mixed_sum_backward(grad, xs, weights, need_xs, need_w)
    return gxs, gw if gw is not None else weights.new_empty(0)


@_mixed_sum_backward.register_fake
def _(grad, xs, weights, need_xs, need_w):
    like = xs[0] if len(xs) else grad
    gxs = [_k_mixed_sum.output_like(like) for _ in range(weights.shape[0])] if need_xs else []
    return gxs, torch.empty_like(weights, memory_format=torch.contiguous_format) if need_w else weights.new_empty(0)


def _mixed_sum_setup(ctx, inputs, output):
    xs, weights = inputs
    needs = _needs(ctx, len(xs) + 1)
    ctx.k = len(xs)
    ctx.need_xs, ctx.need_w = any(needs[: len(xs)]), needs[len(xs)]
    # the inputs are kept only for the weights' gradient; grad xs[k] = w[k]·g needs the weights alone
    ctx.save_for_backward(weights, *(xs if ctx.need_w else ()))


def _mixed_sum_grad(ctx, grad):
    weights, *xs = ctx.saved_tensors
    gxs, gw = _mixed_sum_backward(grad, xs, weights, ctx.need_xs, ctx.need_w)
    return (gxs if ctx.need_xs else [None] * ctx.k), (gw if ctx.need_w else None)


_mixed_sum.register_autograd(_mixed_sum_grad, setup_context=_mixed_sum_setup)


def mixed_sum(xs: list[Tensor], weights: Tensor) -> Tensor:
    _checks.check_mixed_sum(xs, weights)
    return _mixed_sum(list(xs), weights)


# ---------------------------------------------------------------------------------------------------------------------
# channel_pool and spatial_pool


@torch.library.custom_op(f"{NAMESPACE}::channel_pool", mutates_args=())
def _channel_pool(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(mean [N, C], max [N, C], int32 index of the first maximum in H·W [N, C])."""
    n, c = x.shape[:2]
    mean, mx = x.new_empty(n, c), x.new_empty(n, c)
    idx = torch.empty(n, c, dtype=torch.int32, device=x.device)
    with _device_guard(x):
        _k_pool.pool_forward(x, False, mean, mx, idx)
    return mean, mx, idx


@_channel_pool.register_fake
def _(x):
    n, c = x.shape[:2]
    return x.new_empty(n, c), x.new_empty(n, c), x.new_empty(n, c, dtype=torch.int32)


@torch.library.custom_op(f"{NAMESPACE}::channel_pool_backward", mutates_args=())
def _channel_pool_backward(
    grad_mean: Optional[Tensor], grad_max: Optional[Tensor], idx: Tensor, shape: list[int], dtype: torch.dtype,
    channels_last: bool,
) -> Tensor:
    gx = _grad_buffer(shape, dtype, idx.device, channels_last)
    with _device_guard(idx):
        return _k_pool.pool_backward(gx, False, grad_mean, grad_max, idx)


@_channel_pool_backward.register_fake
def _(grad_mean, grad_max, idx, shape, dtype, channels_last):
    return _grad_buffer(shape, dtype, idx.device, channels_last)


def _pool_setup(ctx, inputs, output):
    (x,) = inputs
    ctx.meta = (list(x.shape), x.dtype, _checks.prefers_channels_last(x))
    ctx.save_for_backward(output[-1])


def _channel_pool_grad(ctx, grad_mean, grad_max, _grad_idx):
    (idx,) = ctx.saved_tensors
    return _channel_pool_backward(grad_mean, grad_max, idx, *ctx.meta)


_channel_pool.register_autograd(_channel_pool_grad, setup_context=_pool_setup)


def channel_pool(x: Tensor) -> tuple[Tensor, Tensor]:
    _checks.check_4d("channel_pool", "x", x)
    if x.shape[2] * x.shape[3] == 0:
        raise ValueError(f"fastnas.channel_pool: x has no spatial elements (shape {list(x.shape)}), the max is undefined")
    mean, mx, _ = _channel_pool(x)
    return mean, mx


@torch.library.custom_op(f"{NAMESPACE}::spatial_pool", mutates_args=())
def _spatial_pool(x: Tensor) -> tuple[Tensor, Tensor]:
    """([N, 2, H, W]: max over C, then mean over C; int32 index of the first maximal channel [N, H·W])."""
    n, _, h, w = x.shape
    out = x.new_empty(n, 2, h, w)
    idx = torch.empty(n, h * w, dtype=torch.int32, device=x.device)
    o3 = out.view(n, 2, h * w)
    with _device_guard(x):
        _k_pool.pool_forward(x, True, o3[:, 1], o3[:, 0], idx)
    return out, idx


@_spatial_pool.register_fake
def _(x):
    n, _, h, w = x.shape
    return x.new_empty(n, 2, h, w), x.new_empty(n, h * w, dtype=torch.int32)


@torch.library.custom_op(f"{NAMESPACE}::spatial_pool_backward", mutates_args=())
def _spatial_pool_backward(
    grad: Tensor, idx: Tensor, shape: list[int], dtype: torch.dtype, channels_last: bool
) -> Tensor:
    gx = _grad_buffer(shape, dtype, idx.device, channels_last)
    if gx.numel() == 0:
        return gx
    n, _, h, w = grad.shape
    g3 = grad if (h <= 1 or w <= 1 or grad.stride(2) == w * grad.stride(3)) else grad.contiguous()
    g3 = g3.view(n, 2, h * w) if g3.numel() else g3.reshape(n, 2, h * w)
    with _device_guard(idx):
        return _k_pool.pool_backward(gx, True, g3[:, 1], g3[:, 0], idx)


@_spatial_pool_backward.register_fake
def _(grad, idx, shape, dtype, channels_last):
    return _grad_buffer(shape, dtype, idx.device, channels_last)


def _spatial_pool_grad(ctx, grad, _grad_idx):
    (idx,) = ctx.saved_tensors
    return _spatial_pool_backward(grad, idx, *ctx.meta)


_spatial_pool.register_autograd(_spatial_pool_grad, setup_context=_pool_setup)


def spatial_pool(x: Tensor) -> Tensor:
    _checks.check_4d("spatial_pool", "x", x)
    if x.shape[1] == 0:
        raise ValueError(f"fastnas.spatial_pool: x has no channels (shape {list(x.shape)}), the max is undefined")
    out, _ = _spatial_pool(x)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# channel_scale and spatial_scale


def _scale_ops(name: str, spatial: bool):
    @torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=())
    def fwd(x: Tensor, logits: Tensor) -> Tensor:
        y = empty_like_npr(x)
        with _device_guard(x):
            return _k_scale.scale_forward(x, logits, spatial, y)

    @fwd.register_fake
    def _(x, logits):
        return empty_like_npr(x)

    @torch.library.custom_op(f"{NAMESPACE}::{name}_backward", mutates_args=())
    def bwd(grad: Tensor, x: Optional[Tensor], logits: Tensor, need_x: bool, need_logits: bool) -> tuple[Tensor, Tensor]:
        """(grad of x or an empty tensor, grad of the logits or an empty tensor); ``x`` only if ``need_logits``."""
        gx = empty_like_npr(grad) if need_x else grad.new_empty(0)
        gl = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if need_logits else logits.new_empty(0)
        with _device_guard(grad):
            _k_scale.scale_backward(grad, x, logits, spatial, gx if need_x else None, gl if need_logits else None)
        return gx, gl

    @bwd.register_fake
    def _(grad, x, logits, need_x, need_logits):
        gx = empty_like_npr(grad) if need_x else grad.new_empty(0)
        gl = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if need_logits else logits.new_empty(0)
        return gx, gl

    def setup(ctx, inputs, output):
        x, logits = inputs
        ctx.need_x, ctx.need_logits = _needs(ctx, 2)
        # x is kept only for the logits' gradient; grad x = g·sigmoid(logits) needs the logits alone
        ctx.save_for_backward(logits, x if ctx.need_logits else None)

    def grad_fn(ctx, grad):
        logits, x = ctx.saved_tensors
        gx, gl = bwd(grad, x, logits, ctx.need_x, ctx.need_logits)
        return (gx if ctx.need_x else None), (gl if ctx.need_logits else None)

    fwd.register_autograd(grad_fn, setup_context=setup)
    return fwd, bwd


_channel_scale, _channel_scale_backward = _scale_ops("channel_scale", spatial=False)
_spatial_scale, _spatial_scale_backward = _scale_ops("spatial_scale", spatial=True)


def channel_scale(x: Tensor, logits: Tensor) -> Tensor:
    _checks.check_scale("channel_scale", x, logits, _checks.channel_scale_logits_shape(x))
    return _channel_scale(x, logits)


def spatial_scale(x: Tensor, logits: Tensor) -> Tensor:
    _checks.check_scale("spatial_scale", x, logits, _checks.spatial_scale_logits_shape(x))
    return _spatial_scale(x, logits)


def channel_attention(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor]) -> Tensor:
    """The whole channel gate on the Triton kernels (:func:`fastnas.ops._gates.channel_attention`)."""
    return _gates.channel_attention("triton", channel_pool, channel_scale, x, w1, b1, w2, b2)


_gates.COMPOSED_OPS["triton"] = (
    _channel_pool, _channel_scale, lambda grad, x, logits: _channel_scale_backward(grad, x, logits, False, True)[1])

custom_ops = {
    "mixed_sum": _mixed_sum,
    "channel_pool": _channel_pool,
    "channel_scale": _channel_scale,
    "spatial_pool": _spatial_pool,
    "spatial_scale": _spatial_scale,
}
