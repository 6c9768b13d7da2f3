"""edge_sums on the cpu backend beyond the shared op suite: shared and per-edge terms, one to several edges, odd
channel counts (vector paths and a scalar rest), channel slices read in place (terms and the partial), both layouts,
frozen weights, the low-precision dtypes, an empty batch, and the errors that name bad input."""
from __future__ import annotations

import pytest
import torch

import fastnas.ops as ops
from helpers import BACKENDS

pytestmark = pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")


def _inputs(N, C, H, W, n, dtype=torch.float64, channels_last=True, seed=0):
    """A state (shared), a pooled pair (shared, 2 units), a stack of 3 candidates per edge, a partial, weights."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        t = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
        return t.contiguous(memory_format=torch.channels_last) if channels_last and len(shape) == 4 else t

    terms = [rand(N, C, H, W), rand(N, 2 * C, H, W), rand(N, 3 * n * C, H, W)]
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32
    weights = torch.randn(n, 6, generator=g, dtype=torch.float64).to(wdtype)
    return terms, [0, 0, 1], weights, rand(N, n * C, H, W)


def _check(terms, per_edge, weights, partial, C, tol, views=None):
    """The op against the reference in float64, forward and every gradient; ``views`` maps the leaf inputs to the
    op's inputs (channel slices, say)."""
    leaves = [t.detach().requires_grad_() for t in (*terms, weights, *(() if partial is None else (partial,)))]
    views = views or (lambda *ts: ts)
    *ts, w = leaves[:len(terms) + 1]
    q = leaves[-1] if partial is not None else None
    args = views(*ts, q) if partial is not None else views(*ts, None)
    out = ops.edge_sums(list(args[:-1]), w, per_edge, C, args[-1], backend="cpu")
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    *rts, rw = ref_leaves[:len(terms) + 1]
    rq = ref_leaves[-1] if partial is not None else None
    rargs = views(*rts, rq)
    ref = ops.reference.edge_sums(list(rargs[:-1]), rw, per_edge, C, rargs[-1])
    assert out.dtype == terms[0].dtype and out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, **tol)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = torch.autograd.grad(out, leaves, grad.to(out.dtype))
    want = torch.autograd.grad(ref, ref_leaves, grad)
    for a, b, leaf in zip(got, want, leaves):
        assert a.dtype == leaf.dtype
        scale = max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a.double() / scale, b / scale, **tol)


@pytest.mark.parametrize("C", [1, 5, 16, 17])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("with_partial", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
def test_matches_reference_float64(C, n, with_partial, channels_last):
    terms, per_edge, weights, partial = _inputs(2, C, 5, 3, n, channels_last=channels_last)
    _check(terms, per_edge, weights, partial if with_partial else None, C, dict(rtol=1e-12, atol=1e-12))


def test_channel_slices_read_in_place():
    """Per-edge terms and the partial as channel slices of wider channels_last tensors (the stage-1 output's dilated
    part, the running node sums after the finished node)."""
    C, n = 8, 2
    terms, per_edge, weights, _ = _inputs(2, C, 4, 5, n)
    wide = torch.randn(2, 3 * n * C + 4 * C, 4, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    partial = torch.randn(2, (n + 1) * C, 4, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    terms[2] = wide

    def views(state, pooled, stack, q):
        return state, pooled, stack[:, 4 * C:], q[:, C:]
    _check(terms, per_edge, weights, partial, C, dict(rtol=1e-12, atol=1e-12), views)


def test_frozen_weights_keep_no_terms_and_pass_the_partial_gradient_on():
    terms, per_edge, weights, partial = _inputs(2, 4, 3, 3, 2)
    terms = [t.requires_grad_() for t in terms]
    partial.requires_grad_()
    out = ops.edge_sums(terms, weights, per_edge, 4, partial, backend="cpu")
    assert all(t is None or t.shape == weights.shape for t in out.grad_fn.saved_tensors)
    grad = torch.randn_like(out)
    gpartial, *_ = torch.autograd.grad(out, [partial, *terms], grad)
    assert torch.equal(gpartial, grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
           torch.float16: dict(rtol=3e-3, atol=3e-3)}[dtype]
    terms, per_edge, weights, partial = _inputs(2, 16, 4, 4, 3, dtype=dtype)
    _check(terms, per_edge, weights, partial, 16, tol)


def test_empty_batch():
    terms, per_edge, weights, partial = _inputs(0, 4, 3, 3, 2)
    assert ops.edge_sums(terms, weights, per_edge, 4, partial, backend="cpu").shape == (0, 8, 3, 3)


@pytest.mark.parametrize("change, match", [
    (lambda a: {**a, "terms": []}, "at least one"),
    (lambda a: {**a, "per_edge": [0, 0]}, "per_edge must hold"),
    (lambda a: {**a, "weights": a["weights"][:, :5]}, r"weights must have shape \[2, 6\]"),
    (lambda a: {**a, "terms": [a["terms"][0], a["terms"][1], a["terms"][2][:, :5]]}, "multiple of 8"),
    (lambda a: {**a, "partial": a["partial"][:, :4]}, "partial must be"),
    (lambda a: {**a, "channels": 0}, "channels must be"),
])
def test_bad_inputs_are_named(change, match):
    terms, per_edge, weights, partial = _inputs(2, 4, 3, 3, 2)
    args = change(dict(terms=terms, weights=weights, per_edge=per_edge, channels=4, partial=partial))
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        ops.edge_sums(args["terms"], args["weights"], args["per_edge"], args["channels"], args["partial"],
                      backend="cpu")


@pytest.mark.parametrize("with_partial", [True, False])
def test_the_batched_composition_equals_the_reference(with_partial):
    """Where a backend has no kernel, a few einsums per term compute the same sums (and gradients)."""
    from fastnas.ops.defs.edge_sums import _batched_sums
    terms, per_edge, weights, partial = _inputs(2, 5, 4, 3, 3)
    partial = partial if with_partial else None
    leaves = [t.detach().requires_grad_() for t in (*terms, weights)]
    got = _batched_sums(leaves[:3], leaves[3], per_edge, 5, partial)
    want = ops.reference.edge_sums(leaves[:3], leaves[3], per_edge, 5, partial)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, leaves, grad), torch.autograd.grad(want, leaves, grad)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
