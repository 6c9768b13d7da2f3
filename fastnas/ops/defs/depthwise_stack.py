"""depthwise_stack: several depthwise convolutions of one input as one call.

Column g has filters ``weights[g]`` [n_g, 1, kh, kw] and its own stride, padding and dilation (two values each per
column, flattened); the output concatenates the columns' outputs along the channels, and output channel o reads input
channel o mod C_in. Every column must give the same output size. The separable and dilated convolutions of all the
edges leaving a search-cell state are such a stack: the state (C channels) read by every column's n_g = edges·C
filters, or in the second half of the separable convolutions each filter reading its own channel. With ``relu`` the
columns read max(x, 0): DARTS's ReLU before each convolution, applied as the input is read and never stored (the
backward keeps the input gradient where x > 0, as ReLU's own backward does).

A backend's kernels (the ``cpu`` backend's) read the input once and write one output: no repeated copy of the input,
no concatenation, and a backward that returns the input gradient summed over the columns in one pass; x may be a
channel slice of a wider channels_last tensor (read in place). The input is saved only when the weights need a
gradient or the ReLU's mask does; double backward differentiates the reference composition.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .. import checks, layout
from ..backend import select
from ..opdef import Kernel, Op, Sample, flat_needs, tensor

OP = "depthwise_stack"
_Pairs = Sequence[int | tuple[int, int]]


def _flat(name: str, values: _Pairs, count: int, least: int) -> list[int]:
    if len(values) != count:
        raise ValueError(f"fastnas.{OP}: {name} must hold one value per weight ({count}), got {len(values)}")
    return [v for value in values for v in checks.int_pair(OP, name, value, least)]


def _output_size(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> tuple[int, int]:
    return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1
                 for size, k, s, p, d in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation))


def check(x: torch.Tensor, weights: Sequence[torch.Tensor], stride: list[int], padding: list[int],
          dilation: list[int]) -> None:
    checks.check_4d(OP, "x", x)
    checks.check_tensor_list(OP, "weights", weights)
    if len(weights) == 0:
        raise ValueError(f"fastnas.{OP}: weights must hold at least one tensor")
    size = None
    for g, w in enumerate(weights):
        checks.check_4d(OP, f"weights[{g}]", w)
        if w.shape[1] != 1 or w.shape[0] == 0:
            raise ValueError(f"fastnas.{OP}: weights[{g}] must have shape [n, 1, kh, kw], got {list(w.shape)}")
        if w.dtype != weights[0].dtype:
            raise TypeError(f"fastnas.{OP}: weights[{g}] has dtype {w.dtype}, expected {weights[0].dtype} "
                            "(the dtype of weights[0])")
        checks.check_same_device(OP, f"weights[{g}]", w, "x", x)
        pair = slice(2 * g, 2 * g + 2)
        out = _output_size(x, w, stride[pair], padding[pair], dilation[pair])
        if min(out) < 1:
            raise ValueError(f"fastnas.{OP}: the filters of weights[{g}] do not fit the input of shape "
                             f"{list(x.shape)}")
        if size is not None and out != size:
            raise ValueError(f"fastnas.{OP}: column {g} gives outputs of {out[0]}x{out[1]}, column 0 of "
                             f"{size[0]}x{size[1]} (the columns are concatenated)")
        size = out


def _reference(x, weights, stride, padding, dilation, relu=False):
    x = F.relu(x) if relu else x
    C, outs, o = x.shape[1], [], 0
    for g, w in enumerate(weights):
        n = w.shape[0]
        x_g = x if o % C == 0 and n == C else x.index_select(1, torch.arange(o, o + n, device=x.device) % C)
        pair = slice(2 * g, 2 * g + 2)
        outs.append(F.conv2d(x_g, w, None, stride[pair], padding[pair], dilation[pair], n))
        o += n
    return outs[0] if len(outs) == 1 else torch.cat(outs, 1)


def reference(x: torch.Tensor, weights: Sequence[torch.Tensor], stride: _Pairs, padding: _Pairs,
              dilation: _Pairs, relu: bool = False) -> torch.Tensor:
    """The columns' depthwise convolutions of x (of ``F.relu(x)`` with ``relu``), output channel o reading input
    channel o mod C, concatenated."""
    flat = [_flat(name, v, len(weights), least) for name, v, least in
            (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1))]
    check(x, weights, *flat)
    return _reference(x, weights, *flat, relu)


def _forward_kernel(x, weights, stride, padding, dilation, relu):
    out = _reference(x, weights, stride, padding, dilation, relu)
    return layout.shaped(out.shape, x, layout.prefers_channels_last(x)).copy_(out)


def _backward_kernel(grad, x, weights, stride, padding, dilation, relu, need_x_grad, need_weights_grad):
    mask = x > 0 if relu and need_x_grad else None
    x = F.relu(x) if relu and need_weights_grad else x
    C, o = x.shape[1], 0
    gx = torch.zeros(x.shape, dtype=layout.acc_dtype(x.dtype), device=x.device) if need_x_grad else None
    gws = []
    for g, w in enumerate(weights):
        n, pair = w.shape[0], slice(2 * g, 2 * g + 2)
        channels = torch.arange(o, o + n, device=x.device) % C
        gx_g, gw_g, _ = torch.ops.aten.convolution_backward(
            grad[:, o:o + n], x.index_select(1, channels), w, None, stride[pair], padding[pair], dilation[pair],
            False, [0, 0], n, [need_x_grad, need_weights_grad, False])
        if need_x_grad:
            gx.index_add_(1, channels, gx_g.to(gx.dtype))
        if need_weights_grad:
            gws.append(gw_g.contiguous())
        o += n
    if mask is not None:
        gx = torch.where(mask, gx, 0)
    return (layout.like(x).copy_(gx) if need_x_grad else x.new_empty((0,))), gws


KERNELS = {
    "depthwise_stack": Kernel("(Tensor x, Tensor[] weights, int[] stride, int[] padding, int[] dilation, bool relu) "
                              "-> Tensor", _forward_kernel),
    # (grad x (empty unless need_x_grad), grad of every weight (none unless need_weights_grad))
    "depthwise_stack_backward": Kernel("(Tensor grad, Tensor x, Tensor[] weights, int[] stride, int[] padding, "
                                       "int[] dilation, bool relu, bool need_x_grad, bool need_weights_grad) "
                                       "-> (Tensor, Tensor[])", _backward_kernel),
}


def _autograd(kernels: dict):
    def setup_context(ctx, inputs, output):
        x, weights, stride, padding, dilation, relu = inputs
        k = len(weights)
        need = flat_needs(ctx, 1 + k)
        ctx.need_x, ctx.need_w, ctx.num_weights = need[0], any(need[1:]), k
        ctx.conf = (x.shape, x.stride(), list(stride), list(padding), list(dilation), relu)
        ctx.save_for_backward(x if ctx.need_w or (relu and ctx.need_x) else None, *weights)

    def backward(ctx, grad):
        x, *weights = ctx.saved_tensors
        shape, strides, stride, padding, dilation, relu = ctx.conf
        if x is None:  # only the input gradient: its shape and layout are read, not its values
            x = layout.stand_in(shape, strides, grad)
        if torch.is_grad_enabled():  # double backward: the reference composition's own autograd
            if ctx.need_x and not x.requires_grad:  # (the stand-in: the input gradient does not read x)
                x = x.detach().requires_grad_()
            wanted = ([x] if ctx.need_x else []) + (weights if ctx.need_w else [])
            out = _reference(x, weights, stride, padding, dilation, relu)
            grads = iter(torch.autograd.grad(out, wanted, grad, create_graph=True))
            gx = next(grads) if ctx.need_x else None
            gws = [next(grads) for _ in weights] if ctx.need_w else [None] * ctx.num_weights
        else:
            gx, gws = kernels[f"{OP}_backward"](grad, x, weights, stride, padding, dilation, relu, ctx.need_x,
                                                ctx.need_w)
            gx = gx if ctx.need_x else None
            gws = list(gws) if ctx.need_w else [None] * ctx.num_weights
        return gx, gws, None, None, None, None

    return backward, setup_context


AUTOGRAD = {OP: _autograd}


def depthwise_stack(x: torch.Tensor, weights: Sequence[torch.Tensor], stride: _Pairs, padding: _Pairs,
                    dilation: _Pairs, relu: bool = False, *, backend: str | None = None) -> torch.Tensor:
    """The depthwise convolutions of x [N, C, H, W] (of ``F.relu(x)`` with ``relu``) with ``weights[g]``
    [n_g, 1, kh, kw] (stride, padding, dilation: one int or pair per weight), output channel o reading input channel
    o mod C, concatenated along the channels; on the backend's kernels where it has them."""
    flat = [_flat(name, v, len(weights), least) for name, v, least in
            (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1))]
    check(x, weights, *flat)
    kernel = select(x.device.type, backend).kernels.get(OP)
    if kernel is None or torch.is_autocast_enabled(x.device.type) or x.dtype != weights[0].dtype:
        return _reference(x, weights, *flat, relu)
    return kernel(x, list(weights), *flat, bool(relu))


OPS = {OP: Op(depthwise_stack, reference)}


def sample_inputs(device, dtype, shape=(2, 3, 5, 3)) -> list[Sample]:
    C = shape[1]
    x = tensor(shape, device, dtype, channels_last=True)
    w3, w5 = tensor((2 * C, 1, 3, 3), device, dtype, seed=1), tensor((C, 1, 5, 5), device, dtype, seed=2)
    wide = tensor((2 * C, 1, 3, 3), device, dtype, seed=3)
    return [
        # every column reads x: a 3×3 column of two units, a dilated 5×5 one
        Sample(OP, [x, w3, w5], lambda b, x, w3, w5: depthwise_stack(x, [w3, w5], [1, 1], [1, 4], [1, 2],
                                                                     backend=b)),
        # strided, through a ReLU: a 3×3 column at stride 2 beside a dilated one that reads every other pixel
        Sample(f"{OP}_strided_relu", [x, w3, w5], lambda b, x, w3, w5: depthwise_stack(x, [w3, w5], [2, 2], [1, 4],
                                                                                       [1, 2], True, backend=b)),
        # each filter its own channel (the input as wide as the output), through a ReLU; the weights frozen
        Sample(f"{OP}_own_channels_relu", [tensor((shape[0], 2 * C, *shape[2:]), device, dtype, seed=4)],
               lambda b, x: depthwise_stack(x, [wide], [1], [1], [1], True, backend=b)),
    ]
