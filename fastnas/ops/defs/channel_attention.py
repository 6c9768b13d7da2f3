"""channel_attention: the whole CBAM channel gate, x·σ(MLP(mean_hw x) + MLP(max_hw x)), as one autograd node.

Composed of ops, the gate is about ten autograd nodes (pool, concatenation, two linears, ReLU, split, add, scale) and
its input gradient arrives in two parts that autograd adds in an extra pass over the activation.
The op ``fastnas_ops::channel_attention`` is one node with a hand-written backward, on the selected backend's
kernels:

* with the optional whole-gate kernels (``channel_gate``, ``channel_gate_backward``; the ``cpu`` backend's run the
  gate image by image while it is in the core's cache), x and grad are read from memory once each;
* otherwise the backend's ``channel_pool`` and ``channel_scale`` kernels with the MLP in PyTorch between them, and
  the input gradient from the scale kernel and two in-place updates.

Only x, the argmax, the logits, the pooled rows and the hidden activations are kept. The arithmetic is that of the
reference composition (:func:`reference`); higher derivatives differentiate that composition again.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import checks, layout
from ..backend import get, select
from ..opdef import Kernel, Op, Sample, define_op, partial_vjp, tensor
from . import channel_pool as _pool
from . import scale as _scale

OP = "channel_attention"


def check(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
          b2: torch.Tensor | None) -> None:
    checks.check_4d(OP, "x", x)
    c = x.shape[1]
    checks.check_float(OP, "w1", w1)
    if w1.dim() != 2 or w1.shape[1] != c or w1.shape[0] < 1:
        raise ValueError(f"fastnas.{OP}: w1 must have shape [hidden, {c}] (hidden >= 1) for x of shape "
                         f"{list(x.shape)}, got {list(w1.shape)}")
    hidden = w1.shape[0]
    checks.check_float(OP, "w2", w2)
    if list(w2.shape) != [c, hidden]:
        raise ValueError(f"fastnas.{OP}: w2 must have shape [{c}, {hidden}] (channels, hidden), got {list(w2.shape)}")
    for name, b, n in (("b1", b1, hidden), ("b2", b2, c)):
        if b is None:
            continue
        checks.check_float(OP, name, b)
        if list(b.shape) != [n]:
            raise ValueError(f"fastnas.{OP}: {name} must have shape [{n}], got {list(b.shape)}")
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if t is not None:
            checks.check_same_device(OP, name, t, "x", x)
            if t.dtype != w1.dtype:
                raise TypeError(f"fastnas.{OP}: {name} has dtype {t.dtype}, expected {w1.dtype} (the dtype of w1)")


def mlp(pooled: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
        b2: torch.Tensor | None) -> torch.Tensor:
    return F.linear(torch.relu(F.linear(pooled, w1, b1)), w2, b2)


def composite(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
              b2: torch.Tensor | None, backend: str | None = None) -> torch.Tensor:
    """The gate composed of ``channel_pool`` and ``channel_scale`` (the reference's, or a backend's)."""
    avg, mx = _pool.channel_pool(x, backend=backend) if backend else _pool.reference(x)
    n = avg.shape[0]
    both = mlp(torch.cat([avg, mx], dim=0), w1, b1, w2, b2)  # one MLP pass for both pooled rows
    logits = both[:n] + both[n:]
    return _scale.channel_scale(x, logits, backend=backend) if backend else _scale.reference_channel_scale(x, logits)


def reference(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
              b2: torch.Tensor | None = None) -> torch.Tensor:
    """x·σ(MLP(mean_hw x) + MLP(max_hw x))[:, :, None, None] with MLP(p) = relu(p w1ᵀ + b1) w2ᵀ + b2."""
    check(x, w1, b1, w2, b2)
    return composite(x, w1, b1, w2, b2)


def _gate_kernel(x, w1, b1, w2, b2):
    check(x, w1, b1, w2, b2)
    avg, mx, argmax = _pool.KERNELS["channel_pool"].reference(x)
    n = avg.shape[0]
    pooled = torch.cat([avg, mx], dim=0)
    hidden = torch.relu(F.linear(pooled, w1, b1))
    both = F.linear(hidden, w2, b2)
    logits = both[:n] + both[n:]
    return layout.like(x).copy_(_scale.reference_channel_scale(x, logits)), pooled, hidden, logits, argmax


def _gate_backward_kernel(grad, x, argmax, logits, hidden, w1, w2, need_x_grad):
    gx, glogits, ghidden = _backward_composed(_scale.REFERENCES, grad, argmax, x, logits, hidden, w1, w2, need_x_grad)
    gx = layout.like(grad).copy_(gx) if need_x_grad else grad.new_empty(0)
    return gx, glogits.contiguous(), ghidden.contiguous()


KERNELS = {
    # (out, pooled [2N, C] (means, then maxima), hidden [2N, hid], logits [N, C], int32 argmax [N, C])
    "channel_gate": Kernel("(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2) "
                           "-> (Tensor, Tensor, Tensor, Tensor, Tensor)", _gate_kernel),
    # (grad x (an empty tensor unless need_x_grad), grad logits [N, C], grad hidden [2N, hid])
    "channel_gate_backward": Kernel("(Tensor grad, Tensor x, Tensor argmax, Tensor logits, Tensor hidden, Tensor w1, "
                                    "Tensor w2, bool need_x_grad) -> (Tensor, Tensor, Tensor)", _gate_backward_kernel),
}


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


def _gate(x, w1, b1, w2, b2, backend: str):
    kernels = get(backend).kernels
    if "channel_gate" in kernels:  # pool, MLP and scale in one kernel
        return kernels["channel_gate"](x, w1, b1, w2, b2)
    avg, mx, argmax = kernels["channel_pool"](x)
    n = avg.shape[0]
    pooled = torch.cat([avg, mx], dim=0)
    hidden = torch.relu(F.linear(pooled, w1, b1))
    both = F.linear(hidden, w2, b2)
    logits = both[:n] + both[n:]
    return kernels["channel_scale"](x, logits), pooled, hidden, logits, argmax


def _gate_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, ctx.backend = inputs
    _, pooled, hidden, logits, argmax = output
    ctx.mark_non_differentiable(pooled, hidden, logits, argmax)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, argmax, logits, pooled, hidden, w1, w2, b1, b2)


def _gate_backward(ctx, grad, *_):
    x, argmax, logits, pooled, hidden, w1, w2, b1, b2 = ctx.saved_tensors
    needs = ctx.needs_input_grad[:5]
    if grad is None:
        return (None,) * 6
    if torch.is_grad_enabled():  # create_graph: differentiate the reference composition again
        return (*_differentiated(grad, (x, w1, b1, w2, b2), needs), None)
    kernels = get(ctx.backend).kernels
    need_x, need_w1, need_b1, need_w2, need_b2 = needs
    if "channel_gate_backward" in kernels:  # the logits', hidden rows' and input's gradients in one kernel
        gx, glogits, ghidden = kernels["channel_gate_backward"](grad, x, argmax, logits, hidden, w1, w2, need_x)
    else:
        gx, glogits, ghidden = _backward_composed(kernels, grad, argmax, x, logits, hidden, w1, w2, need_x)
    gboth = torch.cat([glogits, glogits], dim=0)  # the logits are the sum of the two rows' MLP outputs
    gw2 = gboth.t().mm(hidden) if need_w2 else None
    gb2 = gboth.sum(0) if need_b2 and b2 is not None else None
    gw1 = ghidden.t().mm(pooled) if need_w1 else None
    gb1 = ghidden.sum(0) if need_b1 and b1 is not None else None
    return (gx if need_x else None), gw1, gb1, gw2, gb2, None


# the gate on a backend's kernels (backend: its name), one autograd node: (out, pooled, hidden, logits, argmax)
FUSED = define_op("channel_attention", "(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, str backend) "
                  "-> (Tensor, Tensor, Tensor, Tensor, Tensor)", _gate, _gate_backward, _gate_setup)


def _differentiated(grad: torch.Tensor, inputs: tuple, needs: tuple) -> list:
    """The gradients of the reference gate with a graph (for higher derivatives)."""
    return partial_vjp(reference, inputs, grad, needs)


def _backward_composed(kernels, grad: torch.Tensor, argmax: torch.Tensor, x: torch.Tensor, logits: torch.Tensor,
                       hidden: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, need_x: bool):
    """What ``channel_gate_backward`` computes, from the ``channel_scale`` kernels, the MLP's backward in PyTorch and
    :func:`_input_grad_composed`."""
    glogits = kernels["channel_scale_backward"](grad, x, logits, False)[1]  # one pass: Σ_hw grad·x·σ'(logits)
    ghidden = torch.cat([glogits, glogits], dim=0).mm(w2) * (hidden > 0)
    if not need_x:
        return None, glogits, ghidden
    n = logits.shape[0]
    gpooled = ghidden.mm(w1)
    return _input_grad_composed(kernels["channel_scale"], grad, logits, gpooled[:n], gpooled[n:], argmax), \
        glogits, ghidden


def _input_grad_composed(scale, grad: torch.Tensor, logits: torch.Tensor, gavg: torch.Tensor, gmax: torch.Tensor,
                         argmax: torch.Tensor) -> torch.Tensor:
    """grad·σ(logits) + gavg / (H·W) + gmax at each channel's argmax, from the scale kernel and two in-place
    updates."""
    n, c, h, w = grad.shape
    gx = scale(grad, logits)  # grad·σ(logits): the scale's own kernel
    channels_last = layout.prefers_channels_last(gx)
    if not channels_last:
        gx = gx.contiguous()  # (a no-op for NCHW)
    gx.add_((gavg / (h * w)).to(gx.dtype)[:, :, None, None])  # the mean's share, broadcast over H×W
    index, share = argmax.long(), gmax.to(gx.dtype)  # the max's share, at each channel's first maximum
    if channels_last:  # [N, H·W, C] view of NHWC memory
        gx.permute(0, 2, 3, 1).view(n, h * w, c).scatter_add_(1, index.unsqueeze(1), share.unsqueeze(1))
    else:
        gx.view(n, c, h * w).scatter_add_(2, index.unsqueeze(2), share.unsqueeze(2))
    return gx


def channel_attention(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                      b2: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """The whole CBAM channel gate: x·σ(MLP(mean_hw x) + MLP(max_hw x))[:, :, None, None] with the shared
    MLP(p) = relu(p w1ᵀ + b1) w2ᵀ + b2 (w1 [hidden, C], w2 [C, hidden]; biases may be None). One autograd node on a
    backend with kernels (``fastnas_ops::channel_attention``); the reference composes its pool and scale."""
    check(x, w1, b1, w2, b2)
    chosen = select(x.device.type, backend)
    if not chosen.kernels:
        return composite(x, w1, b1, w2, b2)
    params = fused_params(x, w1, b1, w2, b2)
    if params is None:
        return composite(x, w1, b1, w2, b2, chosen.name)
    return FUSED(x, *params, chosen.name)[0]


OPS = {"channel_attention": Op(channel_attention, reference)}


def sample_inputs(device, dtype, shape=(2, 3, 5, 3)) -> list[Sample]:
    c = shape[1]
    params = [tensor(s, device, dtype, seed=k) for k, s in enumerate([(2, c), (2,), (c, 2), (c,)], start=1)]
    return [Sample("channel_attention", [tensor(shape, device, dtype, channels_last=True), *params],
                   lambda b, *a: channel_attention(*a, backend=b))]
