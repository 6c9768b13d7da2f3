"""batch_norm: training-mode batch norm (batch statistics, running statistics updated in place) that stores less.

* Affine-free: :class:`_OutputSavingBatchNorm` keeps its *output* y = x̂ and σ⁻¹ instead of its input (the backward
  needs only x̂): the tensor the next op consumes is then the one stored, and the input is freed. On a channels_last
  input it runs the backend's optional ``batch_norm_train`` / ``batch_norm_backward`` kernels (one pass fewer over x
  each way), else ATen's.
* Affine: on a channels_last float32/float64 input, the backend's optional ``batch_norm_affine_train`` /
  ``batch_norm_affine_backward`` kernels (:class:`_AffineBatchNorm`; ATen's channels_last batch norm takes several
  times longer on a few dozen channels); else ``F.batch_norm``.

Under ``create_graph`` both backwards are differentiable formulas, so double backward is exact. Under autocast, under
``torch.compile``, for other dtypes or without a backward to come, it is ``F.batch_norm``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import checks, layout
from ..backend import get, select
from ._kernel import Kernel

OP = "batch_norm"
_SHAPE = (1, -1, 1, 1)


def reference(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
              weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, momentum: float = 0.1,
              eps: float = 1e-5) -> torch.Tensor:
    """``F.batch_norm`` in training mode: batch statistics, the running ones moved by ``momentum``."""
    return F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)


def _layout_of(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return layout.shaped(x.shape, x, layout.prefers_channels_last(x), value.dtype).copy_(value)


def _train_kernel(x, running_mean, running_var, momentum, eps):
    acc = layout.acc_dtype(x.dtype)
    y, _, invstd = torch.ops.aten.native_batch_norm(x.to(acc), None, None, running_mean, running_var, True, momentum,
                                                    eps)
    return _layout_of(x, y.to(x.dtype)), invstd


def _backward_kernel(grad, y, invstd):
    acc = invstd.dtype
    g, yy, dims = grad.to(acc), y.to(acc), (0, 2, 3)
    gx = invstd.view(_SHAPE) * (g - g.mean(dims, keepdim=True) - yy * (g * yy).mean(dims, keepdim=True))
    return _layout_of(y, gx.to(y.dtype))


def _affine_train_kernel(x, weight, bias, running_mean, running_var, momentum, eps):
    y, mean, invstd = torch.ops.aten.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum,
                                                       eps)
    return _layout_of(x, y), mean, invstd


def _affine_backward_kernel(grad, x, weight, mean, invstd, need_x_grad):
    gx, gw, gb = torch.ops.aten.native_batch_norm_backward(grad, x, weight, None, None, mean, invstd, True, 0.0,
                                                           [need_x_grad, True, True])
    return (_layout_of(x, gx) if need_x_grad else x.new_empty(0)), gw, gb


KERNELS = {
    # affine-free: (y = (x - mean)·invstd, invstd [C] in the accumulation dtype); running statistics updated
    "batch_norm_train": Kernel("(Tensor x, Tensor(a!) running_mean, Tensor(b!) running_var, float momentum, "
                               "float eps) -> (Tensor, Tensor)", _train_kernel),
    # its input gradient from the output: invstd·(grad - mean(grad) - y·mean(grad·y)) per channel
    "batch_norm_backward": Kernel("(Tensor grad, Tensor y, Tensor invstd) -> Tensor", _backward_kernel),
    # affine: (y = weight·(x - mean)·invstd + bias, mean [C], invstd [C]); running statistics updated
    "batch_norm_affine_train": Kernel("(Tensor x, Tensor weight, Tensor bias, Tensor(a!) running_mean, "
                                      "Tensor(b!) running_var, float momentum, float eps) -> (Tensor, Tensor, Tensor)",
                                      _affine_train_kernel),
    # (grad x (an empty tensor unless need_x_grad), grad weight, grad bias)
    "batch_norm_affine_backward": Kernel("(Tensor grad, Tensor x, Tensor weight, Tensor mean, Tensor invstd, "
                                         "bool need_x_grad) -> (Tensor, Tensor, Tensor)", _affine_backward_kernel),
}
AUTOGRAD: dict = {}


class _OutputSavingBatchNorm(torch.autograd.Function):
    """Affine-free batch norm that saves its output y = x̂ and σ⁻¹ (both outputs) for the backward; ``backend``
    names the kernels (None: ATen's). Under ``create_graph`` the backward is written in differentiable ops of y
    and σ⁻¹, whose own gradients come back here, so double backward is exact too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, running_mean, running_var, momentum: float, eps: float,
                backend: str | None = None):
        if backend is not None:
            y, invstd = get(backend).kernels["batch_norm_train"](x, running_mean, running_var, momentum, eps)
        else:
            y, _, invstd = torch.ops.aten.native_batch_norm(x, None, None, running_mean, running_var, True, momentum,
                                                            eps)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(y, invstd)
        ctx.backend = backend
        return y, invstd

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor | None, grad_invstd: torch.Tensor | None):
        y, invstd = ctx.saved_tensors
        if grad_y is None:
            grad_input = None
        elif torch.is_grad_enabled():  # double backward: the same formula in differentiable ops
            dims = (0, 2, 3)
            grad_input = invstd.view(_SHAPE) * (grad_y - grad_y.mean(dims, keepdim=True)
                                                - y * (grad_y * y).mean(dims, keepdim=True))
        elif ctx.backend is not None:
            grad_input = get(ctx.backend).kernels["batch_norm_backward"](grad_y.to(y.dtype), y, invstd)
        else:
            # ATen's batch-norm backward with x̂ given as the input (mean 0, σ⁻¹ 1) and the true σ⁻¹ as the scale
            # γ: γ·(g − mean(g) − x̂·mean(g·x̂)) is exactly the input gradient of the affine-free norm
            grad_input = torch.ops.aten.native_batch_norm_backward(
                grad_y, y, invstd, None, None, torch.zeros_like(invstd), torch.ones_like(invstd), True, 0.0,
                [True, False, False])[0]
        if grad_invstd is not None:  # σ⁻¹ = (var + eps)^(-1/2): ∂σ⁻¹/∂x = −σ⁻² · y / M per channel
            count = y.numel() // y.shape[1]
            term = -(grad_invstd * invstd * invstd / count).view(_SHAPE) * y
            grad_input = term if grad_input is None else grad_input + term
        return grad_input, None, None, None, None, None


class _AffineBatchNorm(torch.autograd.Function):
    """Affine batch norm on a backend's kernels: the statistics in one pass and y in another, the backward's
    per-channel sums in one pass and the input gradient in another. It saves x, as PyTorch's does; under
    ``create_graph`` the backward is ATen's batch-norm backward, which is differentiable."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean, running_var,
                momentum: float, eps: float, backend: str) -> torch.Tensor:
        y, mean, invstd = get(backend).kernels["batch_norm_affine_train"](x, weight, bias, running_mean, running_var,
                                                                          momentum, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.backend, ctx.eps = backend, eps
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, mean, invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # double backward
            gx, gw, gb = torch.ops.aten.native_batch_norm_backward(grad, x, weight, None, None, mean, invstd, True,
                                                                   ctx.eps, [need_x, need_w, need_b])
        else:
            gx, gw, gb = get(ctx.backend).kernels["batch_norm_affine_backward"](grad, x, weight, mean, invstd, need_x)
        return (gx if need_x else None), (gw if need_w else None), (gb if need_b else None), None, None, None, \
            None, None


def _eager_float(x: torch.Tensor) -> bool:
    return (x.dim() == 4 and x.dtype in (torch.float32, torch.float64) and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled(x.device.type))


def batch_norm(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, momentum: float = 0.1,
               eps: float = 1e-5, *, backend: str | None = None) -> torch.Tensor:
    """Training-mode batch norm of x [N, C, H, W] (``F.batch_norm(..., training=True)``; weight and bias both given or
    both None), on the backend's kernels where they apply (see the module docstring)."""
    checks.check_4d(OP, "x", x)
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        checks.check_float(OP, name, t)
    momentum, eps = checks.check_number(OP, "momentum", momentum, 0.0), checks.check_number(OP, "eps", eps, 0.0)
    if (weight is None) != (bias is None):
        raise ValueError(f"fastnas.{OP}: weight and bias must both be given or both be None")
    if weight is not None:
        checks.check_float(OP, "weight", weight)
        checks.check_float(OP, "bias", bias)
    chosen = select(x.device.type, backend)
    if not _eager_float(x):
        return reference(x, running_mean, running_var, weight, bias, momentum, eps)
    channels_last = layout.prefers_channels_last(x)
    if weight is None:
        if not (x.requires_grad and torch.is_grad_enabled()):
            return reference(x, running_mean, running_var, None, None, momentum, eps)
        fused = chosen.name if channels_last and "batch_norm_train" in chosen.kernels else None
        return _OutputSavingBatchNorm.apply(x, running_mean, running_var, momentum, eps, fused)[0]
    if not (channels_last and weight.dtype == x.dtype and "batch_norm_affine_train" in chosen.kernels):
        return reference(x, running_mean, running_var, weight, bias, momentum, eps)
    return _AffineBatchNorm.apply(x, weight, bias, running_mean, running_var, momentum, eps, chosen.name)
