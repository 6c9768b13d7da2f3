"""edge_sums: the weighted sums of every edge leaving one search-cell state, in one call.

The candidate outputs of a state's n outgoing edges arrive as a few stacked tensors, the terms. A term is either
shared by every edge (``per_edge[t] = 0``: the state itself for skip_connect, the pooled pair; each of its C-channel
units is one candidate) or holds one unit per edge per candidate (``per_edge[t] = 1``: unit g·n + e is candidate g of
edge e, as the separable convolutions of all edges are stacked). With ``weights`` [n, K] (K: the candidates of all
terms, in term order and, within a term, unit order), edge e's sum is

    out[:, e·C:(e+1)·C] = partial[:, e·C:(e+1)·C] + Σ_k weights[e, k] · (candidate k of edge e)

``partial`` (optional, [N, n·C, H, W]) carries in the sums of earlier states' edges into the same nodes: a node is the
running sum over its sources, with no op per node and no view per edge. Terms may be channel slices of wider
channels_last tensors (read where they are). One backward call returns every term's gradient (a shared unit's summed
over the edges) and, when needed, the weights'; the partial's gradient is the output's, passed on without a copy.
Terms are kept for the backward only when the weights need a gradient; double backward differentiates the reference.
A backend without kernels runs an einsum per term (a few calls, whatever the number of edges and candidates).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import checks, layout
from ..backend import select
from ..opdef import Kernel, Op, Sample, backward_kernels, flat_needs, param_dtype, tensor

OP = "edge_sums"


def _units(terms: Sequence[torch.Tensor], per_edge: Sequence[int], n: int, channels: int) -> list[list[list[int]]]:
    """Per term, per candidate column, the unit each edge reads: shared units by every edge, unit g·n + e by edge
    e."""
    columns = []
    for x, pe in zip(terms, per_edge):
        units = x.shape[1] // channels
        columns.append([list(range(g * n, g * n + n)) for g in range(units // n)] if pe else
                       [[u] * n for u in range(units)])
    return columns


def check(terms: Sequence[torch.Tensor], weights: torch.Tensor, per_edge: Sequence[int], channels: int,
          partial: torch.Tensor | None) -> None:
    checks.check_tensor_list(OP, "terms", terms)
    if len(terms) == 0:
        raise ValueError(f"fastnas.{OP}: terms must hold at least one tensor")
    checks.check_float(OP, "weights", weights)
    if weights.dim() != 2 or weights.shape[0] == 0:
        raise ValueError(f"fastnas.{OP}: weights must have shape [edges, candidates], got {list(weights.shape)}")
    if len(per_edge) != len(terms) or any(pe not in (0, 1) for pe in per_edge):
        raise ValueError(f"fastnas.{OP}: per_edge must hold a 0 or 1 per term ({len(terms)}), got {list(per_edge)}")
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"fastnas.{OP}: channels must be a positive int, got {channels!r}")
    n, x0, K = weights.shape[0], terms[0], 0
    for t, (x, pe) in enumerate(zip(terms, per_edge)):
        checks.check_4d(OP, f"terms[{t}]", x)
        checks.check_float(OP, f"terms[{t}]", x)
        if x.dtype != x0.dtype:
            raise TypeError(f"fastnas.{OP}: terms[{t}] has dtype {x.dtype}, expected {x0.dtype} (of terms[0])")
        checks.check_same_device(OP, f"terms[{t}]", x, "terms[0]", x0)
        step = channels * (n if pe else 1)
        if x.shape[0] != x0.shape[0] or x.shape[2:] != x0.shape[2:] or x.shape[1] == 0 or x.shape[1] % step:
            raise ValueError(f"fastnas.{OP}: terms[{t}] has shape {list(x.shape)}: expected [{x0.shape[0]}, a "
                             f"multiple of {step}, {x0.shape[2]}, {x0.shape[3]}]")
        K += x.shape[1] // step
    if weights.shape[1] != K:
        raise ValueError(f"fastnas.{OP}: weights must have shape [{n}, {K}] (edges, the terms' candidates), got "
                         f"{list(weights.shape)}")
    checks.check_same_device(OP, "weights", weights, "terms[0]", x0)
    if partial is not None:
        checks.check_float(OP, "partial", partial)
        expected = [x0.shape[0], n * channels, *x0.shape[2:]]
        if list(partial.shape) != expected or partial.dtype != x0.dtype:
            raise ValueError(f"fastnas.{OP}: partial must be a {x0.dtype} tensor of shape {expected}, got "
                             f"{partial.dtype} {list(partial.shape)}")
        checks.check_same_device(OP, "partial", partial, "terms[0]", x0)


def _sums(terms, weights, per_edge, channels, partial):
    n, C = weights.shape[0], channels
    acc = layout.acc_dtype(terms[0].dtype)
    w = weights.to(acc)
    sources = [(x, units) for x, t_columns in zip(terms, _units(terms, per_edge, n, C)) for units in t_columns]
    outs = []
    for e in range(n):
        out = partial[:, e * C:(e + 1) * C].to(acc) if partial is not None else None
        for k, (x, units) in enumerate(sources):
            u = units[e]
            term = x[:, u * C:(u + 1) * C].to(acc) * w[e, k]
            out = term if out is None else out + term
        outs.append(out)
    return torch.cat(outs, 1).to(terms[0].dtype)


def _batched_sums(terms, weights, per_edge, channels, partial):
    """The same sums as a few batched calls per term (an einsum over the term's units), not one per edge and
    candidate: what runs where a backend has no kernel of its own (and the reference backend's forward)."""
    n, C = weights.shape[0], channels
    acc = layout.acc_dtype(terms[0].dtype)
    w = weights.to(acc)
    out = partial.to(acc).unflatten(1, (n, C)) if partial is not None else None  # [N, n, C, H, W]
    k = 0
    for x, pe in zip(terms, per_edge):
        units = x.shape[1] // C
        columns = units // n if pe else units
        if pe:  # unit g·n + e: [N, g, e, C, H, W]
            part = torch.einsum("ngechw,eg->nechw", x.to(acc).unflatten(1, (columns, n, C)), w[:, k:k + columns])
        else:  # shared units: [N, u, C, H, W]
            part = torch.einsum("nuchw,eu->nechw", x.to(acc).unflatten(1, (columns, C)), w[:, k:k + columns])
        out = part if out is None else out + part
        k += columns
    return out.flatten(1, 2).to(terms[0].dtype)


def reference(terms: Sequence[torch.Tensor], weights: torch.Tensor, per_edge: Sequence[int], channels: int,
              partial: torch.Tensor | None = None) -> torch.Tensor:
    """Per edge e, ``partial``'s C channels of e plus Σ_k weights[e, k] · candidate k of edge e (see the module
    docstring), concatenated along the channels."""
    check(terms, weights, per_edge, channels, partial)
    return _sums(terms, weights, per_edge, channels, partial)


def _forward_kernel(terms, weights, per_edge, channels, partial):
    out = _batched_sums(terms, weights, per_edge, channels, partial)
    return layout.shaped(out.shape, terms[0], layout.prefers_channels_last(terms[0])).copy_(out)


def _backward_kernel(grad, terms, weights, per_edge, units, need_terms_grad, need_weights_grad):
    n = weights.shape[0]
    C = grad.shape[1] // n
    if not terms:  # only the terms' gradients: their sizes, not their values
        terms = [grad.new_empty(()).expand(grad.shape[0], u * C, *grad.shape[2:]) for u in units]
    acc = layout.acc_dtype(grad.dtype)
    g, w = grad.to(acc), weights.to(acc)
    edge_grads = [g[:, e * C:(e + 1) * C] for e in range(n)]
    grads, weight_grads, k = [], [], 0
    for x, t_columns in zip(terms, _units(terms, per_edge, n, C)):
        unit_grads = [None] * (x.shape[1] // C)
        for units_of in t_columns:
            for e, u in enumerate(units_of):
                share = edge_grads[e] * w[e, k]
                unit_grads[u] = share if unit_grads[u] is None else unit_grads[u] + share
            if need_weights_grad:
                weight_grads.append(torch.stack([(edge_grads[e] * x[:, u * C:(u + 1) * C].to(acc)).sum()
                                                 for e, u in enumerate(units_of)]))
            k += 1
        if need_terms_grad:
            out = layout.shaped(x.shape, grad, layout.prefers_channels_last(grad))
            grads.append(out.copy_(torch.cat(unit_grads, 1)))
    gw = torch.stack(weight_grads, 1) if need_weights_grad else weights.new_zeros((0,))
    return grads, (layout.like(weights).copy_(gw) if need_weights_grad else gw)


KERNELS = {
    OP: Kernel("(Tensor[] terms, Tensor weights, int[] per_edge, int channels, Tensor? partial) -> Tensor",
               _forward_kernel),
    # (the grad of every term (none unless need_terms_grad), grad weights (empty unless need_weights_grad)); the
    # terms are read for the weights' gradient only (else an empty list: units gives each term's size, in C units)
    f"{OP}_backward": Kernel("(Tensor grad, Tensor[] terms, Tensor weights, int[] per_edge, int[] units, "
                             "bool need_terms_grad, bool need_weights_grad) -> (Tensor[], Tensor)", _backward_kernel),
}
REFERENCES = {name: k.reference for name, k in KERNELS.items()}


def _autograd(kernels: dict):
    def setup_context(ctx, inputs, output):
        terms, weights, per_edge, _, _ = inputs
        k = len(terms)
        need = flat_needs(ctx, k + 4)
        ctx.num_terms, ctx.need_terms, ctx.need_w, ctx.need_partial = k, any(need[:k]), need[k], need[k + 3]
        ctx.per_edge, ctx.units = list(per_edge), [x.shape[1] // inputs[3] for x in terms]
        ctx.save_for_backward(weights, *(terms if ctx.need_w else ()))

    def backward(ctx, grad):
        weights, *terms = ctx.saved_tensors
        gterms, gw = [None] * ctx.num_terms, None
        if ctx.need_terms or ctx.need_w:
            run = backward_kernels(kernels, REFERENCES)
            grads, gw = run[f"{OP}_backward"](grad, terms, weights, ctx.per_edge, ctx.units, ctx.need_terms,
                                              ctx.need_w)
            gterms = list(grads) if ctx.need_terms else gterms
            gw = gw if ctx.need_w else None
        return gterms, gw, None, None, (grad if ctx.need_partial else None)

    return backward, setup_context


AUTOGRAD = {OP: _autograd}


def edge_sums(terms: Sequence[torch.Tensor], weights: torch.Tensor, per_edge: Sequence[int], channels: int,
              partial: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """The sums of the n = ``weights.shape[0]`` edges leaving a state, [N, n·channels, H, W] (see the module
    docstring), on the backend's kernels where it has them."""
    per_edge = [int(pe) for pe in per_edge]
    check(terms, weights, per_edge, channels, partial)
    kernel = select(terms[0].device.type, backend).kernels.get(OP)
    if kernel is None or torch.is_autocast_enabled(terms[0].device.type):
        return _batched_sums(terms, weights, per_edge, channels, partial)
    return kernel(list(terms), weights, per_edge, channels, partial)


OPS = {OP: Op(edge_sums, reference)}


def sample_inputs(device, dtype, shape=(2, 3, 5, 3)) -> list[Sample]:
    N, C, H, W = shape
    n = 2
    state = tensor(shape, device, dtype, channels_last=True)
    pooled = tensor((N, 2 * C, H, W), device, dtype, channels_last=True, seed=1)
    stack = tensor((N, 2 * n * C, H, W), device, dtype, channels_last=True, seed=2)  # 2 candidates of n edges
    partial = tensor((N, n * C, H, W), device, dtype, channels_last=True, seed=3)
    weights, weights3 = tensor((n, 5), device, param_dtype(dtype), seed=4), tensor((n, 3), device, param_dtype(dtype))
    wide = tensor((N, 3 * n * C, H, W), device, dtype, channels_last=True, seed=5)
    return [
        Sample(OP, [weights, state, pooled, stack, partial],
               lambda b, w, s, p, x, q: edge_sums([s, p, x], w, [0, 0, 1], C, q, backend=b), amp=True),
        # no partial; a per-edge term read as a channel slice of a wider tensor
        Sample(f"{OP}_slice", [weights3, wide, state],
               lambda b, w, x, s: edge_sums([s, x[:, n * C:]], w, [0, 1], C, backend=b)),
    ]
