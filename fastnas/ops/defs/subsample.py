"""subsample: every s-th row and column of x from an offset on, as a dense tensor in x's layout.

Its backward writes the input gradient in x's layout with one zero fill and one strided copy (linear in the
gradient, so double backward is exact); slicing's own backward fills and copies a full-size tensor once per sliced
dimension, in NCHW, which then costs a layout conversion where x is channels_last.
"""
from __future__ import annotations

import torch

from .. import checks, layout
from ..opdef import Op, Sample, define_op, tensor

OP = "subsample"
_IntPair = tuple[int, int]


def channels_innermost(x: torch.Tensor) -> bool:
    """channels_last data, or a view of it (a slice of a channels_last tensor is contiguous in neither layout)."""
    return layout.prefers_channels_last(x) or (x.dim() == 4 and x.stride(1) < x.stride(3))


def reference(x: torch.Tensor, stride: _IntPair, offset: _IntPair = (0, 0)) -> torch.Tensor:
    """``x[:, :, offset[0]::stride[0], offset[1]::stride[1]]``, dense, channels_last where x's channels are
    innermost."""
    memory_format = torch.channels_last if channels_innermost(x) else torch.contiguous_format
    return x[:, :, offset[0]:: stride[0], offset[1]:: stride[1]].contiguous(memory_format=memory_format)


def _forward(x, stride, offset):
    return reference(x, stride, offset)


def _setup_context(ctx, inputs, output):
    x, stride, offset = inputs
    memory_format = torch.channels_last if channels_innermost(x) else torch.contiguous_format
    ctx.conf = (x.shape, memory_format, stride, offset)


def _backward(ctx, grad):
    shape, memory_format, stride, offset = ctx.conf
    grad_x = torch.empty(shape, dtype=grad.dtype, device=grad.device, memory_format=memory_format).zero_()
    grad_x[:, :, offset[0]:: stride[0], offset[1]:: stride[1]] = grad  # (differentiable in grad)
    return grad_x, None, None


LEAN = define_op(OP, "(Tensor x, int[2] stride, int[2] offset) -> Tensor", _forward, _backward, _setup_context)


def subsample(x: torch.Tensor, stride: int | _IntPair, offset: int | _IntPair = 0, *,
              backend: str | None = None) -> torch.Tensor:
    """Every ``stride``-th row and column of x [N, C, H, W] from ``offset`` on, dense, in x's layout (``backend`` is
    accepted for the ops' common signature: every backend runs the same copy). Where no gradient is recorded, or
    under a TorchScript trace (which keeps no custom autograd), it is the plain copy: the same values."""
    checks.check_4d(OP, "x", x)
    stride, offset = checks.int_pair(OP, "stride", stride, 1), checks.int_pair(OP, "offset", offset, 0)
    if not (torch.is_grad_enabled() and x.requires_grad) or torch.jit.is_tracing():
        return reference(x, stride, offset)
    return LEAN(x, stride, offset)


OPS = {OP: Op(subsample, reference)}


def sample_inputs(device, dtype, shape=(2, 3, 5, 3)) -> list[Sample]:
    x = tensor(shape, device, dtype, channels_last=True)
    return [Sample(OP, [x], lambda b, x: subsample(x, 2, backend=b), amp=True),
            Sample("subsample_offset", [x], lambda b, x: subsample(x, (2, 1), (1, 0), backend=b))]
