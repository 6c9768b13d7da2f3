"""Convolution and batch norm that store less for the backward pass (part of the search's memory plan).

* :class:`LeanConv2d`: when its weight needs no gradient (the architecture step of a first-order search freezes the
  network weights), only the weight is kept for the backward; PyTorch's own convolution keeps its input as well, which
  only the weight gradient needs.
* :class:`LeanBatchNorm2d`: an affine-free batch norm in training mode keeps its *output* instead of its input. The
  backward needs only x̂ = (x − μ)·σ⁻¹, which is the output itself; the tensor the next op consumes (a mixed_sum that
  saves its inputs, a ReLU that saves its result) is then the one stored, and the input is freed.

Both compute what ``nn.Conv2d`` / ``nn.BatchNorm2d`` compute (ATen's kernels, or on the ``cpu`` backend fastnas's
depthwise-convolution, single-channel-convolution and batch-norm kernels), and double backward through them is
exact. ``memory_efficient = False`` on a module (``SuperNet.set_memory_efficient`` does it for the whole network)
selects PyTorch's own autograd. Under ``torch.compile`` the plain path is traced and
AOTAutograd chooses what to save.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..ops import _single_conv
from ..ops._checks import prefers_channels_last, stand_in


def _lean_path_allowed(module: nn.Module) -> bool:
    return getattr(module, "memory_efficient", True) and torch.is_grad_enabled() \
        and not torch.compiler.is_compiling()


class _FrozenWeightConv(torch.autograd.Function):
    """conv2d whose weight needs no gradient: the backward computes the input gradient from the weight alone."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int) -> torch.Tensor:
        ctx.conf = (x.shape, x.dtype, x.stride(), stride, padding, dilation, groups)
        ctx.save_for_backward(weight)
        return torch.nn.functional.conv2d(x, weight, None, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # linear in grad: under create_graph, ATen's convolution_backward is differentiable in grad (not in the
        # stand-in, whose values are never read)
        shape, dtype, strides, stride, padding, dilation, groups = ctx.conf
        (weight,) = ctx.saved_tensors
        # the input's values are not read when only the input gradient is asked for: an unfilled stand-in with the
        # input's layout (in the dtype the forward ran in under autocast) gives the kernel its shape and format
        grad_input = torch.ops.aten.convolution_backward(
            grad, stand_in(shape, strides, grad), weight.to(grad.dtype), None, stride, padding, dilation, False,
            [0, 0], groups, [True, False, False])[0]
        return grad_input.to(dtype), None, None, None, None, None


class _Subsample(torch.autograd.Function):
    """``x[:, :, oh::sh, ow::sw]`` as a dense tensor in x's layout. Its backward writes the input gradient in x's
    layout with one zero fill and one strided copy; slicing's own backward fills and copies a full-size tensor once
    per sliced dimension, in NCHW, which then costs a layout conversion where x is channels_last."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, stride: tuple[int, int], offset: tuple[int, int]) -> torch.Tensor:
        layout = torch.channels_last if _channels_innermost(x) else torch.contiguous_format
        ctx.conf = (x.shape, layout, stride, offset)
        return x[:, :, offset[0]:: stride[0], offset[1]:: stride[1]].contiguous(memory_format=layout)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, layout, stride, offset = ctx.conf
        grad_x = torch.empty(shape, dtype=grad.dtype, device=grad.device, memory_format=layout).zero_()
        grad_x[:, :, offset[0]:: stride[0], offset[1]:: stride[1]] = grad  # (differentiable in grad)
        return grad_x, None, None


def subsample(x: torch.Tensor, stride: tuple[int, int], offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Every ``stride``-th row and column of x from ``offset`` on, dense, in x's layout (see :class:`_Subsample`)."""
    return _Subsample.apply(x, tuple(stride), tuple(offset))


def subsampling_plan(kernel_size, stride, padding, dilation) -> bool:
    """Whether a strided convolution reads only every s-th row and column, so that it equals an undilated stride-1
    convolution with padding (k−1)/2 of ``x[..., ::s, ::s]``, output sizes included. Two cases, per dimension:

    * stride s equal to the dilation d > 1 with padding d·(k−1)/2 (odd k): out(i) = Σ_k w_k x(s·i + d·k − p) =
      Σ_k w_k x(d·(i + k − (k−1)/2)). DARTS's dilated convolutions in reduction cells are such; oneDNN runs their
      backward on a slow generic path on the CPU.
    * a 1×1 kernel with stride s > 1 and no padding: out(i) = w x(s·i) (FactorizedReduce's convolutions); the
      subsampled copy is a quarter of the input, where the strided convolution of a shifted view copied all of it.
    """
    if not isinstance(padding, tuple):
        return False

    def reads_every_sth(k: int, s: int, p: int, d: int) -> bool:
        return s > 1 and ((s == d and k % 2 == 1 and p == d * (k - 1) // 2) or (k == 1 and p == 0))

    return all(reads_every_sth(*conf) for conf in zip(kernel_size, stride, padding, dilation))


def _channels_innermost(x: torch.Tensor) -> bool:
    """channels_last data, or a view of it (a slice of a channels_last tensor is contiguous in neither layout)."""
    return prefers_channels_last(x) or (x.dim() == 4 and x.stride(1) < x.stride(3))


class LeanConv2d(nn.Conv2d):
    """``nn.Conv2d`` that keeps only its weight for the backward while the weight is frozen (no bias, zero padding
    mode: the convolutions of the search space). A depthwise convolution runs on the selected backend's depthwise
    kernels where it has them (:func:`fastnas.ops.depthwise_conv2d`), a stride-1 convolution of a few channels to one
    (a spatial gate's) on its single-channel kernels. A strided dilated convolution that reads every s-th pixel only
    (:func:`subsampling_plan`) runs as the equal undilated convolution of the subsampled input."""

    memory_efficient = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # (stride, padding, dilation) of the equal convolution of the subsampled input, or None
        self.subsampled = None
        if self.padding_mode == "zeros" and subsampling_plan(self.kernel_size, self.stride, self.padding,
                                                             self.dilation):
            self.subsampled = ((1, 1), tuple((k - 1) // 2 for k in self.kernel_size), (1, 1))
        plain = self.bias is None and self.padding_mode == "zeros"
        # one filter per channel: the selected backend's depthwise kernels apply (fastnas.ops.depthwise_conv2d)
        self.depthwise = plain and self.groups == self.in_channels == self.out_channels
        # to one channel (a spatial gate's): its single-channel kernels may apply (fastnas.ops._single_conv)
        self.single_channel = plain and self.out_channels == 1 and self.groups == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.subsampled is not None:
            return self.forward_subsampled(subsample(x, self.stride))
        return self._convolve(x, self.stride, self.padding, self.dilation)

    def forward_subsampled(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution of an input already subsampled (``x[..., ::s, ::s]`` or another phase of it; only where
        :func:`subsampling_plan` holds)."""
        return self._convolve(x, *self.subsampled)

    def _convolve(self, x: torch.Tensor, stride, padding, dilation) -> torch.Tensor:
        # the backend's own kernels (compiled regions too: the kernels have fake implementations)
        if (self.depthwise or self.single_channel) and getattr(self, "memory_efficient", True) \
                and isinstance(padding, tuple):
            if self.depthwise:  # (its forward is PyTorch's: only worth it when a backward follows)
                fused = ops.cpu_kernel("depthwise_conv2d", x.device) if torch.is_grad_enabled() else None
                if fused is not None:
                    return fused(x, self.weight, stride, padding, dilation)
            elif _single_conv.applies(x, self.weight, stride, padding, dilation, self.groups):
                single = ops.cpu_kernel("single_channel_conv2d", x.device)
                if single is not None:
                    return single(x, self.weight, padding)
        if (self.bias is None and self.padding_mode == "zeros" and not self.weight.requires_grad
                and x.requires_grad and isinstance(padding, tuple) and _lean_path_allowed(self)):
            return _FrozenWeightConv.apply(x, self.weight, stride, padding, dilation, self.groups)
        if self.subsampled is None:
            return super().forward(x)
        return torch.nn.functional.conv2d(x, self.weight, self.bias, stride, padding, dilation, self.groups)


class _OutputSavingBatchNorm(torch.autograd.Function):
    """Affine-free training-mode batch norm that saves its output y = x̂ and σ⁻¹ (both outputs) for the backward.

    The kernels are ATen's, or the ``cpu`` backend's (``kernels``: its ``batch_norm_train`` and
    ``batch_norm_backward``, one pass fewer over x each way). Under ``create_graph`` the backward is written in
    differentiable ops of y and σ⁻¹, whose own gradients come back here, so double backward is exact too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, running_mean, running_var, momentum: float, eps: float, kernels=None):
        if kernels is not None:
            y, invstd = kernels[0](x, running_mean, running_var, momentum, eps)
        else:
            y, _, invstd = torch.ops.aten.native_batch_norm(x, None, None, running_mean, running_var, True, momentum,
                                                            eps)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(y, invstd)
        ctx.backward_kernel = kernels[1] if kernels is not None else None
        return y, invstd

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor | None, grad_invstd: torch.Tensor | None):
        y, invstd = ctx.saved_tensors
        shape = (1, -1, 1, 1)
        if grad_y is None:
            grad_input = None
        elif torch.is_grad_enabled():  # double backward: the same formula in differentiable ops
            dims = (0, 2, 3)
            grad_input = invstd.view(shape) * (grad_y - grad_y.mean(dims, keepdim=True)
                                               - y * (grad_y * y).mean(dims, keepdim=True))
        elif ctx.backward_kernel is not None:
            grad_input = ctx.backward_kernel(grad_y.to(y.dtype), y, invstd)
        else:
            # ATen's batch-norm backward with x̂ given as the input (mean 0, σ⁻¹ 1) and the true σ⁻¹ as the scale
            # γ: γ·(g − mean(g) − x̂·mean(g·x̂)) is exactly the input gradient of the affine-free norm
            grad_input = torch.ops.aten.native_batch_norm_backward(
                grad_y, y, invstd, None, None, torch.zeros_like(invstd), torch.ones_like(invstd), True, 0.0,
                [True, False, False])[0]
        if grad_invstd is not None:  # σ⁻¹ = (var + eps)^(-1/2): ∂σ⁻¹/∂x = −σ⁻² · y / M per channel
            count = y.numel() // y.shape[1]
            term = -(grad_invstd * invstd * invstd / count).view(shape) * y
            grad_input = term if grad_input is None else grad_input + term
        return grad_input, None, None, None, None, None


def _cpu_kernels(forward: str, backward: str, x: torch.Tensor) -> tuple | None:
    """The ``cpu`` backend's (forward, backward) kernel pair for x's device under the current selection, or None."""
    kernel = ops.cpu_kernel(forward, x.device)
    return None if kernel is None else (kernel, ops.cpu_kernel(backward, x.device))


class _AffineBatchNorm(torch.autograd.Function):
    """Affine training-mode batch norm on the ``cpu`` backend's kernels (``kernels``: its ``batch_norm_affine_train``
    and ``batch_norm_affine_backward``): the statistics in one pass and y in another, the backward's per-channel sums
    in one pass and the input gradient in another. It saves x, as PyTorch's does; under ``create_graph`` the backward
    is ATen's batch-norm backward, which is differentiable, so double backward is exact."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean, running_var,
                momentum: float, eps: float, kernels) -> torch.Tensor:
        y, mean, invstd = kernels[0](x, weight, bias, running_mean, running_var, momentum, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.backward_kernel, ctx.eps = kernels[1], eps
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, mean, invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # double backward
            gx, gw, gb = torch.ops.aten.native_batch_norm_backward(grad, x, weight, None, None, mean, invstd, True,
                                                                   ctx.eps, [need_x, need_w, need_b])
        else:
            gx, gw, gb = ctx.backward_kernel(grad, x, weight, mean, invstd, need_x)
        return (gx if need_x else None), (gw if need_w else None), (gb if need_b else None), None, None, None, \
            None, None


class LeanBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that, affine-free and training, saves its output rather than its input (on the ``cpu``
    backend's batch-norm kernels for channels_last inputs); affine and training on the ``cpu`` backend with a
    channels_last input, it runs that backend's affine batch-norm kernels (ATen's channels_last batch norm takes
    several times longer on a few dozen channels)."""

    memory_efficient = True

    def lean_applies(self, x: torch.Tensor) -> bool:
        """Whether this call takes the output-saving path."""
        return not (self.affine or not self.training or not self.track_running_stats or not x.requires_grad
                    or x.dim() != 4 or x.dtype not in (torch.float32, torch.float64) or not _lean_path_allowed(self)
                    or torch.is_autocast_enabled(x.device.type))

    def _momentum(self) -> float:
        """The running statistics' update factor of this step (a cumulative average when momentum is None)."""
        return self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)

    def lean_forward(self, x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
        """The output-saving path, updating the given running statistics."""
        self._check_input_dim(x)
        kernels = _cpu_kernels("batch_norm_train", "batch_norm_backward", x) if prefers_channels_last(x) else None
        return _OutputSavingBatchNorm.apply(x, running_mean, running_var, self._momentum(), self.eps, kernels)[0]

    def affine_kernels(self, x: torch.Tensor) -> tuple | None:
        """The ``cpu`` backend's affine batch-norm kernels where they apply to this call (affine, training with
        running statistics, a channels_last fp32/fp64 CPU input and parameters of its dtype, eager), else None."""
        if not (self.affine and self.training and self.track_running_stats and x.dim() == 4
                and x.dtype in (torch.float32, torch.float64) and self.weight.dtype == x.dtype
                and prefers_channels_last(x) and not torch.is_autocast_enabled(x.device.type)
                and not torch.compiler.is_compiling()):
            return None
        return _cpu_kernels("batch_norm_affine_train", "batch_norm_affine_backward", x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lean_applies(x):
            self.num_batches_tracked.add_(1)
            return self.lean_forward(x, self.running_mean, self.running_var)
        kernels = self.affine_kernels(x)
        if kernels is None:
            return super().forward(x)
        self._check_input_dim(x)
        self.num_batches_tracked.add_(1)
        return _AffineBatchNorm.apply(x, self.weight, self.bias, self.running_mean, self.running_var, self._momentum(),
                                      self.eps, kernels)
