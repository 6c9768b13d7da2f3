"""Convolution and batch norm that store less for the backward pass (part of the search's memory plan).

* :class:`LeanConv2d`: when its weight needs no gradient (the architecture step of a first-order search freezes the
  network weights), only the weight is kept for the backward; PyTorch's own convolution keeps its input as well, which
  only the weight gradient needs.
* :class:`LeanBatchNorm2d`: an affine-free batch norm in training mode keeps its *output* instead of its input. The
  backward needs only x̂ = (x − μ)·σ⁻¹, which is the output itself; the tensor the next op consumes (a mixed_sum that
  saves its inputs, a ReLU that saves its result) is then the one stored, and the input is freed.

Both compute what ``nn.Conv2d`` / ``nn.BatchNorm2d`` compute, through the ops :func:`fastnas.ops.frozen_conv2d`,
:func:`fastnas.ops.subsample`, :func:`fastnas.ops.depthwise_conv2d`, :func:`fastnas.ops.single_channel_conv2d` and
:func:`fastnas.ops.batch_norm` (which run the selected backend's kernels where they apply), and double backward
through them is exact. They are always lean: a network that wants PyTorch's own autograd builds ``nn.Conv2d`` /
``nn.BatchNorm2d`` instead.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..ops.defs.batch_norm import update_factor


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


class LeanConv2d(nn.Conv2d):
    """``nn.Conv2d`` that keeps only its weight for the backward while the weight is frozen (no bias, zero padding
    mode: the convolutions of the search space). A depthwise convolution runs on the selected backend's depthwise
    kernels where it has them (:func:`fastnas.ops.depthwise_conv2d`), a stride-1 convolution of a few channels to one
    (a spatial gate's) on its single-channel kernels (the ops decide where the kernels apply). A strided dilated
    convolution that reads every s-th pixel only (:func:`subsampling_plan`) runs as the equal undilated convolution
    of the subsampled input."""

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
            return self.forward_subsampled(ops.subsample(x, self.stride))
        return self._convolve(x, self.stride, self.padding, self.dilation)

    def forward_subsampled(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution of an input already subsampled (``x[..., ::s, ::s]`` or another phase of it; only where
        :func:`subsampling_plan` holds)."""
        return self._convolve(x, *self.subsampled)

    def _convolve(self, x: torch.Tensor, stride, padding, dilation) -> torch.Tensor:
        if isinstance(padding, tuple):
            if self.depthwise:
                return ops.depthwise_conv2d(x, self.weight, stride, padding, dilation)
            if self.single_channel and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1):
                return ops.single_channel_conv2d(x, self.weight, padding)
        if (self.bias is None and self.padding_mode == "zeros" and not self.weight.requires_grad
                and isinstance(padding, tuple)):
            return ops.frozen_conv2d(x, self.weight, stride, padding, dilation, self.groups)
        if self.subsampled is None:
            return super().forward(x)
        return torch.nn.functional.conv2d(x, self.weight, self.bias, stride, padding, dilation, self.groups)


class LeanBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that in training normalises through :func:`fastnas.ops.batch_norm`: affine-free, it saves
    its output rather than its input; affine, it runs the selected backend's affine batch-norm kernels where they
    apply (ATen's channels_last batch norm takes several times longer on a few dozen channels)."""

    def lean_applies(self, x: torch.Tensor) -> bool:
        """Whether this call is an affine-free training-mode batch norm: the op then saves its output where it can
        (a search cell's fused node sum may apply it instead)."""
        return not self.affine and self.training and self.track_running_stats and x.dim() == 4

    def lean_forward(self, x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
        """The batch norm through the op, updating the given running statistics."""
        self._check_input_dim(x)
        momentum = update_factor(self.momentum, self.num_batches_tracked)
        return ops.batch_norm(x, running_mean, running_var, self.weight, self.bias, momentum, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.lean_applies(x) or (self.affine and self.training and self.track_running_stats)):
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        return self.lean_forward(x, self.running_mean, self.running_var)
