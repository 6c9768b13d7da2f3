"""Convolution and batch norm that store less for the backward pass (part of the search's memory plan).

* :class:`LeanConv2d`: when its weight needs no gradient (the architecture step of a first-order search freezes the
  network weights), only the weight is kept for the backward; PyTorch's own convolution keeps its input as well, which
  only the weight gradient needs.
* :class:`LeanBatchNorm2d`: an affine-free batch norm in training mode keeps its *output* instead of its input. The
  backward needs only x̂ = (x − μ)·σ⁻¹, which is the output itself; the tensor the next op consumes (a mixed_sum that
  saves its inputs, a ReLU that saves its result) is then the one stored, and the input is freed.

Both compute what ``nn.Conv2d`` / ``nn.BatchNorm2d`` compute, through the ops :func:`fastnas.ops.depthwise_conv2d`,
:func:`fastnas.ops.single_channel_conv2d` and :func:`fastnas.ops.batch_norm` (which run the selected backend's
kernels where they apply) or ATen's, and double backward through them is exact. ``memory_efficient = False`` on a
module (``SuperNet.set_memory_efficient`` does it for the whole network) selects PyTorch's own autograd. Under
``torch.compile`` the plain path is traced and AOTAutograd chooses what to save.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..ops.layout import stand_in


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
    """Every ``stride``-th row and column of x from ``offset`` on, dense, in x's layout (see :class:`_Subsample`).

    Where no gradient is recorded (inference, a TorchScript trace, which cannot hold a Python autograd function),
    the slice is copied directly: the same values."""
    if not (torch.is_grad_enabled() and x.requires_grad) or torch.jit.is_tracing():
        layout = torch.channels_last if _channels_innermost(x) else torch.contiguous_format
        return x[:, :, offset[0]:: stride[0], offset[1]:: stride[1]].contiguous(memory_format=layout)
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
    return ops.prefers_channels_last(x) or (x.dim() == 4 and x.stride(1) < x.stride(3))


class LeanConv2d(nn.Conv2d):
    """``nn.Conv2d`` that keeps only its weight for the backward while the weight is frozen (no bias, zero padding
    mode: the convolutions of the search space). A depthwise convolution runs on the selected backend's depthwise
    kernels where it has them (:func:`fastnas.ops.depthwise_conv2d`), a stride-1 convolution of a few channels to one
    (a spatial gate's) on its single-channel kernels (the ops decide where the kernels apply). A strided dilated
    convolution that reads every s-th pixel only (:func:`subsampling_plan`) runs as the equal undilated convolution
    of the subsampled input."""

    memory_efficient = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # (stride, padding, dilation) of the equal convolution of the subsampled input, or None
        self.subsampled = None
        if self.padding_mode == "zeros" and subsampling_plan(self.kernel_size, self.stride, self.padding,
                                                             self.dilation):
            self.subsampled = ((1, 1), tuple((k - 1) // 2 for k in self.kernel_size), (1, 1))
        plain = self.bias is None and self.padding_mode == "zeros"
        # one filter per channel: fastnas.ops.depthwise_conv2d
        self.depthwise = plain and self.groups == self.in_channels == self.out_channels
        # to one channel (a spatial gate's): fastnas.ops.single_channel_conv2d at stride 1 without dilation
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
        if self.memory_efficient and isinstance(padding, tuple):
            if self.depthwise:
                return ops.depthwise_conv2d(x, self.weight, stride, padding, dilation)
            if self.single_channel and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1):
                return ops.single_channel_conv2d(x, self.weight, padding)
        if (self.bias is None and self.padding_mode == "zeros" and not self.weight.requires_grad
                and x.requires_grad and isinstance(padding, tuple) and _lean_path_allowed(self)):
            return _FrozenWeightConv.apply(x, self.weight, stride, padding, dilation, self.groups)
        if self.subsampled is None:
            return super().forward(x)
        return torch.nn.functional.conv2d(x, self.weight, self.bias, stride, padding, dilation, self.groups)


class LeanBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that in training normalises through :func:`fastnas.ops.batch_norm`: affine-free, it saves
    its output rather than its input; affine, it runs the selected backend's affine batch-norm kernels where they
    apply (ATen's channels_last batch norm takes several times longer on a few dozen channels)."""

    memory_efficient = True

    def lean_applies(self, x: torch.Tensor) -> bool:
        """Whether this call is an affine-free training-mode batch norm under the memory plan: the op then saves
        its output where it can (a search cell's fused node sum may apply it instead)."""
        return (not self.affine and self.training and self.track_running_stats and x.dim() == 4
                and getattr(self, "memory_efficient", True))

    def _momentum(self) -> float:
        """The running statistics' update factor of this step (a cumulative average when momentum is None)."""
        return self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)

    def lean_forward(self, x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
        """The batch norm through the op, updating the given running statistics."""
        self._check_input_dim(x)
        return ops.batch_norm(x, running_mean, running_var, self.weight, self.bias, self._momentum(), self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.lean_applies(x) or (self.affine and self.training and self.track_running_stats)):
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        return self.lean_forward(x, self.running_mean, self.running_var)
