"""The cpu backend's kernels for the network's other layers: depthwise-convolution backward, max / average pooling and
affine-free batch norm. Each against PyTorch's own (float64 exactly, every AMP dtype within its rounding), forward and
every gradient, gradcheck, opcheck, torch.compile, bad inputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastnas.ops as ops
from fastnas.nn import AvgPool2d, MaxPool2d

pytestmark = pytest.mark.skipif(ops.available_backends()["cpu"] != "available",
                                reason="the compiled library is not built")

LAYOUTS = ["nchw", "channels_last", "strided"]
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def _make(shape, dtype, layout, seed=0, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":  # every other column of a wider tensor: contiguous in neither layout
        n, c, h, w = shape
        return (torch.randn(n, c, h, 2 * w, generator=g, dtype=torch.float64) * scale + shift)[..., ::2].to(dtype)
    t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)
    return t.to(memory_format=torch.channels_last) if layout == "channels_last" else t


def _grads(out, wrt, g):
    return torch.autograd.grad(out, wrt, g)


def _assert_close_with_grads(out, ref, wrt, tol):
    """out equals ref within tol, and so do their gradients with respect to the leaves wrt (one random output
    gradient)."""
    torch.testing.assert_close(out, ref, **tol)
    g = torch.randn_like(ref)
    for a, b in zip(_grads(out, wrt, g), _grads(ref, wrt, g)):
        torch.testing.assert_close(a, b, **tol)


# ------------------------------------------------------------------------------------------------ depthwise conv

DW_CONFS = [  # kernel, stride, padding, dilation
    ((3, 3), (1, 1), (1, 1), (1, 1)), ((5, 5), (1, 1), (2, 2), (1, 1)), ((3, 3), (2, 2), (1, 1), (1, 1)),
    ((5, 5), (1, 1), (4, 4), (2, 2)), ((3, 5), (1, 2), (0, 2), (1, 1)), ((7, 7), (1, 1), (3, 3), (1, 1)),
    ((2, 2), (1, 1), (0, 0), (1, 1)), ((3, 3), (1, 1), (3, 3), (1, 1)),  # padding beyond the flipped filter's
]


@pytest.mark.parametrize("conf", DW_CONFS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("channels", [3, 19, 40])
def test_depthwise_matches_torch_float64(conf, layout, channels):
    k, s, p, d = conf
    x = _make((2, channels, 9, 7), torch.float64, layout).requires_grad_()
    w = _make((channels, 1, *k), torch.float64, "nchw", seed=1).requires_grad_()
    ref = F.conv2d(x, w, None, s, p, d, channels)
    _assert_close_with_grads(ops.depthwise_conv2d(x, w, s, p, d, backend="cpu"), ref, (x, w), TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_depthwise_low_precision(dtype):
    x64 = _make((3, 16, 8, 8), torch.float64, "channels_last")
    w64 = _make((16, 1, 5, 5), torch.float64, "nchw", seed=1) * 0.2
    x, w = x64.to(dtype).requires_grad_(), w64.to(dtype).requires_grad_()
    ref_x, ref_w = x64.clone().requires_grad_(), w64.clone().requires_grad_()
    out = ops.depthwise_conv2d(x, w, 1, 2, backend="cpu")
    ref = F.conv2d(ref_x, ref_w, None, 1, 2, 1, 16)
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    g = torch.randn_like(ref) * 0.1
    got = _grads(out, (x, w), g.to(dtype))
    expected = _grads(ref, (ref_x, ref_w), g)
    # the weight gradient sums 3*8*8 products per tap: a looser bound for the half types
    for a, b, scale in zip(got, expected, (1, 4)):
        tol = {k: v * scale for k, v in TOL[dtype].items()}
        torch.testing.assert_close(a.double(), b, **tol)


@pytest.mark.parametrize("need", ["x", "w", "both"])
def test_depthwise_saves_the_input_only_for_the_weight_gradient(need):
    x = _make((2, 4, 6, 6), torch.float64, "channels_last").requires_grad_(need != "w")
    w = _make((4, 1, 3, 3), torch.float64, "nchw", seed=1).requires_grad_(need != "x")
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = ops.depthwise_conv2d(x, w, 1, 1, backend="cpu")
    assert any(t is x for t in saved) == (need != "x")
    wrt = [t for t in (x, w) if t.requires_grad]
    ref = F.conv2d(x, w, None, 1, 1, 1, 4)
    g = torch.randn_like(ref)
    for a, b in zip(_grads(out, wrt, g), _grads(ref, wrt, g)):
        torch.testing.assert_close(a, b)


def test_depthwise_gradcheck_and_double_backward():
    x = _make((2, 3, 5, 6), torch.float64, "channels_last").requires_grad_()
    w = _make((3, 1, 3, 3), torch.float64, "nchw", seed=1).requires_grad_()
    fn = lambda a, b: ops.depthwise_conv2d(a, b, 1, 2, 2, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w))
    assert torch.autograd.gradgradcheck(fn, (x, w))


def test_depthwise_weight_grad_op_opcheck():
    x = _make((2, 5, 7, 6), torch.float32, "channels_last")
    g = torch.randn(2, 5, 4, 3).to(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.fastnas.depthwise_conv2d_weight_grad.default, (g, x, [3, 3], [2, 2], [1, 1], [1, 1]))
    got = torch.ops.fastnas.depthwise_conv2d_weight_grad(g, x, [3, 3], [2, 2], [1, 1], [1, 1])
    w = torch.zeros(5, 1, 3, 3)
    expected = torch.ops.aten.convolution_backward(g, x, w, None, [2, 2], [1, 1], [1, 1], False, [0, 0], 5,
                                                   [False, True, False])[1]
    torch.testing.assert_close(got, expected)


def test_depthwise_empty_batch():
    x = torch.randn(0, 4, 5, 5, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, requires_grad=True)
    out = ops.depthwise_conv2d(x, w, 1, 1, backend="cpu")
    out.sum().backward()
    assert out.shape == (0, 4, 5, 5) and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("bad,match", [
    (lambda: ops.depthwise_conv2d(torch.randn(2, 4, 5, 5), torch.randn(4, 2, 3, 3)), r"weight must have shape \[4, 1"),
    (lambda: ops.depthwise_conv2d(torch.randn(4, 5, 5), torch.randn(4, 1, 3, 3)), "x must be 4-D"),
    (lambda: ops.depthwise_conv2d(torch.ones(2, 4, 5, 5, dtype=torch.int32), torch.randn(4, 1, 3, 3)), "dtype"),
    (lambda: ops.depthwise_conv2d(torch.randn(2, 4, 5, 5), torch.randn(4, 1, 3, 3), stride=0), "stride"),
    (lambda: torch.ops.fastnas.depthwise_conv2d_weight_grad(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 5, 5), [3, 3],
                                                            [1, 1], [1, 1], [1, 1]), r"grad must have shape"),
    (lambda: torch.ops.fastnas.depthwise_conv2d_weight_grad(torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5), [3],
                                                            [1, 1], [1, 1], [1, 1]), "kernel_size"),
])
def test_depthwise_bad_inputs(bad, match):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        bad()


# ------------------------------------------------------------------------------------------------ pooling

POOL_CONFS = [((3, 3), (1, 1), (1, 1)), ((3, 3), (2, 2), (1, 1)), ((2, 2), (2, 2), (0, 0)), ((3, 2), (1, 2), (1, 0)),
              ((5, 5), (2, 2), (2, 2))]
POOLS = {"max": ops.max_pool2d, "avg": ops.avg_pool2d, "pair": ops.pool_pair}


def _torch_pool(kind, k, s, p):
    """PyTorch's pooling of ``kind`` (pair: max then average, concatenated along the channels)."""
    def avg(t):
        return F.avg_pool2d(t, k, s, p, count_include_pad=False)

    def pair(t):
        return torch.cat([F.max_pool2d(t, k, s, p), avg(t)], 1)

    return {"max": lambda t: F.max_pool2d(t, k, s, p), "avg": avg, "pair": pair}[kind]


@pytest.mark.parametrize("kind", ["max", "avg", "pair"])
@pytest.mark.parametrize("conf", POOL_CONFS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("channels", [1, 5, 19])
def test_pool_matches_torch_float64(kind, conf, layout, channels):
    k, s, p = conf
    x = _make((2, channels, 9, 7), torch.float64, layout).requires_grad_()
    out, ref = POOLS[kind](x, k, s, p, backend="cpu"), _torch_pool(kind, k, s, p)(x)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    if layout == "channels_last" and channels > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(ref)
    (a,), (b,) = _grads(out, (x,), g), _grads(ref, (x,), g)
    torch.testing.assert_close(a, b, **TOL[torch.float64])
    assert a.stride() == torch.empty(x.shape, memory_format=torch.channels_last if layout == "channels_last"
                                       else torch.contiguous_format).stride() or channels == 1


@pytest.mark.parametrize("kind", ["max", "avg", "pair"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pool_low_precision(kind, dtype):
    x64 = _make((2, 19, 8, 8), torch.float64, "channels_last")
    x = x64.to(dtype).requires_grad_()
    ref_fn = _torch_pool(kind, 3, 1, 1)
    out = POOLS[kind](x, 3, 1, 1, backend="cpu")
    # the reference on the same rounded values, in float64
    ref_x = x.detach().double().requires_grad_()
    ref = ref_fn(ref_x)
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    g = torch.randn_like(ref)
    torch.testing.assert_close(_grads(out, (x,), g.to(dtype))[0].double(), _grads(ref, (ref_x,), g.to(dtype).double())[0],
                               **TOL[dtype])


def test_max_pool_ties_and_nan_follow_torch():
    """Ties send the gradient to the first maximum, NaN propagates (to the last NaN of a window), as in ATen."""
    x = torch.randint(0, 3, (2, 9, 7, 6)).double().to(memory_format=torch.channels_last)
    x[0, 2, 3, 3] = float("nan")
    x[1, 4, 1, 1] = x[1, 4, 1, 2] = float("nan")
    x.requires_grad_()
    for s in (1, 2):
        out, ref = ops.max_pool2d(x, 3, s, 1, backend="cpu"), F.max_pool2d(x, 3, s, 1)
        torch.testing.assert_close(out, ref, equal_nan=True, rtol=0, atol=0)
        g = torch.randn_like(ref)
        torch.testing.assert_close(_grads(out, (x,), g)[0], _grads(ref, (x,), g)[0], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pool_gradcheck(kind):
    x = _make((2, 3, 5, 6), torch.float64, "channels_last").requires_grad_()
    fn = (lambda t: ops.max_pool2d(t, 3, 2, 1, backend="cpu")) if kind == "max" else \
        (lambda t: ops.avg_pool2d(t, 3, 1, 1, backend="cpu"))
    assert torch.autograd.gradcheck(fn, (x,))


@pytest.mark.parametrize("op", ["max_pool2d", "avg_pool2d"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_pool_opcheck(op, layout):
    x = _make((2, 5, 7, 6), torch.float32, layout).requires_grad_()
    torch.library.opcheck(getattr(torch.ops.fastnas, op).default, (x, [3, 3], [2, 2], [1, 1]))
    x = _make((3, 1, 4, 4), torch.float64, layout).requires_grad_()
    torch.library.opcheck(getattr(torch.ops.fastnas, op).default, (x, [2, 2], [1, 1], [0, 0]))


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pool_under_torch_compile(kind):
    x = _make((2, 5, 7, 6), torch.float32, "channels_last").requires_grad_()
    fn = (lambda t: ops.max_pool2d(t, 3, 1, 1, backend="cpu")) if kind == "max" else \
        (lambda t: ops.avg_pool2d(t, 3, 1, 1, backend="cpu"))
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, fn(x))
    g = torch.randn_like(out)
    torch.testing.assert_close(_grads(out, (x,), g)[0], _grads(fn(x), (x,), g)[0])


def test_pool_modules_equal_torch_modules_on_every_backend():
    x = _make((2, 4, 7, 7), torch.float32, "channels_last")
    for backend in ("reference", "cpu"):
        with ops.backend(backend):
            torch.testing.assert_close(MaxPool2d(3, 2, 1)(x), torch.nn.MaxPool2d(3, 2, 1)(x))
            torch.testing.assert_close(AvgPool2d(3, 1, 1, count_include_pad=False)(x),
                                       torch.nn.AvgPool2d(3, 1, 1, count_include_pad=False)(x))
    # what the kernels do not cover runs as the torch module does
    torch.testing.assert_close(MaxPool2d(3, 2, 1, ceil_mode=True)(x), torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True)(x))
    torch.testing.assert_close(AvgPool2d(3, 1, 1)(x), torch.nn.AvgPool2d(3, 1, 1)(x))


@pytest.mark.parametrize("bad,match", [
    (lambda: ops.max_pool2d(torch.randn(2, 4, 5, 5), 3, 1, 2, backend="cpu"), "padding"),
    (lambda: ops.avg_pool2d(torch.randn(2, 4, 1, 1), 5, 1, 1, backend="cpu"), "does not fit"),
    (lambda: ops.max_pool2d(torch.randn(4, 5, 5), 3, backend="cpu"), "x must be 4-D"),
    (lambda: ops.avg_pool2d(torch.ones(2, 4, 5, 5, dtype=torch.int64), 3, backend="cpu"), "dtype"),
    (lambda: ops.max_pool2d(torch.randn(2, 4, 5, 5), 0, backend="cpu"), "kernel_size"),
    (lambda: torch.ops.fastnas.max_pool2d_backward(torch.randn(2, 4, 3, 3), torch.zeros(2, 4, 3, 3, dtype=torch.int32),
                                                   5, 5, [3, 3], [2, 2], [1, 1], False), "uint8"),
    (lambda: torch.ops.fastnas.avg_pool2d_backward(torch.randn(2, 4, 4, 4), 5, 5, [3, 3], [2, 2], [1, 1], False),
     r"grad of shape \[2, 4, 3, 3\]"),
])
def test_pool_bad_inputs(bad, match):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        bad()


# ------------------------------------------------------------------------------------------------ batch norm

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (3, 19, 4, 5), (1, 40, 3, 1)])
def test_batch_norm_matches_torch(dtype, layout, shape):
    x = _make(shape, dtype, layout, scale=3.0, shift=1.0)
    rm, rv = torch.randn(shape[1], dtype=torch.float64), torch.rand(shape[1], dtype=torch.float64) + 0.5
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rm, rv = rm.to(acc), rv.to(acc)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    y, invstd = torch.ops.fastnas.batch_norm_train(x, rm, rv, 0.1, 1e-5)
    y_ref, _, invstd_ref = torch.ops.aten.native_batch_norm(x.to(acc), None, None, rm_ref, rv_ref, True, 0.1, 1e-5)
    tol = TOL[dtype]
    torch.testing.assert_close(y.to(acc), y_ref, **tol)
    torch.testing.assert_close(invstd, invstd_ref, **TOL[acc])
    torch.testing.assert_close(rm, rm_ref, **TOL[acc])
    torch.testing.assert_close(rv, rv_ref, **TOL[acc])
    assert y.stride() == torch.empty(shape, memory_format=torch.channels_last if layout == "channels_last"
                                     else torch.contiguous_format).stride() or 1 in shape[1:]
    g = _make(shape, dtype, layout, seed=5)
    gx = torch.ops.fastnas.batch_norm_backward(g, y, invstd)
    y_acc = y.to(acc)
    dims = (0, 2, 3)
    gx_ref = invstd.view(1, -1, 1, 1) * (g.to(acc) - g.to(acc).mean(dims, keepdim=True)
                                         - y_acc * (g.to(acc) * y_acc).mean(dims, keepdim=True))
    torch.testing.assert_close(gx.to(acc), gx_ref, **tol)


def test_batch_norm_opcheck():
    x = _make((2, 5, 4, 3), torch.float32, "channels_last")
    torch.library.opcheck(torch.ops.fastnas.batch_norm_train.default, (x, torch.zeros(5), torch.ones(5), 0.1, 1e-5))
    y, invstd = torch.ops.fastnas.batch_norm_train(x, torch.zeros(5), torch.ones(5), 0.1, 1e-5)
    torch.library.opcheck(torch.ops.fastnas.batch_norm_backward.default, (torch.randn_like(y), y, invstd))


def test_lean_batch_norm_gradcheck_on_the_cpu_kernels():
    from fastnas.nn.lean import LeanBatchNorm2d

    bn = LeanBatchNorm2d(3, affine=False).double()
    x = _make((2, 3, 4, 5), torch.float64, "channels_last").requires_grad_()
    with ops.backend("cpu"):
        assert torch.autograd.gradcheck(bn, (x,))
        assert torch.autograd.gradgradcheck(bn, (x,))


@pytest.mark.parametrize("bad,match", [
    (lambda: torch.ops.fastnas.batch_norm_train(torch.randn(1, 3, 1, 1), torch.zeros(3), torch.ones(3), 0.1, 1e-5),
     "more than one value per channel"),
    (lambda: torch.ops.fastnas.batch_norm_train(torch.randn(2, 3, 2, 2), torch.zeros(4), torch.ones(3), 0.1, 1e-5),
     r"running_mean must have shape \[3\]"),
    (lambda: torch.ops.fastnas.batch_norm_train(torch.ones(2, 3, 2, 2, dtype=torch.int32), torch.zeros(3),
                                                torch.ones(3), 0.1, 1e-5), "dtype"),
    (lambda: torch.ops.fastnas.batch_norm_backward(torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2),
                                                   torch.ones(3, dtype=torch.float64)), "invstd has dtype"),
    (lambda: torch.ops.fastnas.batch_norm_backward(torch.randn(2, 3, 2, 3), torch.randn(2, 3, 2, 2), torch.ones(3)),
     "grad has shape"),
])
def test_batch_norm_bad_inputs(bad, match):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        bad()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (3, 37, 4, 5), (4, 40, 3, 1)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_affine_batch_norm_module_matches_torch(dtype, shape, momentum):
    """LeanBatchNorm2d (affine, training, channels_last, cpu backend) runs the affine kernels and equals
    nn.BatchNorm2d: output, running statistics, input and parameter gradients; the inputs far from zero mean (the
    backward's sums are taken about the mean)."""
    from fastnas.nn.lean import LeanBatchNorm2d

    c = shape[1]
    ours, ref = LeanBatchNorm2d(c, momentum=momentum).to(dtype), torch.nn.BatchNorm2d(c, momentum=momentum)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-1, 1)
    ref = ref.double()
    ref.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in ours.state_dict().items()})
    for step in range(2):
        x = _make(shape, dtype, "channels_last", seed=step, scale=2.0, shift=50.0).requires_grad_()
        xr = x.detach().double().requires_grad_()
        with ops.backend("cpu"):
            y = ours(x)
        y_ref = ref(xr)
        assert "batch_norm_affine_train" in y.grad_fn.name()
        assert y.is_contiguous(memory_format=torch.channels_last)
        tol = TOL[dtype]
        torch.testing.assert_close(y.double(), y_ref, **tol)
        g = _make(shape, dtype, "channels_last", seed=7 + step)
        got = torch.autograd.grad(y, [x, ours.weight, ours.bias], g)
        want = torch.autograd.grad(y_ref, [xr, ref.weight, ref.bias], g.double())
        for a, b in zip(got, want):
            scale = max(1.0, float(b.abs().max()))  # parameter gradients sum over the batch
            torch.testing.assert_close(a.double() / scale, b / scale, **tol)
    torch.testing.assert_close(ours.running_mean.double(), ref.running_mean, **tol)
    torch.testing.assert_close(ours.running_var.double(), ref.running_var, **tol)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 2


def test_affine_batch_norm_falls_back_where_the_kernels_do_not_apply():
    from fastnas.nn.lean import LeanBatchNorm2d

    bn = LeanBatchNorm2d(4)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    with ops.backend("cpu"):
        assert "batch_norm_affine_train" not in bn(x).grad_fn.name()  # NCHW input: PyTorch's
        bn.eval()
        assert "batch_norm_affine_train" not in bn(x.to(memory_format=torch.channels_last)).grad_fn.name()
    bn.train()
    with ops.backend("reference"):
        assert "batch_norm_affine_train" not in bn(x.to(memory_format=torch.channels_last)).grad_fn.name()


def test_affine_batch_norm_gradcheck_and_opcheck():
    from fastnas.nn.lean import LeanBatchNorm2d

    bn = LeanBatchNorm2d(3).double()
    x = _make((2, 3, 4, 5), torch.float64, "channels_last").requires_grad_()
    with ops.backend("cpu"):
        assert torch.autograd.gradcheck(bn, (x,))
        assert torch.autograd.gradgradcheck(bn, (x,))
    x = _make((2, 5, 4, 3), torch.float32, "channels_last")
    w, b = torch.rand(5) + 0.5, torch.randn(5)
    torch.library.opcheck(torch.ops.fastnas.batch_norm_affine_train.default,
                          (x, w, b, torch.zeros(5), torch.ones(5), 0.1, 1e-5))
    y, mean, invstd = torch.ops.fastnas.batch_norm_affine_train(x, w, b, torch.zeros(5), torch.ones(5), 0.1, 1e-5)
    for need_x in (True, False):
        torch.library.opcheck(torch.ops.fastnas.batch_norm_affine_backward.default,
                              (torch.randn_like(y), x, w, mean, invstd, need_x))
    with pytest.raises(ValueError, match=r"batch_norm_affine_train: weight must have shape \[5\]"):
        torch.ops.fastnas.batch_norm_affine_train(x, w[:4], b, torch.zeros(5), torch.ones(5), 0.1, 1e-5)
    with pytest.raises(TypeError, match=r"batch_norm_affine_backward: invstd has dtype torch.float64"):
        torch.ops.fastnas.batch_norm_affine_backward(torch.randn_like(y), x, w, mean, invstd.double(), True)


# ------------------------------------------------------------------------------------------------ normalized sum

def _normalized_sum_reference(zs, weights, num_normalized, means, variances, momentum=0.1, eps=1e-5):
    outs = [F.batch_norm(z, m, v, None, None, True, momentum, eps) for z, m, v in
            zip(zs[:num_normalized], means, variances)] + list(zs[num_normalized:])
    return sum(w * o for w, o in zip(weights, outs))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("counts", [(3, 2), (1, 0), (4, 1), (0, 2)])
@pytest.mark.parametrize("need", ["both", "z", "w"])
def test_normalized_mixed_sum_matches_batch_norms_then_sum(dtype, layout, counts, need):
    n_norm, n_plain = counts
    shape = (3, 19, 5, 4)
    zs = [_make(shape, dtype, layout, seed=k, scale=2.0, shift=k - 1.0).requires_grad_(need != "w")
          for k in range(n_norm + n_plain)]
    w = torch.randn(n_norm + n_plain, dtype=dtype).requires_grad_(need != "z")
    stats = [(torch.randn(19, dtype=dtype), torch.rand(19, dtype=dtype) + 0.5) for _ in range(n_norm)]
    ref_stats = [(m.clone(), v.clone()) for m, v in stats]
    out = _fused_node(w, n_norm, [m for m, _ in stats], [v for _, v in stats], 0.1, 1e-5, *zs)
    ref = _normalized_sum_reference(zs, w, n_norm, [m for m, _ in ref_stats], [v for _, v in ref_stats])
    tol = TOL[dtype]
    torch.testing.assert_close(out, ref, **tol)
    for (m, v), (rm, rv) in zip(stats, ref_stats):
        torch.testing.assert_close(m, rm, **tol)
        torch.testing.assert_close(v, rv, **tol)
    wrt = [t for t in (*zs, w) if t.requires_grad]
    g = _make(shape, dtype, layout, seed=9)
    for a, b in zip(_grads(out, wrt, g), _grads(ref, wrt, g)):
        torch.testing.assert_close(a, b, **tol)


def test_normalized_mixed_sum_far_from_zero_mean_float32():
    """Inputs with |mean| / std = 250: the fused node sum works about each input's mean (forward sum, the backward's
    per-channel sums and input gradients), so float32 stays within its tolerance of the float64 result on the same
    (rounded) values."""
    shape = (4, 21, 5, 6)
    zs = [_make(shape, torch.float32, "channels_last", seed=k, scale=2.0, shift=500.0).requires_grad_() for k in range(4)]
    w = torch.softmax(torch.randn(4), 0).requires_grad_()
    z64 = [z.detach().double().requires_grad_() for z in zs]
    w64 = w.detach().double().requires_grad_()
    stats = [torch.zeros(21) for _ in range(6)]
    out = _fused_node(w, 3, stats[:3], stats[3:], 0.1, 1e-5, *zs)
    ref = _normalized_sum_reference(z64, w64, 3, [s.double() for s in stats[:3]], [s.double() for s in stats[3:]])
    torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])
    g = _make(shape, torch.float32, "channels_last", seed=9)
    for a, b in zip(_grads(out, [*zs, w], g), _grads(ref, [*z64, w64], g.double())):
        scale = max(1.0, float(b.abs().max()))  # the weights' gradients sum over the batch
        torch.testing.assert_close(a.double() / scale, b / scale, **TOL[torch.float32])


def test_normalized_mixed_sum_gradcheck_and_opcheck():
    zs = [_make((2, 3, 4, 3), torch.float64, "channels_last", seed=k).requires_grad_() for k in range(3)]
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def fn(w, *zs):
        stats = [torch.zeros(3, dtype=torch.float64) for _ in range(4)]
        return _fused_node(w, 2, stats[:2], stats[2:], 0.1, 1e-5, *zs)

    assert torch.autograd.gradcheck(fn, (w, *zs))
    z32 = [z.detach().float() for z in zs]
    torch.library.opcheck(torch.ops.fastnas.normalized_mixed_sum.default,
                          (z32, w.detach().float(), 2, [torch.zeros(3), torch.zeros(3)], [torch.ones(3), torch.ones(3)],
                           0.1, 1e-5))
    out, means, invstds = torch.ops.fastnas.normalized_mixed_sum(z32, w.detach().float(), 2, [torch.zeros(3)] * 2,
                                                                 [torch.ones(3)] * 2, 0.1, 1e-5)
    torch.library.opcheck(torch.ops.fastnas.normalized_mixed_sum_backward.default,
                          (torch.randn_like(out), z32, w.detach().float(), means, invstds, True, True))


def test_fused_node_sums_match_the_reference_supernet():
    """The cpu backend's node sums with the candidates' batch norms fused give the reference's loss, gradients and
    running statistics (channels_last, where the fusion applies)."""
    import fastnas

    def run(backend):
        torch.manual_seed(0)
        execution = fastnas.nn.plans.Execution(channels_last=True)
        net = fastnas.SuperNet(8, 3, 10, primitives="at-darts", in_channels=1, execution=execution).to(
            memory_format=torch.channels_last)
        x = torch.randn(4, 1, 8, 8).contiguous(memory_format=torch.channels_last)
        with ops.backend(backend):
            loss = F.cross_entropy(net(x), torch.arange(4))
        loss.backward()
        return loss, {n: p.grad for n, p in net.named_parameters() if p.grad is not None}, dict(net.named_buffers())

    ref = run("reference")
    got = run("cpu")
    assert _in_graph(got[0].grad_fn, "fastnas_normalized_mixed_sum"), "the fused node sum did not run"
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    for name in ref[1]:
        torch.testing.assert_close(got[1][name], ref[1][name], rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("autocast", [False, True])
def test_fused_norms_unsupported_says_where_the_kernels_run(backend, dtype, channels_last, autocast):
    """The build-time predicate agrees with the op: None exactly where normalized_mixed_sum runs the kernel."""
    from unittest import mock

    why = ops.fused_norms_unsupported("cpu", dtype, channels_last, autocast, backend)
    assert why is None or (isinstance(why, str) and "\n" not in why)
    kernels = ops.implementation("cpu", "cpu").kernels
    fused = mock.Mock(side_effect=kernels["normalized_mixed_sum"])
    z = [torch.randn(2, 3, 4, 4, dtype=dtype) for _ in range(2)]
    if channels_last:
        z = [t.contiguous(memory_format=torch.channels_last) for t in z]
    norms = [torch.nn.BatchNorm2d(3, affine=False, dtype=torch.float32 if dtype == torch.bfloat16 else dtype)
             for _ in z]
    with mock.patch.dict(kernels, {"normalized_mixed_sum": fused}), \
            torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        ops.normalized_mixed_sum(list(zip(z, norms)), [], torch.ones(2, dtype=dtype), backend=backend)
    assert fused.called == (why is None), why


@pytest.mark.parametrize("bad,match", [
    (lambda: torch.ops.fastnas.normalized_mixed_sum([torch.randn(2, 3, 2, 2)] * 2, torch.ones(2), 3, [], [], 0.1, 1e-5),
     "num_normalized"),
    (lambda: torch.ops.fastnas.normalized_mixed_sum([torch.randn(2, 3, 2, 2)] * 2, torch.ones(2), 1, [], [], 0.1, 1e-5),
     "running_means"),
    (lambda: torch.ops.fastnas.normalized_mixed_sum([torch.randn(2, 3, 2, 2)] * 2, torch.ones(3), 0, [], [], 0.1, 1e-5),
     "weights"),
    (lambda: torch.ops.fastnas.normalized_mixed_sum([torch.randn(2, 3, 2, 2)] * 2, torch.ones(2), 1, [torch.zeros(4)],
                                                    [torch.ones(3)], 0.1, 1e-5), r"running_means\[0\] must have shape"),
])
def test_normalized_mixed_sum_bad_inputs(bad, match):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        bad()


# ------------------------------------------------------------------------------------------------ single-channel conv

SINGLE_CONFS = [(2, 7, 3), (3, 3, 1), (1, 3, 0), (4, 5, 4), (2, 1, 0)]  # channels, kernel, padding


@pytest.mark.parametrize("conf", SINGLE_CONFS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("size", [(9, 7), (4, 4), (1, 11)])
def test_single_channel_conv_matches_torch_float64(conf, layout, size):
    c, k, p = conf
    if size[0] + 2 * p < k or size[1] + 2 * p < k:
        pytest.skip("the filter does not fit")
    x = _make((2, c, *size), torch.float64, layout).requires_grad_()
    w = _make((1, c, k, k), torch.float64, "nchw", seed=1).requires_grad_()
    _assert_close_with_grads(torch.ops.fastnas.single_channel_conv2d(x, w, [p, p]), F.conv2d(x, w, None, 1, p), (x, w),
                             TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_single_channel_conv_low_precision(dtype):
    x64 = _make((3, 2, 8, 8), torch.float64, "channels_last")
    w64 = _make((1, 2, 7, 7), torch.float64, "nchw", seed=1) * 0.2
    x, w = x64.to(dtype).requires_grad_(), w64.to(dtype).requires_grad_()
    rx, rw = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    out, ref = torch.ops.fastnas.single_channel_conv2d(x, w, [3, 3]), F.conv2d(rx, rw, None, 1, 3)
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    g = torch.randn_like(ref).to(dtype)
    got, expected = _grads(out, (x, w), g), _grads(ref, (rx, rw), g.double())
    for a, b, scale in zip(got, expected, (1, 8)):  # the weight gradient sums 3*8*8 products per tap
        torch.testing.assert_close(a.double(), b, **{key: v * scale for key, v in TOL[dtype].items()})


def test_single_channel_conv_gradcheck_opcheck_and_compile():
    x = _make((2, 2, 5, 6), torch.float64, "channels_last").requires_grad_()
    w = _make((1, 2, 3, 3), torch.float64, "nchw", seed=1).requires_grad_()
    fn = lambda a, b: torch.ops.fastnas.single_channel_conv2d(a, b, [1, 1])  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w))
    assert torch.autograd.gradgradcheck(fn, (x, w))
    for layout in LAYOUTS:
        xf = _make((2, 2, 7, 6), torch.float32, layout)
        wf = _make((1, 2, 7, 7), torch.float32, "nchw", seed=1)
        torch.library.opcheck(torch.ops.fastnas.single_channel_conv2d.default, (xf, wf, [3, 3]))
        g = torch.randn(2, 1, 7, 6)
        torch.library.opcheck(torch.ops.fastnas.single_channel_conv2d_backward.default,
                              (g, xf, wf, [3, 3], True, True))
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(x, w)
    torch.testing.assert_close(out, fn(x, w))


def test_spatial_gate_uses_the_kernel_on_the_cpu_backend():
    from fastnas.nn import SpatialAttention

    gate = SpatialAttention(7, affine=False).double()
    x = _make((2, 6, 9, 9), torch.float64, "channels_last").requires_grad_()
    with ops.backend("reference"):
        ref = gate(x)
    with ops.backend("cpu"):
        out = gate(x)
    torch.testing.assert_close(out, ref)
    assert _in_graph(out.grad_fn, "fastnas_single_channel_conv2d")


def _in_graph(fn, name: str) -> bool:
    """Whether the autograd graph from ``fn`` has a node whose name holds ``name`` (an operator's node is named
    after it)."""
    todo, seen = [fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if name in node.name():
            return True
        todo.extend(f for f, _ in node.next_functions)
    return False


def _fused_node(w, num_normalized, running_means, running_vars, momentum, eps, *zs):
    """The cpu backend's fused node sum (its kernel, with the autograd the op registers on it)."""
    return torch.ops.fastnas.normalized_mixed_sum(list(zs), w, num_normalized, running_means, running_vars, momentum,
                                                  eps)[0]


@pytest.mark.parametrize("bad,match", [
    (lambda: torch.ops.fastnas.single_channel_conv2d(torch.randn(2, 2, 5, 5), torch.randn(2, 2, 3, 3), [1, 1]),
     r"weight must have shape \[1, 2"),
    (lambda: torch.ops.fastnas.single_channel_conv2d(torch.randn(2, 2, 5, 5), torch.randn(1, 2, 3, 3), [3, 1]),
     "padding"),
    (lambda: torch.ops.fastnas.single_channel_conv2d(torch.randn(2, 2, 2, 2), torch.randn(1, 2, 7, 7), [1, 1]),
     "does not fit"),
    (lambda: torch.ops.fastnas.single_channel_conv2d(torch.randn(2, 2, 5, 5), torch.randn(1, 2, 3, 3).double(),
                                                     [1, 1]), "dtype"),
    (lambda: torch.ops.fastnas.single_channel_conv2d_backward(torch.randn(2, 1, 4, 4), torch.randn(2, 2, 5, 5),
                                                              torch.randn(1, 2, 3, 3), [1, 1], True, True),
     r"grad must have shape \[2, 1, 5, 5\]"),
])
def test_single_channel_conv_bad_inputs(bad, match):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        bad()


@pytest.mark.parametrize("used", ["avg", "max"])
def test_channel_pool_with_one_output_used(used):
    """No gradient is materialised for an unused output (nor for the positions): the other one's is right alone."""
    x = _make((2, 5, 4, 3), torch.float64, "channels_last").requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    pick = 0 if used == "avg" else 1
    (grad,) = torch.autograd.grad(ops.channel_pool(x, backend="cpu")[pick].sum(), x)
    (want,) = torch.autograd.grad(ops.reference.channel_pool(ref_x)[pick].sum(), ref_x)
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-12)
