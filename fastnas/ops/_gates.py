"""The whole CBAM channel gate, x · σ(MLP(mean_hw x) + MLP(max_hw x)), as one autograd node.

Composed of a backend's ops, the gate is about ten autograd nodes (pool, concatenation, two linears, ReLU, split,
add, scale) and its input gradient arrives in two parts that autograd adds in an extra pass over the activation.
:class:`FusedChannelGate` runs the compiled ``fastnas::channel_pool`` / ``channel_scale`` / ``channel_scale_backward``
operators with the tiny MLP in between and writes the backward by hand:

* forward: one pass to pool (mean, max, int32 argmax), the MLP on the [2N, C] pooled rows, one pass to scale;
* backward: one pass over (grad, x) for the logits gradient, the MLP's backward, then one pass over grad writing
  the whole input gradient, grad·σ + the mean's share + the max's share at the argmax
  (``fastnas::channel_gate_backward_x``, a CPU kernel; on other devices the scale op and two in-place updates).

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


def fused_applies(x: torch.Tensor, w1: torch.Tensor) -> bool:
    """The fused node needs the activations and the MLP in one dtype, and no autocast (which retypes the linears)."""
    return x.dtype == w1.dtype and not torch.is_autocast_enabled(x.device.type)


class FusedChannelGate(torch.autograd.Function):
    """The channel gate on the compiled operators, one autograd node (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                b2: torch.Tensor | None) -> torch.Tensor:
        ops = torch.ops.fastnas
        avg, mx, argmax = ops.channel_pool.default(x)
        n = avg.shape[0]
        pooled = torch.cat([avg, mx], dim=0)
        hidden = torch.relu(F.linear(pooled, w1, b1))
        both = F.linear(hidden, w2, b2)
        logits = both[:n] + both[n:]
        ctx.save_for_backward(x, argmax, logits, pooled, hidden, w1, w2)
        ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
        return ops.channel_scale.default(x, logits)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, argmax, logits, pooled, hidden, w1, w2 = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        n, c, h, w = x.shape
        # one pass over (grad, x): the logits' gradient Σ_hw grad·x·σ'(logits)
        _, glogits = torch.ops.fastnas.channel_scale_backward.default(grad, x, logits, False)
        gboth = torch.cat([glogits, glogits], dim=0)  # the logits are the sum of the two rows' MLP outputs
        gw2 = gboth.t().mm(hidden) if need_w2 else None
        gb2 = gboth.sum(0) if need_b2 and ctx.has_b2 else None
        ghidden = gboth.mm(w2) * (hidden > 0)
        gw1 = ghidden.t().mm(pooled) if need_w1 else None
        gb1 = ghidden.sum(0) if need_b1 and ctx.has_b1 else None
        if not need_x:
            return None, gw1, gb1, gw2, gb2
        gpooled = ghidden.mm(w1)
        gavg, gmax = gpooled[:n], gpooled[n:]
        if x.device.type == "cpu":  # one pass over grad: grad·σ + the mean's share + the max's share at the argmax
            gx = torch.ops.fastnas.channel_gate_backward_x.default(grad, logits, gavg, gmax, argmax)
        else:
            gx = _input_grad_composed(grad, logits, gavg, gmax, argmax)
        return gx, gw1, gb1, gw2, gb2


def _input_grad_composed(grad: torch.Tensor, logits: torch.Tensor, gavg: torch.Tensor, gmax: torch.Tensor,
                         argmax: torch.Tensor) -> torch.Tensor:
    """What ``fastnas::channel_gate_backward_x`` computes, from the scale op and two in-place updates (devices
    without that kernel)."""
    n, c, h, w = grad.shape
    gx = torch.ops.fastnas.channel_scale.default(grad, logits)  # grad·σ(logits): the scale's own kernel
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
