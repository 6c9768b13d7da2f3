"""depthwise_stack on the cpu backend beyond the shared op suite: the kernels' vector paths (channel counts of 1 to 4
vectors and a scalar rest, rows with and without full windows), strides, both layouts, the fused ReLU, a channel
slice read in place, the low-precision dtypes, an empty batch, and the errors that name bad input."""
from __future__ import annotations

import pytest
import torch

import fastnas.ops as ops
from helpers import BACKENDS

pytestmark = pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")

# (units per column, kernel, stride, padding, dilation) per column
SHARED = [(2, 3, 1, 1, 1), (1, 5, 1, 2, 1), (2, 3, 1, 2, 2), (1, 5, 1, 4, 2)]
STRIDED = [(2, 3, 2, 1, 1), (1, 5, 2, 2, 1), (1, 3, 2, 2, 2), (1, 5, 2, 4, 2)]


def _inputs(N, C, H, W, cols, dtype=torch.float64, channels_last=True, own=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(u * C for u, *_ in cols)
    x = torch.randn(N, total if own else C, H, W, generator=g, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    ws = [torch.randn(u * C, 1, k, k, generator=g, dtype=dtype) for u, k, *_ in cols]
    conf = [[c[i] for c in cols] for i in (2, 3, 4)]
    return x, ws, conf


def _check(x, ws, conf, tol, relu=False, view=None):
    """The op on x (on ``view(x)``, a view of it, if given) against the reference composition in float64."""
    x = x.detach().requires_grad_()
    ws = [w.detach().requires_grad_() for w in ws]
    same_strides, view = view is None, view or (lambda t: t)
    out = ops.depthwise_stack(view(x), ws, *conf, relu, backend="cpu")
    ref_in = [t.detach().double().requires_grad_() for t in (x, *ws)]
    ref = ops.reference.depthwise_stack(view(ref_in[0]), ref_in[1:], *conf, relu)
    assert out.dtype == x.dtype and out.shape == ref.shape
    # channels_last where x prefers it, and for a channel slice of a channels_last tensor
    channels_last = ops.prefers_channels_last(x) or not same_strides
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(out.double(), ref, **tol)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = torch.autograd.grad(out, (x, *ws), grad.to(x.dtype))
    want = torch.autograd.grad(ref, ref_in, grad)
    assert got[0].stride() == x.stride() or not same_strides
    for a, b in zip(got, want):
        scale = max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a.double() / scale, b / scale, **tol)


@pytest.mark.parametrize("C", [1, 3, 8, 16, 24, 33])
@pytest.mark.parametrize("cols", [SHARED, STRIDED], ids=["stride1", "stride2"])
def test_matches_reference_float64(C, cols):
    _check(*_inputs(2, C, 9, 11, cols), dict(rtol=1e-10, atol=1e-10))


@pytest.mark.parametrize("C", [3, 16, 33])
@pytest.mark.parametrize("cols", [SHARED, STRIDED], ids=["stride1", "stride2"])
def test_fused_relu_float64(C, cols):
    x, ws, conf = _inputs(2, C, 9, 11, cols)
    x[0, :, :2] = 0.0  # ReLU's kink: its gradient there is 0, as torch.relu's
    _check(x, ws, conf, dict(rtol=1e-10, atol=1e-10), relu=True)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("start", [0, 5])
def test_channel_slice_read_in_place(relu, start):
    """A channel slice of a wider channels_last tensor (the separable convolutions' first halves, out of the stage-1
    output they share with the dilated convolutions) is read where it is."""
    cols = [(1, 3, 1, 1, 1), (1, 5, 1, 2, 1)]
    x, ws, conf = _inputs(2, 16, 7, 6, cols, own=True)
    wide = torch.randn(2, 40, 7, 6, dtype=torch.float64).to(memory_format=torch.channels_last)
    _check(wide, ws, conf, dict(rtol=1e-10, atol=1e-10), relu=relu, view=lambda t: t[:, start:start + 32])


def test_fused_relu_saves_the_input_for_its_mask():
    x, ws, conf = _inputs(2, 4, 6, 6, SHARED)
    x.requires_grad_()
    out = ops.depthwise_stack(x, ws, *conf, relu=True, backend="cpu")
    assert any(t is not None and t.shape == x.shape for t in out.grad_fn.saved_tensors)


@pytest.mark.parametrize("channels_last", [True, False])
def test_own_channels_and_layouts(channels_last):
    cols = [(2, 3, 1, 1, 1), (1, 5, 1, 2, 1)]
    _check(*_inputs(3, 8, 10, 7, cols, channels_last=channels_last, own=True), dict(rtol=1e-10, atol=1e-10))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    tol = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
           torch.float16: dict(rtol=3e-3, atol=3e-3)}[dtype]
    _check(*_inputs(2, 16, 8, 8, SHARED, dtype=dtype), tol)


def test_empty_batch():
    x, ws, conf = _inputs(0, 4, 6, 6, SHARED)
    assert ops.depthwise_stack(x, ws, *conf, backend="cpu").shape == (0, 24, 6, 6)


def test_saves_the_input_only_for_the_weight_gradient():
    x, ws, conf = _inputs(2, 4, 6, 6, SHARED)
    x.requires_grad_()
    out = ops.depthwise_stack(x, ws, *conf, backend="cpu")  # frozen weights: the input gradient needs only them
    assert all(t is None or t.shape != x.shape for t in out.grad_fn.saved_tensors)


@pytest.mark.parametrize("call, match", [
    (lambda x, w: ops.depthwise_stack(x, [], [], [], []), "at least one"),
    (lambda x, w: ops.depthwise_stack(x, [w], [1, 1], [1], [1]), "one value per weight"),
    (lambda x, w: ops.depthwise_stack(x, [w.view(2, 4, 3, 3)], [1], [1], [1]), r"shape \[n, 1, kh, kw\]"),
    (lambda x, w: ops.depthwise_stack(x, [w, w], [1, 2], [1, 1], [1, 1]), "column 1 gives outputs of 3x3"),
    (lambda x, w: ops.depthwise_stack(x, [w], [1], [0], [9]), "do not fit"),
    (lambda x, w: ops.depthwise_stack(x[0], [w], [1], [1], [1]), "4-D"),
    (lambda x, w: torch.ops.fastnas.depthwise_stack(x, [w], [1], [1, 1], [1, 1], False), "two values per weight"),
])
def test_bad_inputs_are_named(call, match):
    x, w = torch.randn(2, 4, 5, 5), torch.randn(8, 1, 3, 3)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call(x, w)
