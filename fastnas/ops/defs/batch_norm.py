"""batch_norm: training-mode batch norm (batch statistics, running statistics updated in place) that stores less.

* Affine-free: it keeps its *output* y = x̂ and σ⁻¹ instead of its input (the backward needs only x̂): the tensor
  the next op consumes is then the one stored, and the input is freed. On a channels_last input it runs the
  backend's optional ``batch_norm_train`` / ``batch_norm_backward`` kernels (one pass fewer over x each way), else
  ATen's (the operator ``fastnas_ops::batch_norm_output_saving``), with the same autograd.
* Affine: on a channels_last float32/float64 input, the backend's optional ``batch_norm_affine_train`` /
  ``batch_norm_affine_backward`` kernels (ATen's channels_last batch norm takes several times longer on a few dozen
  channels); else ``F.batch_norm``.

Under ``create_graph`` both backwards are differentiable formulas, so double backward is exact. Under autocast, for
other dtypes or without a backward to come, it is ``F.batch_norm``. :func:`update_factor` is the one rule for the
running statistics' momentum.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import checks, layout
from ..backend import select
from ..opdef import Kernel, Op, Sample, define_op, param_dtype, tensor

OP = "batch_norm"
_SHAPE = (1, -1, 1, 1)


def update_factor(momentum: float | None, num_batches_tracked: torch.Tensor) -> float:
    """The running statistics' update factor of a step (as ``nn.BatchNorm2d``): ``momentum``, or a cumulative
    average (1 / the number of batches seen, this one included) when it is None."""
    return momentum if momentum is not None else 1.0 / float(num_batches_tracked)


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


# ------------------------------------------------------------------------------------------------ affine-free


def _output_saving_autograd(kernels: dict | None):
    """Saves y = x̂ and σ⁻¹ (both outputs); the backward runs ``kernels["batch_norm_backward"]`` (None: ATen's).
    Under ``create_graph`` it is the same formula in differentiable ops of y and σ⁻¹, whose own gradients come back
    here, so double backward is exact too."""
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*output)

    def backward(ctx, grad_y, grad_invstd):
        y, invstd = ctx.saved_tensors
        if grad_y is None:
            grad_input = None
        elif torch.is_grad_enabled():  # double backward
            dims = (0, 2, 3)
            grad_input = invstd.view(_SHAPE) * (grad_y - grad_y.mean(dims, keepdim=True)
                                                - y * (grad_y * y).mean(dims, keepdim=True))
        elif kernels is not None:
            grad_input = kernels["batch_norm_backward"](grad_y.to(y.dtype), y, invstd)
        else:
            # ATen's batch-norm backward with x̂ given as the input (mean 0, σ⁻¹ 1) and the true σ⁻¹ as the
            # scale γ: γ·(g − mean(g) − x̂·mean(g·x̂)) is exactly the input gradient of the affine-free norm
            grad_input = torch.ops.aten.native_batch_norm_backward(
                grad_y, y, invstd, None, None, torch.zeros_like(invstd), torch.ones_like(invstd), True, 0.0,
                [True, False, False])[0]
        if grad_invstd is not None:  # σ⁻¹ = (var + eps)^(-1/2): ∂σ⁻¹/∂x = −σ⁻² · y / M per channel
            count = y.numel() // y.shape[1]
            term = -(grad_invstd * invstd * invstd / count).view(_SHAPE) * y
            grad_input = term if grad_input is None else grad_input + term
        return grad_input, None, None, None, None

    return backward, setup_context


def _aten_output_saving(x, running_mean, running_var, momentum: float, eps: float):
    y, _, invstd = torch.ops.aten.native_batch_norm(x, None, None, running_mean, running_var, True, momentum, eps)
    return y, invstd


# (y = x̂, σ⁻¹) by ATen's kernels, where the backend has no batch_norm_train (whose autograd is the same)
OUTPUT_SAVING = define_op(
    "batch_norm_output_saving", "(Tensor x, Tensor(a!) running_mean, Tensor(b!) running_var, float momentum, "
    "float eps) -> (Tensor, Tensor)", _aten_output_saving, *_output_saving_autograd(None))


# ------------------------------------------------------------------------------------------------ affine


def _affine_autograd(kernels: dict):
    """The backend's kernels: the statistics in one pass and y in another, the backward's per-channel sums in one
    pass and the input gradient in another. Saves x, as PyTorch's does; under ``create_graph`` the backward is
    ATen's batch-norm backward, which is differentiable."""
    def setup_context(ctx, inputs, output):
        x, weight, _, _, _, _, ctx.eps = inputs
        _, mean, invstd = output
        ctx.mark_non_differentiable(mean, invstd)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, mean, invstd)

    def backward(ctx, grad, _grad_mean, _grad_invstd):
        x, weight, mean, invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if grad is None:
            return (None,) * 7
        if torch.is_grad_enabled():  # double backward
            gx, gw, gb = torch.ops.aten.native_batch_norm_backward(grad, x, weight, None, None, mean, invstd, True,
                                                                   ctx.eps, [need_x, need_w, need_b])
        else:
            gx, gw, gb = kernels["batch_norm_affine_backward"](grad, x, weight, mean, invstd, need_x)
        return (gx if need_x else None), (gw if need_w else None), (gb if need_b else None), None, None, None, None

    return backward, setup_context


AUTOGRAD = {"batch_norm_train": _output_saving_autograd, "batch_norm_affine_train": _affine_autograd}


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
    kernels = select(x.device.type, backend).kernels
    if x.dtype not in (torch.float32, torch.float64) or torch.is_autocast_enabled(x.device.type):
        return reference(x, running_mean, running_var, weight, bias, momentum, eps)
    channels_last = layout.prefers_channels_last(x)
    if weight is None:
        if not (x.requires_grad and torch.is_grad_enabled()):
            return reference(x, running_mean, running_var, None, None, momentum, eps)
        kernel = kernels.get("batch_norm_train") if channels_last else None
        return (kernel or OUTPUT_SAVING)(x, running_mean, running_var, momentum, eps)[0]
    kernel = kernels.get("batch_norm_affine_train")
    if kernel is None or not channels_last or weight.dtype != x.dtype:
        return reference(x, running_mean, running_var, weight, bias, momentum, eps)
    return kernel(x, weight, bias, running_mean, running_var, momentum, eps)[0]


OPS = {"batch_norm": Op(batch_norm, reference)}


def sample_inputs(device, dtype, shape=(2, 3, 5, 3)) -> list[Sample]:
    c, pdt = shape[1], param_dtype(dtype)

    def stats():
        return torch.zeros(c, device=device, dtype=pdt), torch.ones(c, device=device, dtype=pdt)

    x = tensor(shape, device, dtype, channels_last=True)
    return [
        Sample("batch_norm", [x, tensor(c, device, dtype, seed=1), tensor(c, device, dtype, seed=2)],
               lambda b, x, w, bias: batch_norm(x, *stats(), w, bias, 0.1, 1e-5, backend=b)),
        Sample("batch_norm_affine_free", [x], lambda b, x: batch_norm(x, *stats(), None, None, 0.1, 1e-5, backend=b)),
    ]
