"""Every backend of every fused op against the reference: values, gradients, layouts, dtypes, bad input.

The same tests run for each backend that is available here (``reference`` always; ``cpu`` when ``fastnas._C`` is
built; ``triton`` under ``TRITON_INTERPRET=1`` on the CPU) and, on a GPU machine, for ``cuda`` and ``triton`` on
CUDA tensors.
"""
from __future__ import annotations

import pytest
import torch

import fastnas.ops as ops
from fastnas.ops import reference
from helpers import backend_targets

OPS = ("mixed_sum", "channel_pool", "channel_scale", "spatial_pool", "spatial_scale")
SHAPES = [(2, 3, 5, 7), (1, 1, 1, 1), (3, 17, 4, 3)]
TOL = {  # (rtol, atol) of a result against the float64 reference on the same (rounded) inputs
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}


TARGETS = backend_targets()


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # a non-contiguous view: every other column of a wider tensor
        wide = torch.empty(*t.shape[:3], t.shape[3] * 2, dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


def make_inputs(op: str, shape, dtype, device, layout="contiguous", k=5, param_dtype=None):
    """Random inputs of ``op`` (activations in ``dtype``, weights/logits in ``param_dtype``)."""
    param_dtype = param_dtype or dtype
    x = lambda: _layout(torch.randn(shape, device=device).to(dtype), layout)  # noqa: E731
    n, c, h, w = shape
    if op == "mixed_sum":
        return [x() for _ in range(k)], torch.randn(k, device=device).to(param_dtype)
    if op == "channel_scale":
        return x(), torch.randn(n, c, device=device).to(param_dtype)
    if op == "spatial_scale":
        return x(), torch.randn(n, 1, h, w, device=device).to(param_dtype)
    return (x(),)


def _leaves(args, requires_grad=True):
    """Detached copies of the tensor arguments that require grad (lists kept as lists)."""
    def one(a):
        if isinstance(a, list):
            return [one(t) for t in a]
        return a.detach().clone().requires_grad_(requires_grad)
    return tuple(one(a) for a in args)


def _flat(args):
    out = []
    for a in args:
        out.extend(a if isinstance(a, list) else [a])
    return out


def _outputs(res):
    return list(res) if isinstance(res, tuple) else [res]


def _as64(args):
    return tuple([t.detach().double() for t in a] if isinstance(a, list) else a.detach().double() for a in args)


def run_and_grad(fn, args, grads_out=None):
    """Forward, then backward with random upstream gradients; returns (outputs, upstream, input grads)."""
    args = _leaves(args)
    outs = _outputs(fn(*args))
    if grads_out is None:
        grads_out = [torch.randn_like(o, dtype=torch.float64).to(o.dtype) for o in outs]
    torch.autograd.backward(outs, grads_out)
    return outs, grads_out, [a.grad for a in _flat(args)]


def assert_close(actual, expected, dtype, what):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def check_against_reference(name, op, args, act_dtype):
    fn = lambda *a: getattr(ops, op)(*a, backend=name)  # noqa: E731
    outs, g, grads = run_and_grad(fn, args)
    ref_outs, _, ref_grads = run_and_grad(getattr(reference, op), _as64(args), [t.double() for t in g])
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        assert o.dtype == act_dtype, f"{op} output {i} dtype {o.dtype}, expected {act_dtype}"
        assert o.shape == r.shape
        assert_close(o, r, act_dtype, f"{op} output {i}")
    for i, (gr, r) in enumerate(zip(grads, ref_grads)):
        src = _flat(args)[i]
        assert gr.dtype == src.dtype, f"{op} grad {i} dtype {gr.dtype}, expected {src.dtype}"
        assert_close(gr, r, act_dtype if src.dtype != torch.float32 or act_dtype == torch.float32 else act_dtype,
                     f"{op} grad of input {i}")


@pytest.mark.parametrize("name,device", TARGETS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_matches_reference_fp32(name, device, op, shape, layout):
    args = make_inputs(op, shape, torch.float32, device, layout)
    check_against_reference(name, op, args, torch.float32)


@pytest.mark.parametrize("name,device", TARGETS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_matches_reference_dtypes(name, device, op, dtype, layout):
    args = make_inputs(op, (2, 5, 3, 7), dtype, device, layout)
    check_against_reference(name, op, args, dtype)


@pytest.mark.parametrize("name,device", TARGETS)
@pytest.mark.parametrize("op", ["mixed_sum", "channel_scale", "spatial_scale"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_amp_half_activations_fp32_params(name, device, op, dtype):
    """Under AMP the activations are half while softmax weights / logits stay fp32."""
    args = make_inputs(op, (2, 6, 5, 3), dtype, device, "channels_last", param_dtype=torch.float32)
    check_against_reference(name, op, args, dtype)


@pytest.mark.parametrize("name,device", TARGETS)
@pytest.mark.parametrize("op", OPS)
def test_gradcheck_fp64(name, device, op):
    args = _leaves(make_inputs(op, (2, 3, 3, 2), torch.float64, device, k=3))
    fn = lambda *a: getattr(ops, op)(*a, backend=name)  # noqa: E731
    if op == "mixed_sum":
        xs, w = args
        assert torch.autograd.gradcheck(lambda w, *xs: fn(list(xs), w), (w, *xs))
    else:
        assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("name,device", TARGETS)
@pytest.mark.parametrize("op", OPS)
def test_empty_batch(name, device, op):
    args = make_inputs(op, (0, 3, 4, 5), torch.float32, device)
    outs, _, grads = run_and_grad(lambda *a: getattr(ops, op)(*a, backend=name), args)
    ref = _outputs(getattr(reference, op)(*args))
    assert [o.shape for o in outs] == [r.shape for r in ref]
    assert all(g is None or g.shape == a.shape for g, a in zip(grads, _flat(args)))


@pytest.mark.parametrize("name,device", TARGETS)
def test_max_gradient_goes_to_first_maximum(name, device):
    x = torch.ones(2, 3, 4, 5, device=device, requires_grad=True)
    _, mx = ops.channel_pool(x, backend=name)
    mx.sum().backward()
    expected = torch.zeros_like(x)
    expected[:, :, 0, 0] = 1
    assert torch.equal(x.grad, expected)
    x.grad = None
    ops.spatial_pool(x, backend=name)[:, 0].sum().backward()
    expected = torch.zeros_like(x)
    expected[:, 0] = 1
    assert torch.equal(x.grad, expected)


@pytest.mark.parametrize("name,device", TARGETS)
def test_nan_propagates(name, device):
    x = torch.randn(1, 2, 3, 3, device=device)
    x[0, 1, 1, 2] = float("nan")
    avg, mx = ops.channel_pool(x, backend=name)
    assert torch.isnan(avg[0, 1]) and torch.isnan(mx[0, 1]) and not torch.isnan(mx[0, 0])
    sp = ops.spatial_pool(x, backend=name)
    assert torch.isnan(sp[0, :, 1, 2]).all() and not torch.isnan(sp[0, :, 0, 0]).any()
    y = ops.mixed_sum([x, torch.zeros_like(x)], torch.tensor([1.0, 2.0], device=device), backend=name)
    assert torch.isnan(y[0, 1, 1, 2]) and torch.isnan(y).sum() == 1


@pytest.mark.parametrize("name,device", TARGETS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_spatial_pool_nan_and_ties_on_every_path(name, device, layout):
    """42 positions of 19 channels reach every path of the CPU kernels (NCHW: blocks of four vectors and of one, single
    positions; channels_last: transposed blocks of rows, the channels after the last full block, single rows), with
    ties (small integers) and NaNs, against the reference's values and gradient routing."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(-2, 3, (3, 19, 6, 7), generator=gen).float()
    for n, c, h, w in ((0, 5, 0, 1), (1, 18, 5, 6), (2, 0, 3, 3), (2, 7, 4, 0), (2, 9, 4, 0)):
        x[n, c, h, w] = float("nan")
    x = _layout(x.to(device), layout).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    out, ref = ops.spatial_pool(x, backend=name), ops.spatial_pool(xr, backend="reference")
    torch.testing.assert_close(out, ref, equal_nan=True)
    g = torch.randn(out.shape, generator=gen).to(device)
    (gx,), (gr,) = torch.autograd.grad(out, x, g), torch.autograd.grad(ref, xr, g)
    torch.testing.assert_close(gx, gr)


BAD_INPUTS = [
    ("mixed_sum", lambda d: ([], torch.ones(0, device=d)), ValueError, "at least one"),
    ("mixed_sum", lambda d: ([torch.ones(2, 3, device=d), torch.ones(2, 4, device=d)], torch.ones(2, device=d)),
     ValueError, r"xs\[1\].*shape"),
    ("mixed_sum", lambda d: ([torch.ones(2, 3, device=d), torch.ones(2, 3, device=d, dtype=torch.float64)],
                             torch.ones(2, device=d)), TypeError, r"xs\[1\].*dtype"),
    ("mixed_sum", lambda d: ([torch.ones(2, 3, device=d)] * 2, torch.ones(3, device=d)), ValueError, "weights"),
    ("mixed_sum", lambda d: ([torch.ones(2, 3, device=d, dtype=torch.long)] * 2, torch.ones(2, device=d)),
     TypeError, "dtype"),
    ("channel_pool", lambda d: (torch.ones(2, 3, 4, device=d),), ValueError, "4-D"),
    ("channel_pool", lambda d: (torch.ones(2, 3, 4, 4, device=d, dtype=torch.int32),), TypeError, "dtype"),
    ("spatial_pool", lambda d: (torch.ones(3, 4, device=d),), ValueError, "4-D"),
    ("channel_scale", lambda d: (torch.ones(2, 3, 4, 4, device=d), torch.ones(2, 4, device=d)), ValueError, "logits"),
    ("spatial_scale", lambda d: (torch.ones(2, 3, 4, 4, device=d), torch.ones(2, 3, 4, 4, device=d)),
     ValueError, "logits"),
    ("spatial_scale", lambda d: (torch.ones(2, 3, 4, 4, device=d), torch.ones(2, 1, 4, 4, device=d, dtype=torch.long)),
     TypeError, "logits"),
]


@pytest.mark.parametrize("name,device", TARGETS)
@pytest.mark.parametrize("op,make,exc,pattern", BAD_INPUTS, ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_names_the_problem(name, device, op, make, exc, pattern):
    with pytest.raises(exc, match=pattern) as info:
        getattr(ops, op)(*make(device), backend=name)
    assert op in str(info.value)


@pytest.mark.parametrize("name,device", [t for t in TARGETS if t.values[0] != "reference"])
@pytest.mark.parametrize("op", OPS)
def test_opcheck(name, device, op):
    custom = ops.implementation(torch.device(device), name).kernels[op]
    args = make_inputs(op, (2, 3, 4, 5), torch.float32, device, k=3)
    torch.library.opcheck(custom, _leaves(args))


@pytest.mark.parametrize("name,device", TARGETS)
@pytest.mark.parametrize("op", OPS)
def test_torch_compile_fullgraph(name, device, op):
    torch._dynamo.reset()
    fn = torch.compile(lambda *a: getattr(ops, op)(*a, backend=name), fullgraph=True)
    args = make_inputs(op, (2, 3, 4, 5), torch.float32, device, k=3)
    outs, g, grads = run_and_grad(fn, args)
    ref_outs, _, ref_grads = run_and_grad(getattr(reference, op), args, g)
    for o, r in zip(outs, ref_outs):
        torch.testing.assert_close(o, r)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_backend_selection_is_scoped_and_observable():
    assert ops.get_backend() == "auto"
    with ops.backend("reference"):
        assert ops.get_backend() == "reference"
        assert ops.resolve_backend("cpu") == "reference"
    assert ops.get_backend() == "auto"
    scoped = ops.backend("reference")  # selects nothing until entered
    assert ops.get_backend() == "auto"
    with scoped:
        assert ops.get_backend() == "reference"
        with ops.backend("auto"):
            assert ops.get_backend() == "auto"
        assert ops.get_backend() == "reference"
    assert ops.get_backend() == "auto"
    ops.set_backend("reference")
    assert ops.get_backend() == "reference"
    with pytest.raises(ValueError, match="unknown fastnas backend"):
        ops.backend("fastest")
    with pytest.raises(ValueError, match="unknown fastnas backend"):
        ops.set_backend("fastest")
    avail = ops.available_backends()
    assert avail["reference"] == "available" and {"reference", "cpu", "cuda", "triton"} <= set(avail)


def test_backend_for_wrong_device_is_refused():
    with pytest.raises(ops.BackendUnavailable, match="cuda"):
        ops.resolve_backend("cpu", "cuda")


def test_backend_as_decorator_selects_only_while_running():
    @ops.backend("reference")
    def inside():
        return ops.get_backend()

    assert ops.get_backend() == "auto"
    assert inside() == "reference"
    assert ops.get_backend() == "auto"
