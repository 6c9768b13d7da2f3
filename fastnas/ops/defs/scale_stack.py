"""scale_stack: one input scaled by several gates at once, the gates' outputs stacked along the channels.

x [N, C, H, W] and the logits of U gates, per channel ([N, U·C]: channel attention) or per position ([N, U, H, W]:
spatial attention); output unit u (channels [u·C, u·C + C)) is x·sigmoid(gate u's logits), as ``channel_scale`` /
``spatial_scale`` would give it on x alone. The attention candidates of every stride-1 edge leaving a search-cell
state scale the same state: a backend's kernels (the ``cpu`` backend's) read x once, write one output, and return in
one backward the input gradient summed over the gates and every gate's logit gradient. Elsewhere it is the broadcast
product. Autograd keeps x and the logits (the gates' logits depend on x wherever they are used, so both gradients
are wanted); double backward differentiates the reference.
"""
from __future__ import annotations

import torch

from .. import checks, layout
from ..backend import select
from ..opdef import Kernel, Op, Sample, backward_kernels, flat_needs, param_dtype, tensor

OP = "scale_stack"


def check(x: torch.Tensor, logits: torch.Tensor) -> None:
    checks.check_4d(OP, "x", x)
    checks.check_float(OP, "logits", logits)
    N, C, H, W = x.shape
    channel = logits.dim() == 2 and logits.shape[0] == N and C > 0 and logits.shape[1] > 0 \
        and logits.shape[1] % C == 0
    spatial = logits.dim() == 4 and logits.shape[0] == N and logits.shape[1] > 0 and tuple(logits.shape[2:]) == (H, W)
    if not (channel or spatial):
        raise ValueError(f"fastnas.{OP}: logits must have shape [N, U*C] (channel gates) or [N, U, H, W] (spatial "
                         f"gates) for x of shape {list(x.shape)}, got {list(logits.shape)}")
    checks.check_same_device(OP, "logits", logits, "x", x)


def _gates(x: torch.Tensor, logits: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """sigmoid(logits) as [N, U, C or 1, 1 or H, W]: broadcast against x [N, 1, C, H, W]."""
    s = torch.sigmoid(logits.to(acc))
    if logits.dim() == 2:
        return s.view(x.shape[0], -1, x.shape[1], 1, 1)
    return s.unsqueeze(2)


def _product(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    acc = layout.acc_dtype(x.dtype)
    return (x.to(acc).unsqueeze(1) * _gates(x, logits, acc)).flatten(1, 2).to(x.dtype)


def _scaled(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    out = _product(x, logits)
    return layout.shaped(out.shape, x, layout.prefers_channels_last(x)).copy_(out)


def reference(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Unit u of the output: x·sigmoid(logits[:, u·C:(u+1)·C])[:, :, None, None] (channel logits) or
    x·sigmoid(logits[:, u:u+1]) (spatial logits)."""
    check(x, logits)
    return _product(x, logits)


def _backward_kernel(grad: torch.Tensor, x: torch.Tensor, logits: torch.Tensor,
                     need_x_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    acc = layout.acc_dtype(grad.dtype)
    s = _gates(x, logits, acc)
    g = grad.to(acc).unflatten(1, (-1, x.shape[1]))  # [N, U, C, H, W]
    gx = layout.like(x).copy_((g * s).sum(1)) if need_x_grad else grad.new_empty(0)
    product = g * x.to(acc).unsqueeze(1)
    d = product.sum((3, 4)).flatten(1) if logits.dim() == 2 else product.sum(2)
    s = s.view(logits.shape) if logits.dim() == 2 else s.squeeze(2)
    return gx, layout.like(logits).copy_(d * s * (1 - s))


KERNELS = {
    OP: Kernel("(Tensor x, Tensor logits) -> Tensor", _scaled),
    # (grad x (an empty tensor unless need_x_grad), grad logits)
    f"{OP}_backward": Kernel("(Tensor grad, Tensor x, Tensor logits, bool need_x_grad) -> (Tensor, Tensor)",
                             _backward_kernel),
}
REFERENCES = {name: k.reference for name, k in KERNELS.items()}


def _autograd(kernels: dict):
    def setup_context(ctx, inputs, output):
        x, logits = inputs
        ctx.need_x, ctx.need_logits = flat_needs(ctx, 2)
        ctx.save_for_backward(logits, x)

    def backward(ctx, grad):
        logits, x = ctx.saved_tensors
        run = backward_kernels(kernels, REFERENCES)
        gx, glogits = run[f"{OP}_backward"](grad, x, logits, ctx.need_x)
        return (gx if ctx.need_x else None), (glogits if ctx.need_logits else None)

    return backward, setup_context


AUTOGRAD = {OP: _autograd}


def scale_stack(x: torch.Tensor, logits: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """x [N, C, H, W] scaled by U gates, stacked: [N, U·C, H, W], unit u = x·sigmoid(gate u's logits), the logits
    per channel ([N, U·C]) or per position ([N, U, H, W]); on the backend's kernels where it has them."""
    check(x, logits)
    kernel = select(x.device.type, backend).kernels.get(OP)
    if kernel is None:
        return reference(x, logits)
    return kernel(x, logits)


OPS = {OP: Op(scale_stack, reference)}


def sample_inputs(device, dtype, shape=(2, 3, 5, 3)) -> list[Sample]:
    n, c, h, w = shape
    x, pdt = tensor(shape, device, dtype, channels_last=True), param_dtype(dtype)
    return [Sample(f"{OP}_channel", [x, tensor((n, 3 * c), device, pdt, seed=1)],
                   lambda b, x, lg: scale_stack(x, lg, backend=b), amp=True),
            Sample(f"{OP}_spatial", [x, tensor((n, 2, h, w), device, pdt, seed=1, channels_last=True)],
                   lambda b, x, lg: scale_stack(x, lg, backend=b), amp=True)]
