"""scale_stack on the cpu backend beyond the shared op suite: channel and spatial gates, one to several units, odd
channel counts (vector paths and a scalar rest), both layouts, the low-precision dtypes, an empty batch, and the
errors that name bad input."""
from __future__ import annotations

import pytest
import torch

import fastnas.ops as ops
from helpers import BACKENDS

pytestmark = pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")


def _inputs(N, C, H, W, units, kind, dtype=torch.float64, channels_last=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    shape = (N, units * C) if kind == "channel" else (N, units, H, W)
    logits = torch.randn(shape, generator=g, dtype=torch.float64).to(torch.float64 if dtype == torch.float64
                                                                     else torch.float32)
    return x, logits


def _check(x, logits, tol):
    x, logits = x.detach().requires_grad_(), logits.detach().requires_grad_()
    out = ops.scale_stack(x, logits, backend="cpu")
    ref_in = [t.detach().double().requires_grad_() for t in (x, logits)]
    ref = ops.reference.scale_stack(*ref_in)
    assert out.dtype == x.dtype and out.shape == ref.shape
    assert out.is_contiguous(memory_format=torch.channels_last if ops.prefers_channels_last(x)
                             else torch.contiguous_format)
    torch.testing.assert_close(out.double(), ref, **tol)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = torch.autograd.grad(out, (x, logits), grad.to(x.dtype))
    want = torch.autograd.grad(ref, ref_in, grad)
    assert got[0].stride() == x.stride() and got[1].dtype == logits.dtype
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, **tol)


@pytest.mark.parametrize("kind", ["channel", "spatial"])
@pytest.mark.parametrize("C, units", [(1, 1), (8, 3), (17, 4), (33, 2)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_matches_reference_float64(kind, C, units, channels_last):
    _check(*_inputs(3, C, 5, 7, units, kind, channels_last=channels_last), dict(rtol=1e-12, atol=1e-12))


@pytest.mark.parametrize("kind", ["channel", "spatial"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision(kind, dtype):
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
           torch.float16: dict(rtol=2e-3, atol=2e-3)}[dtype]
    _check(*_inputs(2, 16, 4, 4, 3, kind, dtype=dtype), tol)


def test_empty_batch():
    x, logits = _inputs(0, 4, 3, 3, 2, "channel")
    assert ops.scale_stack(x, logits, backend="cpu").shape == (0, 8, 3, 3)


@pytest.mark.parametrize("logits, match", [
    (torch.zeros(2, 7), r"logits must have shape \[N, U\*C\]"),
    (torch.zeros(3, 8), r"logits must have shape"),
    (torch.zeros(2, 2, 4, 5), r"logits must have shape"),
    (torch.zeros(2, 8, dtype=torch.int64), "float"),
])
def test_bad_inputs_are_named(logits, match):
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        ops.scale_stack(x, logits, backend="cpu")
    if logits.is_floating_point():  # the kernel itself names it too
        with pytest.raises((ValueError, RuntimeError), match="logits must have shape"):
            torch.ops.fastnas.scale_stack(x, logits)
