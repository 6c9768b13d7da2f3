"""fastnas.ops.channel_attention (the whole CBAM channel gate) on every backend against plain PyTorch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastnas.ops as ops
from fastnas.nn import ChannelAttention

from test_ops import TARGETS, TOL, _layout


def plain_gate(x, w1, b1, w2, b2):
    """CBAM's channel gate written directly in PyTorch, in float64."""
    x, w1, w2 = x.double(), w1.double(), w2.double()
    b1 = None if b1 is None else b1.double()
    b2 = None if b2 is None else b2.double()

    def mlp(p):
        return F.linear(torch.relu(F.linear(p, w1, b1)), w2, b2)

    return x * torch.sigmoid(mlp(x.mean((2, 3))) + mlp(x.amax((2, 3))))[:, :, None, None]


def make(shape, hidden, dtype, device, layout="contiguous", bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = _layout(torch.randn(*shape, generator=gen).to(device, dtype), layout)
    params = [torch.randn(hidden, c, generator=gen), torch.randn(hidden, generator=gen) if bias else None,
              torch.randn(c, hidden, generator=gen), torch.randn(c, generator=gen) if bias else None]
    return [x.requires_grad_()] + [None if p is None else p.to(device, dtype).requires_grad_() for p in params]


def check(name, args, dtype, grad_seed=1):
    y = ops.channel_attention(*args, backend=name)
    assert y.shape == args[0].shape and y.dtype == dtype
    leaves = [a for a in args if a is not None]
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed)).to(y.device, dtype)
    grads = torch.autograd.grad(y, leaves, g)
    as64 = [None if a is None else a.detach().double().requires_grad_() for a in args]
    expected = plain_gate(*as64)
    exp_grads = torch.autograd.grad(expected, [a for a in as64 if a is not None], g.double())
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y.double(), expected, rtol=rtol, atol=atol)
    for i, (a, b) in enumerate(zip(grads, exp_grads)):
        scale = max(1.0, float(b.abs().max()))  # parameter gradients sum over the batch: compare relative to size
        torch.testing.assert_close(a.double() / scale, b / scale, rtol=rtol, atol=atol, msg=lambda m: f"grad {i}: {m}")
    return y


@pytest.mark.parametrize("name,device", TARGETS)
@pytest.mark.parametrize("shape,hidden", [((2, 5, 3, 7), 2), ((3, 17, 4, 3), 1), ((1, 1, 1, 1), 1)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_plain_pytorch_fp32(name, device, shape, hidden, layout, bias):
    check(name, make(shape, hidden, torch.float32, device, layout, bias), torch.float32)


@pytest.mark.parametrize("name,device", TARGETS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_wide_mlp_float64(name, device, layout):
    """A hidden layer wider than a vector (the MLP's vectorised rows and their tails), float64."""
    check(name, make((3, 21, 3, 4), 11, torch.float64, device, layout), torch.float64)


@pytest.mark.parametrize("name,device", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_matches_plain_pytorch_dtypes(name, device, dtype):
    check(name, make((2, 6, 5, 3), 2, dtype, device, "channels_last"), dtype)


@pytest.mark.parametrize("name,device", TARGETS)
def test_fused_node_on_compiled_backends(name, device):
    y = ops.channel_attention(*make((2, 4, 3, 3), 1, torch.float32, device), backend=name)
    fused = name != "reference"
    assert ("fastnas_ops_channel_attention" in y.grad_fn.name()) == fused


@pytest.mark.parametrize("name,device", TARGETS)
def test_gradcheck_fp64(name, device):
    args = make((2, 3, 2, 3), 2, torch.float64, device)
    assert torch.autograd.gradcheck(lambda *a: ops.channel_attention(*a, backend=name), tuple(args))


@pytest.mark.parametrize("name,device", TARGETS)
def test_only_some_inputs_need_gradients(name, device):
    x, w1, b1, w2, b2 = make((2, 4, 3, 5), 2, torch.float64, device)
    x.requires_grad_(False)
    gw1, gb2 = torch.autograd.grad(ops.channel_attention(x, w1, b1, w2, b2, backend=name).sum(), (w1, b2))
    ew1, eb2 = torch.autograd.grad(plain_gate(x, w1, b1, w2, b2).sum(), (w1, b2))
    torch.testing.assert_close(gw1, ew1)
    torch.testing.assert_close(gb2, eb2)


@pytest.mark.parametrize("name,device", TARGETS)
def test_max_gradient_goes_to_first_maximum(name, device):
    x = torch.zeros(1, 2, 2, 2, device=device, dtype=torch.float64)
    x[0, 0] = torch.tensor([[1.0, 3.0], [3.0, 0.5]])  # tie: positions 1 and 2
    x.requires_grad_()
    _, w1, b1, w2, b2 = make((1, 2, 2, 2), 1, torch.float64, device)
    gx, = torch.autograd.grad(ops.channel_attention(x, w1, b1, w2, b2, backend=name).sum(), x)
    xr = x.detach().clone().requires_grad_()
    avg = xr.mean((2, 3))
    mx = xr.flatten(2).max(2).values  # torch's max routes the gradient to its returned (first) index
    mlp = lambda p: F.linear(torch.relu(F.linear(p, w1, b1)), w2, b2)  # noqa: E731
    er, = torch.autograd.grad((xr * torch.sigmoid(mlp(avg) + mlp(mx))[:, :, None, None]).sum(), xr)
    torch.testing.assert_close(gx, er)


@pytest.mark.parametrize("name,device", TARGETS)
def test_empty_batch(name, device):
    args = make((0, 3, 2, 2), 1, torch.float32, device)
    y = ops.channel_attention(*args, backend=name)
    assert y.shape == (0, 3, 2, 2)
    grads = torch.autograd.grad(y.sum(), [args[0], args[1]], allow_unused=True)
    assert grads[0].shape == (0, 3, 2, 2)


@pytest.mark.parametrize("name,device", TARGETS)
def test_torch_compile_fullgraph(name, device):
    torch._dynamo.reset()
    fn = torch.compile(lambda *a: ops.channel_attention(*a, backend=name), fullgraph=True)
    args = make((2, 5, 3, 4), 2, torch.float32, device, "channels_last")
    y = fn(*args)
    grads = torch.autograd.grad(y.square().sum(), args)
    ey = ops.channel_attention(*args, backend="reference")
    egrads = torch.autograd.grad(ey.square().sum(), args)
    torch.testing.assert_close(y, ey)
    for a, b in zip(grads, egrads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name,device", TARGETS)
def test_autocast(name, device):
    """AMP: bf16 activations with fp32 parameters run the fused node (the MLP cast to bf16, as autocast casts a
    linear layer) on the compiled backends; an fp32 activation under autocast composes the ops."""
    if device == "cpu" and name == "triton":
        pytest.skip("bf16 under the Triton interpreter is covered by the op suite")
    args = make((3, 8, 4, 5), 2, torch.float32, device)
    x, params = args[0].detach().bfloat16().requires_grad_(), args[1:]
    with torch.autocast(device, torch.bfloat16):
        y = ops.channel_attention(x, *params, backend=name)
        y_from_fp32 = ops.channel_attention(args[0], *params, backend=name)
    assert y.dtype == torch.bfloat16
    assert ("fastnas_ops_channel_attention" in y.grad_fn.name()) == (name != "reference")
    assert "fastnas_ops_channel_attention" not in y_from_fp32.grad_fn.name()
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(device, torch.bfloat16)
    grads = torch.autograd.grad(y, (x, *params), g)
    assert grads[0].dtype == torch.bfloat16 and all(gp.dtype == torch.float32 for gp in grads[1:])
    as64 = [a.detach().double().requires_grad_() for a in (x, *params)]
    expected = plain_gate(*as64)
    torch.testing.assert_close(y.double(), expected, rtol=3e-2, atol=3e-2)
    for i, (a, b) in enumerate(zip(grads, torch.autograd.grad(expected, as64, g.double()))):
        scale = max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a.double() / scale, b / scale, rtol=5e-2, atol=5e-2, msg=lambda m: f"grad {i}: {m}")


BAD = [
    (lambda x, w1, b1, w2, b2: (x[0], w1, b1, w2, b2), ValueError, r"channel_attention: x must be 4-D"),
    (lambda x, w1, b1, w2, b2: (x.int(), w1, b1, w2, b2), TypeError, r"channel_attention: x has dtype torch.int32"),
    (lambda x, w1, b1, w2, b2: (x, w1[:, :-1], b1, w2, b2), ValueError, r"w1 must have shape \[hidden, 4\]"),
    (lambda x, w1, b1, w2, b2: (x, w1, b1, w2.t(), b2), ValueError, r"w2 must have shape \[4, 2\]"),
    (lambda x, w1, b1, w2, b2: (x, w1, b1[:1], w2, b2), ValueError, r"b1 must have shape \[2\]"),
    (lambda x, w1, b1, w2, b2: (x, w1, b1, w2, b2.double()), TypeError, r"b2 has dtype torch.float64, expected"),
]


@pytest.mark.parametrize("name,device", TARGETS)
@pytest.mark.parametrize("bad,exc,pattern", BAD)
def test_bad_input_names_the_problem(name, device, bad, exc, pattern):
    args = make((2, 4, 3, 3), 2, torch.float32, device)
    with pytest.raises(exc, match=pattern):
        ops.channel_attention(*bad(*args), backend=name)


def test_module_uses_the_gate_and_keeps_its_state_dict():
    gate = ChannelAttention(32)
    assert list(gate.state_dict()) == ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"]
    x = torch.randn(2, 32, 3, 3)
    first, last = gate.mlp[0], gate.mlp[2]
    torch.testing.assert_close(gate(x).double(), plain_gate(x, first.weight, first.bias, last.weight, last.bias))


needs_cpu_library = pytest.mark.skipif("cpu" not in [p.values[0] for p in TARGETS], reason="fastnas._C not built")


def _kernel_args(layout="contiguous", dtype=torch.float32, shape=(4, 5, 3, 7), hidden=2, bias=True, seed=5):
    """(x, w1, b1, w2, b2) without gradients, for calling the CPU operators directly."""
    return [None if a is None else a.detach() for a in make(shape, hidden, dtype, "cpu", layout, bias, seed)]


def _gate_ops(x, w1, b1, w2, b2, grad, need_x=True):
    """The CPU operators' forward and backward outputs."""
    out, pooled, hidden, logits, argmax = torch.ops.fastnas.channel_gate(x, w1, b1, w2, b2)
    back = torch.ops.fastnas.channel_gate_backward(grad, x, argmax, logits, hidden, w1, w2, need_x)
    return [out, pooled, hidden, logits, argmax, *back]


@needs_cpu_library
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_image_by_image_and_pass_by_pass_schedules_agree_bitwise(layout, dtype):
    """With at least as many images as threads the kernels run image by image, otherwise pass by pass over the
    batch: the arithmetic is the same, so are the bits."""
    x, w1, b1, w2, b2 = _kernel_args(layout, dtype)
    grad = torch.randn_like(x)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        by_image = _gate_ops(x, w1, b1, w2, b2, grad)
        torch.set_num_threads(x.shape[0] + 3)
        by_pass = _gate_ops(x, w1, b1, w2, b2, grad)
    finally:
        torch.set_num_threads(threads)
    for i, (a, b) in enumerate(zip(by_image, by_pass)):
        assert torch.equal(a, b), f"output {i} differs"


@needs_cpu_library
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_backward_kernel_matches_the_composition_of_other_devices(layout, dtype):
    """fastnas::channel_gate_backward against what devices without it compute from the scale op and PyTorch."""
    from fastnas.ops.defs import channel_attention as gate

    x, w1, b1, w2, b2 = _kernel_args(layout, dtype)
    grad = _layout(torch.randn(x.shape, generator=torch.Generator().manual_seed(9)).to(dtype), layout)
    _, _, hidden, logits, argmax, gx, glogits, ghidden = _gate_ops(x, w1, b1, w2, b2, grad)
    cx, clogits, chidden = gate._backward_composed(ops.implementation("cpu", "cpu").kernels, grad, argmax, x, logits, hidden, w1, w2, True)
    rtol, atol = TOL[dtype]
    for a, b in ((gx, cx), (glogits, clogits), (ghidden, chidden)):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)
    assert gx.stride() == torch.empty_like(grad).stride()
    no_x = torch.ops.fastnas.channel_gate_backward(grad, x, argmax, logits, hidden, w1, w2, False)
    assert no_x[0].numel() == 0
    torch.testing.assert_close(no_x[1], glogits, rtol=0, atol=0)
    torch.testing.assert_close(no_x[2], ghidden, rtol=0, atol=0)


@needs_cpu_library
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("bias", [True, False])
def test_gate_operators_opcheck(layout, bias):
    x, w1, b1, w2, b2 = _kernel_args(layout, torch.float32, shape=(3, 4, 2, 5), bias=bias)
    torch.library.opcheck(torch.ops.fastnas.channel_gate.default, (x, w1, b1, w2, b2))
    _, _, hidden, logits, argmax = torch.ops.fastnas.channel_gate(x, w1, b1, w2, b2)
    grad = torch.randn_like(x)
    for need_x in (True, False):
        torch.library.opcheck(torch.ops.fastnas.channel_gate_backward.default,
                              (grad, x, argmax, logits, hidden, w1, w2, need_x))


@needs_cpu_library
def test_gate_operators_bad_input_names_the_problem():
    x, w1, b1, w2, b2 = _kernel_args()
    gate = torch.ops.fastnas.channel_gate
    with pytest.raises(TypeError, match=r"channel_gate: w1 has dtype torch.float64, expected the dtype of x"):
        gate(x, w1.double(), b1, w2, b2)
    with pytest.raises(ValueError, match=r"channel_gate: b2 must have shape \[5\], got \[4\]"):
        gate(x, w1, b1, w2, b2[:4])
    with pytest.raises(ValueError, match=r"channel_gate: x has no spatial elements"):
        gate(x[:, :, :0], w1, b1, w2, b2)
    with pytest.raises(ValueError, match=r"channel_gate: x must be 4-D"):
        gate(x[0], w1, b1, w2, b2)
    _, _, hidden, logits, argmax = gate(x, w1, b1, w2, b2)
    back = torch.ops.fastnas.channel_gate_backward
    with pytest.raises(TypeError, match=r"channel_gate: argmax has dtype torch.int64, expected torch.int32"):
        back(x, x, argmax.long(), logits, hidden, w1, w2, True)
    with pytest.raises(ValueError, match=r"channel_gate: hidden must have shape \[8, 2\]"):
        back(x, x, argmax, logits, hidden[:4], w1, w2, True)
    with pytest.raises(ValueError, match=r"channel_gate: grad has shape"):
        back(x[:2], x, argmax, logits, hidden, w1, w2, True)
