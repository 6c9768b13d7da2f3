"""The shared op suite: every public op on every backend available here, and on a toy backend built from the
reference kernels through the declared interface. Forward and backward against the float64 reference (float64 and
the AMP dtypes, odd sizes), opcheck of the operators each op calls, gradcheck and gradgradcheck.

The ops, their cases and their inputs come from the registry (each def module's ``sample_inputs``): a new op runs
here without an edit to this file."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastnas.ops as ops
from fastnas.nn import CBAM, ChannelAttention, SpatialAttention
from fastnas.ops import defs, reference
from fastnas.ops.backend import define_kernels, kernel_specs, register_backend, required_kernels
from fastnas.ops.opdef import tensor as _t
from helpers import BACKENDS, backend_targets

TOY_KERNELS = sorted(required_kernels() | {"max_pool2d", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward"})
register_backend("toy", define_kernels("fastnas_toy", {name: reference.KERNELS[name] for name in TOY_KERNELS}),
                 ("cpu",))


TARGETS = backend_targets(BACKENDS + ("toy",))
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
       torch.float16: dict(rtol=3e-3, atol=3e-3)}


def samples(module, device: str, dtype: torch.dtype, shape=(2, 3, 5, 3)) -> dict:
    """The sample cases of one def module by name."""
    return {s.name: s for s in module.sample_inputs(device, dtype, shape)}


def cases(modules) -> tuple[list, list]:
    """(every case, the cases also run in the AMP dtypes) of ``modules``, as (module, case name) pytest params."""
    every, amp = [], []
    for module in modules:
        for name, sample in samples(module, "cpu", torch.float64).items():
            param = pytest.param(module, name, id=name)
            every.append(param)
            if sample.amp:
                amp.append(param)
    return every, amp


OPS, AMP_OPS = cases(m for m in defs.modules() if hasattr(m, "sample_inputs"))


def _case(module, case: str, device: str, dtype: torch.dtype, shape=(2, 3, 5, 3)):
    """(inputs, a function of a backend name and the inputs) of one case."""
    sample = samples(module, device, dtype, shape)[case]
    return list(sample.inputs), sample.call


def _leaves(args):
    return [a.detach().clone().requires_grad_() for a in args]


def _outs(y):
    return list(y) if isinstance(y, tuple) else [y]


def _check_against_reference(name, device, module, op, dtype):
    args, fn = _case(module, op, device, dtype)
    got_in = _leaves(args)
    outs = _outs(fn(name, *got_in))
    ref_in = [a.detach().double().requires_grad_() for a in args]
    refs = _outs(fn("reference", *ref_in))
    grads = [torch.randn(o.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64) for o in outs]
    for o, r in zip(outs, refs):
        assert o.dtype == dtype and o.shape == r.shape
        torch.testing.assert_close(o.double(), r, **TOL[dtype])
    got = torch.autograd.grad(outs, got_in, [g.to(device, o.dtype) for g, o in zip(grads, outs)])
    want = torch.autograd.grad(refs, ref_in, [g.to(device) for g in grads])
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == got_in[i].dtype
        scale = max(1.0, float(b.abs().max()))  # parameter gradients sum over the batch
        torch.testing.assert_close(a.double() / scale, b / scale, **TOL[dtype], msg=lambda m: f"grad {i}: {m}")


def check_case(name, device, module, op):
    """The whole suite on one case: float64 and AMP values and gradients against the reference, gradcheck,
    gradgradcheck and opcheck of the operators it calls."""
    _check_against_reference(name, device, module, op, torch.float64)
    if samples(module, "cpu", torch.float64)[op].amp:
        for dtype in (torch.bfloat16, torch.float16):
            _check_against_reference(name, device, module, op, dtype)
    args, fn = _small(module, op, device)
    assert torch.autograd.gradcheck(lambda *a: fn(name, *a), args)
    assert torch.autograd.gradgradcheck(lambda *a: fn(name, *a), _small(module, op, device)[0], fast_mode=True)
    for call, call_args in _operator_calls(name, device, module, op):
        torch.library.opcheck(call, call_args)


@pytest.mark.parametrize("name,device", TARGETS)
@pytest.mark.parametrize("module,op", OPS)
def test_float64_matches_reference(name, device, module, op):
    _check_against_reference(name, device, module, op, torch.float64)


@pytest.mark.parametrize("name,device", TARGETS)
@pytest.mark.parametrize("module,op", AMP_OPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_amp_dtypes_match_reference(name, device, module, op, dtype):
    _check_against_reference(name, device, module, op, dtype)


def _small(module, op, device):
    args, fn = _case(module, op, device, torch.float64, shape=(2, 2, 3, 2))
    return _leaves(args), fn


@pytest.mark.parametrize("name,device", TARGETS)
@pytest.mark.parametrize("module,op", OPS)
def test_gradcheck(name, device, module, op):
    args, fn = _small(module, op, device)
    assert torch.autograd.gradcheck(lambda *a: fn(name, *a), args)


@pytest.mark.parametrize("name,device", TARGETS)
@pytest.mark.parametrize("module,op", OPS)
def test_gradgradcheck(name, device, module, op):
    args, fn = _small(module, op, device)
    assert torch.autograd.gradgradcheck(lambda *a: fn(name, *a), args, fast_mode=True)


class _Calls(TorchDispatchMode):
    """Records the fastnas operators an op calls (the outermost ones: a kernel an operator calls is not seen)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace.startswith("fastnas"):
            copy = lambda a: a.detach().clone().requires_grad_(a.requires_grad) \
                if isinstance(a, torch.Tensor) else [copy(t) for t in a] if isinstance(a, list) else a  # noqa: E731
            self.calls.append((func, tuple(copy(a) for a in args)))
        return func(*args, **(kwargs or {}))


def _operator_calls(name, device, module, op) -> list:
    """(operator, arguments) of each fastnas operator that ``op`` calls on backend ``name`` (float32 inputs)."""
    args, fn = _case(module, op, device, torch.float32, shape=(2, 3, 4, 5))
    with _Calls() as mode:
        fn(name, *_leaves(args))
    return mode.calls


@pytest.mark.parametrize("name,device", TARGETS)
@pytest.mark.parametrize("module,op", OPS)
def test_opcheck(name, device, module, op):
    calls = _operator_calls(name, device, module, op)
    if not calls:
        pytest.skip(f"{op} calls no operator of its own on {name} (plain PyTorch)")
    for call, args in calls:
        torch.library.opcheck(call, args)


@pytest.mark.parametrize("name,device", [t for t in TARGETS if t.values[0] != "reference"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_one_layout_rule(name, device, channels_last):
    """spatial_pool's result is channels_last on every backend with kernels; gradients keep the input's layout."""
    x = _t((2, 3, 4, 5), device, torch.float32, channels_last).requires_grad_()
    y = ops.spatial_pool(x, backend=name)
    assert y.is_contiguous(memory_format=torch.channels_last)
    (gx,) = torch.autograd.grad(y, x, torch.randn_like(y))
    assert gx.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


# ------------------------------------------------------------------------------------------------ higher derivatives

@pytest.mark.parametrize("name,device", TARGETS)
def test_mixed_sum_second_derivative_through_the_weight_gradient(name, device):
    """g = ∂(Σ y²)/∂w with a graph, then ∂(Σ g)/∂a: the backward's own derivative, against the reference."""
    def run(backend):
        a, b = _t((2, 3, 4, 5), device, seed=1).requires_grad_(), _t((2, 3, 4, 5), device, seed=2).requires_grad_()
        w = torch.tensor([0.3, -1.2], device=device, dtype=torch.float64, requires_grad=True)
        y = ops.mixed_sum([a, b], w, backend=backend)
        (g,) = torch.autograd.grad(y.square().sum(), w, create_graph=True)
        return torch.autograd.grad(g.sum(), a)[0]

    torch.testing.assert_close(run(name), run("reference"))


@pytest.mark.parametrize("name,device", TARGETS)
def test_gradient_penalty_through_channel_attention(name, device):
    """Σ (∂(Σ gate(x)²)/∂x)² differentiated to the gate's parameters, against the reference."""
    def run(backend):
        torch.manual_seed(0)
        gate = ChannelAttention(8, reduction=4).to(device, torch.float64)
        x = _t((2, 8, 3, 4), device, channels_last=True).requires_grad_()
        with ops.backend(backend):
            (gx,) = torch.autograd.grad(gate(x).square().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), list(gate.parameters()))

    for a, b in zip(run(name), run("reference")):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------ the interface

def test_the_compiled_library_implements_every_declared_kernel():
    """The schemas are the def modules' (the library registers implementations only, checked against them)."""
    if ops.available_backends()["cpu"] != "available":
        pytest.skip("the compiled library is not built")
    for name, spec in kernel_specs().items():
        declared = torch._C.parse_schema(f"fastnas::{name}{spec.schema}")
        assert str(getattr(torch.ops.fastnas, name).default._schema) == str(declared), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastnas::{name}", "CPU"), name


def test_register_backend_names_missing_and_unknown_kernels():
    with pytest.raises(ValueError, match=r"missing required kernels \[.*'channel_pool'"):
        register_backend("partial", {"mixed_sum": reference.KERNELS["mixed_sum"]}, ("cpu",))
    with pytest.raises(ValueError, match=r"unknown kernels \['fast_everything'\]"):
        register_backend("odd", {"fast_everything": reference.KERNELS["mixed_sum"]}, ("cpu",))


def test_toy_backend_lacks_optional_kernels_and_falls_back():
    assert "channel_gate" not in ops.implementation("cpu", "toy").kernels
    x = _t((2, 4, 3, 3), "cpu", channels_last=True).requires_grad_()
    w1, w2 = _t((2, 4), "cpu", seed=1), _t((4, 2), "cpu", seed=2)
    with _Calls() as mode:
        y = ops.channel_attention(x, w1, None, w2, backend="toy")
    # one node, composed of the toy's pool and scale kernels
    assert [str(call) for call, _ in mode.calls] == ["fastnas_ops.channel_attention.default"]
    torch.testing.assert_close(y, reference.channel_attention(x, w1, None, w2))


def test_auto_prefers_triton_on_a_gpu():
    if ops.available_backends()["triton"] != "available":
        pytest.skip("triton is not installed")
    assert ops.resolve_backend("cuda") == "triton"


# ------------------------------------------------------------------------------------------------ clear errors

@pytest.mark.parametrize("name,device", TARGETS)
def test_non_tensor_list_element_is_named(name, device):
    x = torch.randn(2, 3, device=device)
    with pytest.raises(TypeError, match=r"fastnas.mixed_sum: xs\[1\] must be a Tensor, got NoneType"):
        ops.mixed_sum([x, None], torch.ones(2, device=device), backend=name)


BAD_ARGS = [
    (lambda x: ops.mixed_sum(x, torch.ones(1)), TypeError, "mixed_sum: xs must be a list"),
    (lambda x: ops.channel_pool("x"), TypeError, "channel_pool: x must be a Tensor"),
    (lambda x: ops.spatial_pool(None), TypeError, "spatial_pool: x must be a Tensor"),
    (lambda x: ops.channel_scale(x, 3), TypeError, "channel_scale: logits must be a Tensor"),
    (lambda x: ops.spatial_scale([x], x), TypeError, "spatial_scale: x must be a Tensor"),
    (lambda x: ops.channel_attention(x, "w1", None, torch.ones(3, 1)), TypeError, "channel_attention: w1"),
    (lambda x: ops.max_pool2d(x, "3"), ValueError, "max_pool2d: kernel_size"),
    (lambda x: ops.avg_pool2d(x, 3, stride=1.5), ValueError, "avg_pool2d: stride"),
    (lambda x: ops.depthwise_conv2d(x, None), TypeError, "depthwise_conv2d: weight must be a Tensor"),
    (lambda x: ops.single_channel_conv2d(x, torch.ones(1, 3, 3, 3), padding=-1), ValueError,
     "single_channel_conv2d: padding"),
    (lambda x: ops.batch_norm(x, None, torch.ones(3)), TypeError, "batch_norm: running_mean must be a Tensor"),
    (lambda x: ops.batch_norm(x, torch.zeros(3), torch.ones(3), momentum="fast"), ValueError, "batch_norm: momentum"),
    (lambda x: ops.batch_norm(x, torch.zeros(3), torch.ones(3), "w", "b"), TypeError, "batch_norm: weight"),
    (lambda x: ops.normalized_mixed_sum([], [x], torch.ones(1)), ValueError, "normalized_mixed_sum: normalized"),
    (lambda x: ops.normalized_mixed_sum([(x, None)], [], torch.ones(1)), TypeError,
     r"normalized_mixed_sum: normalized\[0\] must be a \(tensor, nn.BatchNorm2d\) pair"),
]


@pytest.mark.parametrize("call,exc,pattern", BAD_ARGS)
def test_bad_arguments_name_the_op_and_argument(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(torch.randn(2, 3, 5, 5))


def test_large_max_pool_window_runs_on_every_backend():
    """Window positions are stored in a byte: a 17×17 window (289 positions) runs the reference inside the op."""
    x = torch.randn(1, 2, 20, 20, requires_grad=True)
    y = ops.max_pool2d(x, 17, 1, 0, backend="cpu")
    torch.testing.assert_close(y, reference.max_pool2d(x, (17, 17), (1, 1), (0, 0)))


@pytest.mark.parametrize("build", [lambda: CBAM(16, kernel_size=-1), lambda: SpatialAttention(kernel_size=-1),
                                   lambda: SpatialAttention(kernel_size=2.5)])
def test_bad_gate_kernel_size_is_a_clear_error(build):
    with pytest.raises(ValueError, match="kernel_size"):
        build()
