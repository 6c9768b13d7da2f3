"""The whole CBAM channel gate, x · σ(MLP(mean_hw x) + MLP(max_hw x)), as one autograd node.

Composed of a backend's ops, the gate is about ten autograd nodes (pool, concatenation, two linears, ReLU, split,
add, scale) and its input gradient arrives in two parts that autograd adds in an extra pass over the activation.
:class:`FusedChannelGate` is one node with a hand-written backward:

* on the CPU, ``fastnas::channel_gate`` and ``fastnas::channel_gate_backward`` (``csrc/cpu/channel_gate.h``) run
  the whole gate image by image: the forward pools an image, runs the MLP on its two pooled rows and scales it while
  it is still in the core's L2 cache; the backward reduces (grad, x) over an image for the logits' gradient, runs
  the MLP's backward and writes the image's input gradient, grad·σ + the mean's share + the max's share at the
  argmax, from the cached grad. So x and grad are read from memory once each, not twice;
* otherwise (CUDA tensors on the ``cuda`` backend; the ``triton`` backend), the backend's pool and scale operators
  (:data:`COMPOSED_OPS`) with the MLP in PyTorch between them, and the input gradient from the scale op and two
  in-place updates.

The weights' gradients are small matrix products of the logits' and hidden rows' gradients with the saved rows.
Only x, the argmax, the logits, the pooled rows and the hidden activations are kept. The arithmetic is that of the
reference composition (:func:`composite`); the tests compare the two.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _checks

OP = "channel_attention"


def check_inputs(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                 b2: torch.Tensor | None) -> None:
    """Shapes, dtypes and devices of a channel gate's arguments (clear errors naming the argument)."""
    _checks.check_4d(OP, "x", x)
    c = x.shape[1]
    _checks.check_float(OP, "w1", w1)
    if w1.dim() != 2 or w1.shape[1] != c or w1.shape[0] < 1:
        raise ValueError(f"fastnas.{OP}: w1 must have shape [hidden, {c}] (hidden >= 1) for x of shape "
                         f"{list(x.shape)}, got {list(w1.shape)}")
    hidden = w1.shape[0]
    _checks.check_float(OP, "w2", w2)
    if list(w2.shape) != [c, hidden]:
        raise ValueError(f"fastnas.{OP}: w2 must have shape [{c}, {hidden}] (channels, hidden), got {list(w2.shape)}")
    for name, b, n in (("b1", b1, hidden), ("b2", b2, c)):
        if b is None:
            continue
        _checks.check_float(OP, name, b)
        if list(b.shape) != [n]:
            raise ValueError(f"fastnas.{OP}: {name} must have shape [{n}], got {list(b.shape)}")
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if t is not None:
            _checks.check_same_device(OP, name, t, "x", x)
            if t.dtype != w1.dtype:
                raise TypeError(f"fastnas.{OP}: {name} has dtype {t.dtype}, expected {w1.dtype} (the dtype of w1)")


def mlp(pooled: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
        b2: torch.Tensor | None) -> torch.Tensor:
    return F.linear(torch.relu(F.linear(pooled, w1, b1)), w2, b2)


def composite(channel_pool, channel_scale, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None,
              w2: torch.Tensor, b2: torch.Tensor | None) -> torch.Tensor:
    """The gate composed of a backend's ``channel_pool`` and ``channel_scale`` (autograd of each part)."""
    avg, mx = channel_pool(x)
    n = avg.shape[0]
    both = mlp(torch.cat([avg, mx], dim=0), w1, b1, w2, b2)  # one MLP pass for both pooled rows
    return channel_scale(x, both[:n] + both[n:])


def fused_params(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                 b2: torch.Tensor | None) -> tuple | None:
    """The MLP's parameters for the fused node, or None where the ops are composed instead.

    The fused node needs the activations and the MLP in one dtype. Under autocast, when x already has the autocast
    dtype, the parameters are cast to it (differentiably: their gradients come back in their own dtype), which is what
    autocast does to a linear layer's inputs; an x of another dtype under autocast composes the ops."""
    params = (w1, b1, w2, b2)
    device = x.device.type
    if torch.is_autocast_enabled(device):
        if x.dtype != torch.get_autocast_dtype(device):
            return None
        return tuple(None if p is None else p.to(x.dtype) for p in params)
    return params if x.dtype == w1.dtype else None


def channel_attention(kernels: str, channel_pool, channel_scale, x: torch.Tensor, w1: torch.Tensor,
                      b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None) -> torch.Tensor:
    """A compiled backend's channel gate: one :class:`FusedChannelGate` node on ``kernels`` (under autocast with the
    MLP cast to x's dtype), or where that does not apply (:func:`fused_params`) the composition of the backend's
    ``channel_pool`` and ``channel_scale``."""
    params = fused_params(x, w1, b1, w2, b2)
    if params is not None:
        return FusedChannelGate.apply(kernels, x, *params)
    return composite(channel_pool, channel_scale, x, w1, b1, w2, b2)


# The ops a fused node composes where there is no whole-gate kernel, per kernel family: (channel_pool -> (mean, max,
# int32 argmax in H·W), channel_scale(x, logits), the logits' gradient (grad, x, logits) -> [N, C]). The backends
# register theirs at import ("library": fastnas._C's operators, CPU or CUDA; "triton": the Triton kernels), so that
# nothing is imported inside traced code.
COMPOSED_OPS: dict[str, tuple] = {}
WHOLE_GATE = "gate_kernels"  # fastnas._C's whole-gate operators (CPU)


class FusedChannelGate(torch.autograd.Function):
    """The channel gate on a backend's compiled operators, one autograd node (see the module docstring). ``kernels``:
    :data:`WHOLE_GATE` or a key of :data:`COMPOSED_OPS`."""

    @staticmethod
    def forward(ctx, kernels: str, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                b2: torch.Tensor | None) -> torch.Tensor:
        if kernels == WHOLE_GATE:  # pool, MLP and scale in one kernel
            out, pooled, hidden, logits, argmax = torch.ops.fastnas.channel_gate.default(x, w1, b1, w2, b2)
        else:
            pool, scale, _ = COMPOSED_OPS[kernels]
            avg, mx, argmax = pool(x)
            n = avg.shape[0]
            pooled = torch.cat([avg, mx], dim=0)
            hidden = torch.relu(F.linear(pooled, w1, b1))
            both = F.linear(hidden, w2, b2)
            logits = both[:n] + both[n:]
            out = scale(x, logits)
        ctx.save_for_backward(x, argmax, logits, pooled, hidden, w1, w2)
        ctx.kernels, ctx.has_b1, ctx.has_b2 = kernels, b1 is not None, b2 is not None
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, argmax, logits, pooled, hidden, w1, w2 = ctx.saved_tensors
        _, need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        if ctx.kernels == WHOLE_GATE:  # the logits', hidden rows' and input's gradients in one kernel
            gx, glogits, ghidden = torch.ops.fastnas.channel_gate_backward.default(
                grad, x, argmax, logits, hidden, w1, w2, need_x)
        else:
            gx, glogits, ghidden = _backward_composed(ctx.kernels, grad, argmax, x, logits, hidden, w1, w2, need_x)
        gboth = torch.cat([glogits, glogits], dim=0)  # the logits are the sum of the two rows' MLP outputs
        gw2 = gboth.t().mm(hidden) if need_w2 else None
        gb2 = gboth.sum(0) if need_b2 and ctx.has_b2 else None
        gw1 = ghidden.t().mm(pooled) if need_w1 else None
        gb1 = ghidden.sum(0) if need_b1 and ctx.has_b1 else None
        return None, (gx if need_x else None), gw1, gb1, gw2, gb2


def _backward_composed(kernels: str, grad: torch.Tensor, argmax: torch.Tensor, x: torch.Tensor, logits: torch.Tensor,
                       hidden: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, need_x: bool):
    """What ``fastnas::channel_gate_backward`` computes, from the kernel family's scale ops, the MLP's backward in
    PyTorch and :func:`_input_grad_composed`."""
    _, scale, logits_grad = COMPOSED_OPS[kernels]
    glogits = logits_grad(grad, x, logits)  # one pass over (grad, x): Σ_hw grad·x·σ'(logits)
    ghidden = torch.cat([glogits, glogits], dim=0).mm(w2) * (hidden > 0)
    if not need_x:
        return None, glogits, ghidden
    n = logits.shape[0]
    gpooled = ghidden.mm(w1)
    return _input_grad_composed(scale, grad, logits, gpooled[:n], gpooled[n:], argmax), glogits, ghidden


def _input_grad_composed(scale, grad: torch.Tensor, logits: torch.Tensor, gavg: torch.Tensor, gmax: torch.Tensor,
                         argmax: torch.Tensor) -> torch.Tensor:
    """The input gradient of the gate, grad·σ(logits) + gavg / (H·W) + gmax at each channel's argmax, from the
    scale op and two in-place updates."""
    n, c, h, w = grad.shape
    gx = scale(grad, logits)  # grad·σ(logits): the scale's own kernel
    channels_last = _checks.prefers_channels_last(gx)
    if not channels_last:
        gx = gx.contiguous()  # (a no-op for NCHW)
    gx.add_((gavg / (h * w)).to(gx.dtype)[:, :, None, None])  # the mean's share, broadcast over H×W
    index, share = argmax.long(), gmax.to(gx.dtype)  # the max's share, at each channel's first maximum
    if channels_last:  # [N, H·W, C] view of NHWC memory
        gx.permute(0, 2, 3, 1).view(n, h * w, c).scatter_add_(1, index.unsqueeze(1), share.unsqueeze(1))
    else:
        gx.view(n, c, h * w).scatter_add_(2, index.unsqueeze(2), share.unsqueeze(2))
    return gx
