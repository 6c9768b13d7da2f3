"""The ``cpu`` and ``cuda`` backends: the compiled operators of ``fastnas._C`` (``torch.ops.fastnas.*``).

The schemas and the CPU / CUDA kernels are C++ (``csrc/``); this module registers what the compiler stack needs from
Python: a fake (meta) implementation of every operator, so that ``torch.compile`` and ``opcheck`` can trace them, and
the autograd formula of each forward operator, whose backward is itself an operator. Only what a backward needs is
saved: ``mixed_sum`` keeps its inputs only when the weights need a gradient, the pools keep their int32 argmax, and
the scales keep ``x`` only when the logits need a gradient.

Layouts: outputs shaped like an input keep its layout; ``spatial_pool``'s [N, 2, H, W] result is always channels_last
(the (max, mean) pair of each position side by side), which makes the 7x7 convolution after it in a CBAM spatial gate
about 3x faster on the CPU than an NCHW result.

If the library was not built (or fails to load) this module still imports; :func:`backend_available` says why the
backends are missing and the dispatcher falls back to the ``reference`` backend.
"""
from __future__ import annotations

import torch

from . import _checks, _gates, _pool2d
from ._depthwise import depthwise_conv2d  # noqa: F401  (the backend's depthwise convolution)
from ._normalized_sum import normalized_mixed_sum  # noqa: F401  (the backend's node sum with batch norms)
from ._pool2d import avg_pool2d, max_pool2d  # noqa: F401  (the backend's pooling)
from ._single_conv import single_channel_conv2d  # noqa: F401  (the backend's convolution to one channel)

_LOAD_ERROR: str | None = None


def _registered_elsewhere() -> bool:
    """The operators may already be in this process, from the CMake build loaded with torch.ops.load_library:
    loading fastnas._C as well would define the same schemas twice (a fatal error in the dispatcher)."""
    try:
        torch.ops.fastnas.mixed_sum  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


try:
    if not _registered_elsewhere():
        from fastnas import _C  # noqa: F401  (loading the library registers torch.ops.fastnas.*)
except ImportError as exc:  # not built, or built against another torch
    _LOAD_ERROR = (f"the compiled library fastnas._C is not available ({exc}); "
                   "build it with `pip install --no-build-isolation -e .`")

custom_ops: dict = {}


def backend_available(name: str) -> tuple[bool, str]:
    """``cpu``: the library is loaded; ``cuda``: it was also compiled with the CUDA kernels."""
    if _LOAD_ERROR is not None:
        return False, _LOAD_ERROR
    if name == "cuda" and not compiled_with_cuda():
        return False, "fastnas._C was built without CUDA kernels (rebuild with a CUDA toolkit or FASTNAS_CUDA=1)"
    return True, "available"


def compiled_with_cuda() -> bool:
    return _LOAD_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key("fastnas::mixed_sum", "CUDA")


def cuda_arch_list() -> list[int]:
    """The CUDA architectures compiled into the library (e.g. [800, 900]); empty without CUDA."""
    return [] if _LOAD_ERROR is not None else list(torch.ops.fastnas.cuda_arch_list())


def cpu_capability() -> str:
    """Which CPU kernels are in use: "avx2" or "default" (the portable ones; FASTNAS_CPU_CAPABILITY=default forces
    them); empty without the library."""
    return "" if _LOAD_ERROR is not None else str(torch.ops.fastnas.cpu_capability())


def _format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


if _LOAD_ERROR is None:
    _ops = torch.ops.fastnas

    # ---------------------------------------------------------------------------------------------- fake kernels
    # Shapes, dtypes and strides exactly as the C++ kernels produce them (outputs shaped like an input use
    # empty_like), with the same argument checks.

    @torch.library.register_fake("fastnas::mixed_sum")
    def _(xs, weights):
        _checks.check_mixed_sum(xs, weights)
        return torch.empty_like(xs[0])

    @torch.library.register_fake("fastnas::mixed_sum_backward")
    def _(grad, xs, weights, need_xs_grad):
        grads = [torch.empty_like(grad) for _ in xs] if need_xs_grad else []
        return grads, torch.empty_like(weights)

    @torch.library.register_fake("fastnas::mixed_sum_backward_xs")
    def _(grad, weights):
        return [torch.empty_like(grad) for _ in range(weights.shape[0])]

    @torch.library.register_fake("fastnas::channel_pool")
    def _(x):
        _checks.check_4d("channel_pool", "x", x)
        n, c = x.shape[:2]
        return x.new_empty(n, c), x.new_empty(n, c), x.new_empty(n, c, dtype=torch.int32)

    @torch.library.register_fake("fastnas::channel_pool_backward")
    def _(grad_avg, grad_max, argmax, H, W, channels_last):
        n, c = grad_avg.shape
        return torch.empty((n, c, H, W), dtype=grad_avg.dtype, device=grad_avg.device,
                           memory_format=_format(channels_last))

    @torch.library.register_fake("fastnas::spatial_pool")
    def _(x):
        _checks.check_4d("spatial_pool", "x", x)
        n, _, h, w = x.shape
        # always channels_last: (max, mean) side by side per position, the layout the 7x7 convolution of a CBAM
        # spatial gate runs fastest on
        out = torch.empty((n, 2, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
        return out, x.new_empty(n, h, w, dtype=torch.int32)

    @torch.library.register_fake("fastnas::spatial_pool_backward")
    def _(grad, argmax, C, channels_last):
        n, _, h, w = grad.shape
        return torch.empty((n, C, h, w), dtype=grad.dtype, device=grad.device, memory_format=_format(channels_last))

    @torch.library.register_fake("fastnas::channel_scale")
    def _(x, logits):
        _checks.check_scale("channel_scale", x, logits, _checks.channel_scale_logits_shape(x))
        return torch.empty_like(x)

    @torch.library.register_fake("fastnas::spatial_scale")
    def _(x, logits):
        _checks.check_scale("spatial_scale", x, logits, _checks.spatial_scale_logits_shape(x))
        return torch.empty_like(x)

    def _fake_scale_backward(grad, x, logits, need_x_grad):
        gx = torch.empty_like(grad) if need_x_grad else grad.new_empty(0)
        return gx, torch.empty_like(logits)

    torch.library.register_fake("fastnas::channel_scale_backward", _fake_scale_backward)

    torch.library.register_fake("fastnas::spatial_scale_backward", _fake_scale_backward)

    @torch.library.register_fake("fastnas::channel_gate")
    def _(x, w1, b1, w2, b2):
        _gates.check_inputs(x, w1, b1, w2, b2)
        n, c = x.shape[:2]
        hidden = w1.shape[0]
        return (torch.empty_like(x), x.new_empty(2 * n, c), x.new_empty(2 * n, hidden), x.new_empty(n, c),
                x.new_empty(n, c, dtype=torch.int32))

    @torch.library.register_fake("fastnas::channel_gate_backward")
    def _(grad, x, argmax, logits, hidden, w1, w2, need_x_grad):
        gx = torch.empty_like(grad) if need_x_grad else grad.new_empty(0)
        return gx, torch.empty_like(logits, memory_format=torch.contiguous_format), \
            torch.empty_like(hidden, memory_format=torch.contiguous_format)

    @torch.library.register_fake("fastnas::depthwise_conv2d_weight_grad")
    def _(grad, x, kernel_size, stride, padding, dilation):
        return x.new_empty((x.shape[1], 1, kernel_size[0], kernel_size[1]))

    @torch.library.register_fake("fastnas::batch_norm_train")
    def _(x, running_mean, running_var, momentum, eps):
        acc = _checks.acc_dtype(x.dtype)
        return _checks.empty_in_layout(x.shape, x, _checks.prefers_channels_last(x)), x.new_empty((x.shape[1],),
                                                                                                dtype=acc)

    @torch.library.register_fake("fastnas::batch_norm_backward")
    def _(grad, y, invstd):
        return _checks.empty_in_layout(y.shape, y, _checks.prefers_channels_last(y))

    @torch.library.register_fake("fastnas::batch_norm_affine_train")
    def _(x, weight, bias, running_mean, running_var, momentum, eps):
        acc = _checks.acc_dtype(x.dtype)
        stat = x.new_empty((x.shape[1],), dtype=acc)
        return _checks.empty_in_layout(x.shape, x, _checks.prefers_channels_last(x)), stat, torch.empty_like(stat)

    @torch.library.register_fake("fastnas::batch_norm_affine_backward")
    def _(grad, x, weight, mean, invstd, need_x_grad):
        gx = _checks.empty_in_layout(x.shape, x, _checks.prefers_channels_last(x)) if need_x_grad else x.new_empty(0)
        return gx, torch.empty_like(weight), torch.empty_like(weight)

    @torch.library.register_fake("fastnas::normalized_mixed_sum")
    def _(zs, weights, num_normalized, running_means, running_vars, momentum, eps):
        z = zs[0]
        acc = _checks.acc_dtype(z.dtype)
        stats = z.new_empty((num_normalized, z.shape[1]), dtype=acc)
        return _checks.empty_in_layout(z.shape, z, _checks.prefers_channels_last(z)), stats, torch.empty_like(stats)

    @torch.library.register_fake("fastnas::normalized_mixed_sum_backward")
    def _(grad, zs, weights, means, invstds, need_zs_grad, need_weights_grad):
        like = zs[0] if len(zs) else grad
        cl = _checks.prefers_channels_last(grad) or _checks.prefers_channels_last(like)
        acc = _checks.acc_dtype(grad.dtype)
        gzs = [_checks.empty_in_layout(grad.shape, grad, cl) for _ in range(weights.shape[0])] if need_zs_grad else []
        return gzs, grad.new_empty((weights.shape[0] if need_weights_grad else 0,), dtype=acc)

    @torch.library.register_fake("fastnas::single_channel_conv2d")
    def _(x, weight, padding):
        shape = (x.shape[0], 1, x.shape[2] + 2 * padding[0] - weight.shape[2] + 1,
                 x.shape[3] + 2 * padding[1] - weight.shape[3] + 1)
        fmt = torch.channels_last if _checks.prefers_channels_last(x) else torch.contiguous_format
        return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)

    @torch.library.register_fake("fastnas::single_channel_conv2d_backward")
    def _(grad, x, weight, padding, need_x_grad, need_weight_grad):
        fmt = torch.channels_last if _checks.prefers_channels_last(x) else torch.contiguous_format
        gx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt) if need_x_grad \
            else x.new_empty((0,))
        gw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight_grad \
            else x.new_empty((0,), dtype=_checks.acc_dtype(x.dtype))
        return gx, gw

    _pool2d.register()

    # ---------------------------------------------------------------------------------------------- autograd

    def _mixed_sum_setup(ctx, inputs, output):
        xs, weights = inputs
        need = ctx.needs_input_grad  # flat here: one flag per xs[k], then weights (then internal metadata)
        k = len(xs)
        ctx.num_inputs = k
        ctx.need_w = bool(need[k])
        ctx.need_xs = any(need[:k])
        if ctx.need_w:  # the weight gradient reads the inputs
            ctx.save_for_backward(weights, *xs)
        else:  # the input gradients need only the weights: keep no reference to the inputs
            ctx.save_for_backward(weights)

    def _mixed_sum_backward(ctx, grad):
        weights, *xs = ctx.saved_tensors
        k = ctx.num_inputs
        gxs, gw = [None] * k, None
        if ctx.need_w:
            grads, gw = _ops.mixed_sum_backward(grad, xs, weights, ctx.need_xs)
            if ctx.need_xs:
                gxs = list(grads)
        elif ctx.need_xs:
            gxs = list(_ops.mixed_sum_backward_xs(grad, weights))
        return gxs, gw

    torch.library.register_autograd("fastnas::mixed_sum", _mixed_sum_backward, setup_context=_mixed_sum_setup)

    def _channel_pool_setup(ctx, inputs, output):
        (x,) = inputs
        _, _, argmax = output
        ctx.mark_non_differentiable(argmax)
        ctx.save_for_backward(argmax)
        ctx.hw = (x.shape[2], x.shape[3])
        ctx.channels_last = _checks.prefers_channels_last(x)

    def _channel_pool_backward(ctx, grad_avg, grad_max, _grad_argmax):
        (argmax,) = ctx.saved_tensors
        h, w = ctx.hw
        return _ops.channel_pool_backward(grad_avg, grad_max, argmax, h, w, ctx.channels_last)

    torch.library.register_autograd("fastnas::channel_pool", _channel_pool_backward, setup_context=_channel_pool_setup)

    def _spatial_pool_setup(ctx, inputs, output):
        (x,) = inputs
        _, argmax = output
        ctx.mark_non_differentiable(argmax)
        ctx.save_for_backward(argmax)
        ctx.channels = x.shape[1]
        ctx.channels_last = _checks.prefers_channels_last(x)

    def _spatial_pool_backward(ctx, grad, _grad_argmax):
        (argmax,) = ctx.saved_tensors
        return _ops.spatial_pool_backward(grad, argmax, ctx.channels, ctx.channels_last)

    torch.library.register_autograd("fastnas::spatial_pool", _spatial_pool_backward, setup_context=_spatial_pool_setup)

    def _make_scale_autograd(forward_op, backward_op):
        def setup(ctx, inputs, output):
            x, logits = inputs
            ctx.need_x, ctx.need_logits = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
            # grad x = grad * sigmoid(logits) needs only the logits; grad logits also reads x
            ctx.save_for_backward(logits, x if ctx.need_logits else None)

        def backward(ctx, grad):
            logits, x = ctx.saved_tensors
            if not ctx.need_logits:
                return (forward_op(grad, logits) if ctx.need_x else None), None
            gx, glogits = backward_op(grad, x, logits, ctx.need_x)
            return (gx if ctx.need_x else None), glogits

        return backward, setup

    _cs_backward, _cs_setup = _make_scale_autograd(_ops.channel_scale.default, _ops.channel_scale_backward.default)
    torch.library.register_autograd("fastnas::channel_scale", _cs_backward, setup_context=_cs_setup)
    _ss_backward, _ss_setup = _make_scale_autograd(_ops.spatial_scale.default, _ops.spatial_scale_backward.default)
    torch.library.register_autograd("fastnas::spatial_scale", _ss_backward, setup_context=_ss_setup)

    _gates.COMPOSED_OPS["library"] = (
        _ops.channel_pool.default, _ops.channel_scale.default,
        lambda grad, x, logits: _ops.channel_scale_backward.default(grad, x, logits, False)[1])

    custom_ops = {
        "mixed_sum": _ops.mixed_sum,
        "channel_pool": _ops.channel_pool,
        "channel_scale": _ops.channel_scale,
        "spatial_pool": _ops.spatial_pool,
        "spatial_scale": _ops.spatial_scale,
        "max_pool2d": _ops.max_pool2d,
        "avg_pool2d": _ops.avg_pool2d,
        "depthwise_conv2d_weight_grad": _ops.depthwise_conv2d_weight_grad,
        "batch_norm_train": _ops.batch_norm_train,
        "batch_norm_backward": _ops.batch_norm_backward,
        "batch_norm_affine_train": _ops.batch_norm_affine_train,
        "batch_norm_affine_backward": _ops.batch_norm_affine_backward,
        "normalized_mixed_sum": _ops.normalized_mixed_sum,
        "single_channel_conv2d": _ops.single_channel_conv2d,
    }


# ---------------------------------------------------------------------------------------------- the backend's ops

def mixed_sum(xs: list, weights: torch.Tensor) -> torch.Tensor:
    return torch.ops.fastnas.mixed_sum.default(xs, weights)


def channel_pool(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    avg, mx, _ = torch.ops.fastnas.channel_pool.default(x)
    return avg, mx


def channel_scale(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return torch.ops.fastnas.channel_scale.default(x, logits)


def spatial_pool(x: torch.Tensor) -> torch.Tensor:
    out, _ = torch.ops.fastnas.spatial_pool.default(x)
    return out


def spatial_scale(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return torch.ops.fastnas.spatial_scale.default(x, logits)


def channel_attention(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                      b2: torch.Tensor | None) -> torch.Tensor:
    """The whole channel gate (:func:`fastnas.ops._gates.channel_attention`): the CPU's whole-gate kernels, the
    pool and scale kernels on CUDA."""
    kernels = _gates.WHOLE_GATE if x.device.type == "cpu" else "library"
    return _gates.channel_attention(kernels, channel_pool, channel_scale, x, w1, b1, w2, b2)


def batch_norm_train(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, momentum: float,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine-free training-mode batch norm of a CPU tensor: (y, invstd), running statistics updated in place."""
    return torch.ops.fastnas.batch_norm_train.default(x, running_mean, running_var, momentum, eps)


def batch_norm_backward(grad: torch.Tensor, y: torch.Tensor, invstd: torch.Tensor) -> torch.Tensor:
    """The input gradient of :func:`batch_norm_train` from its output."""
    return torch.ops.fastnas.batch_norm_backward.default(grad, y, invstd)


def batch_norm_affine_train(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
                            running_var: torch.Tensor, momentum: float,
                            eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Affine training-mode batch norm of a CPU tensor: (y, mean, invstd), running statistics updated in place."""
    return torch.ops.fastnas.batch_norm_affine_train.default(x, weight, bias, running_mean, running_var, momentum, eps)


def batch_norm_affine_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                               invstd: torch.Tensor, need_x_grad: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    """(grad x or an empty tensor, grad weight, grad bias) of :func:`batch_norm_affine_train`."""
    return torch.ops.fastnas.batch_norm_affine_backward.default(grad, x, weight, mean, invstd, need_x_grad)
