"""LeanConv2d / LeanBatchNorm2d: the same numbers as nn.Conv2d / nn.BatchNorm2d, less stored for the backward."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fastnas.ops
from fastnas.nn.lean import LeanBatchNorm2d, LeanConv2d, subsampling_plan
from fastnas.nn.recompute import RecomputableBatchNorm, recompute
from fastnas.ops import subsample

LAYOUTS = [torch.contiguous_format, torch.channels_last]


def available_on_cpu() -> set[str]:
    return {name for name, state in fastnas.ops.available_backends().items() if state == "available"}


def _output_saving(y: torch.Tensor) -> bool:
    """Whether y comes from the output-saving batch norm (ATen's: fastnas_ops::batch_norm_output_saving, or a
    backend's batch_norm_train kernel, with the same autograd)."""
    name = y.grad_fn.name()
    return "batch_norm_output_saving" in name or "_batch_norm_train_" in name


def _saved_storages(fn, *args) -> set[int]:
    """Data pointers of every tensor autograd saves while running fn(*args)."""
    ptrs: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptrs.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return ptrs


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_batch_norm_matches_torch(dtype, layout, backend):
    """Bit-exact on ATen's kernels; within rounding on the cpu backend's (channels_last inputs), whose statistics
    are summed in another order."""
    if backend not in available_on_cpu():
        pytest.skip(f"backend {backend} unavailable")
    torch.manual_seed(0)
    plain, lean = nn.BatchNorm2d(5, affine=False).to(dtype), LeanBatchNorm2d(5, affine=False).to(dtype)
    x = (3 * torch.randn(4, 5, 7, 3, dtype=dtype) + 1).to(memory_format=layout).requires_grad_()
    g = torch.randn(4, 5, 7, 3, dtype=dtype)
    exact = backend == "reference" or layout != torch.channels_last
    tol = dict(rtol=0, atol=0) if exact else {}
    with fastnas.ops.backend(backend):
        for _ in range(2):  # running statistics move alike, step after step
            y_plain, y_lean = plain(x), lean(x)
            torch.testing.assert_close(y_lean, y_plain, **tol)
            (gx_plain,), (gx_lean,) = torch.autograd.grad(y_plain, x, g), torch.autograd.grad(y_lean, x, g)
            torch.testing.assert_close(gx_lean, gx_plain)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(lean, name), getattr(plain, name), **tol)
    assert _output_saving(y_lean)


def test_batch_norm_saves_its_output_not_its_input():
    bn = LeanBatchNorm2d(3, affine=False)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    pre = x * 2  # a tensor of its own, so that "the input was not saved" is visible
    y_ptrs: list[int] = []

    def run(t):
        y = bn(t)
        y_ptrs.append(y.untyped_storage().data_ptr())

    saved = _saved_storages(run, pre)
    assert pre.untyped_storage().data_ptr() not in saved
    assert y_ptrs[0] in saved


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("conf", [(3, 1, 1, 1, True), (5, 2, 4, 2, True), (1, 1, 0, 1, False), ((1, 7), 2, (0, 3), 1, False)])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_frozen_conv_matches_torch_and_keeps_no_input(layout, conf, backend):
    if backend not in available_on_cpu():
        pytest.skip(f"backend {backend} unavailable")
    fastnas.ops.set_backend(backend)
    try:
        _frozen_conv_matches_torch_and_keeps_no_input(layout, conf, backend)
    finally:
        fastnas.ops.set_backend("auto")


def _frozen_conv_matches_torch_and_keeps_no_input(layout, conf, backend):
    k, stride, padding, dilation, depthwise = conf
    torch.manual_seed(1)
    c_out = 6 if depthwise else 4
    plain = nn.Conv2d(6, c_out, k, stride, padding, dilation, groups=6 if depthwise else 1, bias=False)
    lean = LeanConv2d(6, c_out, k, stride, padding, dilation, groups=6 if depthwise else 1, bias=False)
    lean.load_state_dict(plain.state_dict())
    for m in (plain, lean):
        m.weight.requires_grad_(False)
    x = torch.randn(3, 6, 9, 11).to(memory_format=layout).requires_grad_()
    pre = x * 1.5
    y_plain, y_lean = plain(pre), lean(pre)
    # the same kernel on the same input is bit-exact; the subsampled form of a strided dilated one, and the cpu
    # backend's depthwise backward (the flipped filter's forward convolution), sum in their own order
    subsampled = subsampling_plan(lean.kernel_size, lean.stride, lean.padding, lean.dilation)
    exact = not subsampled and (backend == "reference" or not depthwise)
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y_lean, y_plain, **tol)
    g = torch.randn_like(y_plain)
    torch.testing.assert_close(torch.autograd.grad(y_lean, x, g, retain_graph=True)[0],
                               torch.autograd.grad(y_plain, x, g)[0], **tol)
    assert pre.untyped_storage().data_ptr() not in _saved_storages(lean, pre)
    lean.weight.requires_grad_(True)  # a trainable weight takes PyTorch's own path (its gradient needs the input)
    if not subsampled:  # (the subsampled form keeps the subsampled copy instead)
        assert pre.untyped_storage().data_ptr() in _saved_storages(lean, pre)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("size", [(9, 11), (8, 8), (2, 3), (1, 1)])
@pytest.mark.parametrize("k,dilation,depthwise", [(5, 2, True), (3, 2, True), (3, 3, False), ((3, 5), 2, True)])
@pytest.mark.parametrize("frozen", [False, True])
def test_strided_dilated_conv_equals_torch_on_the_subsampled_input(layout, size, k, dilation, depthwise, frozen):
    """stride = dilation > 1 with 'same' padding: computed as the undilated convolution of x[..., ::s, ::s]; output,
    input gradient and weight gradient equal PyTorch's dilated convolution (float64), odd and tiny sizes too."""
    kh, kw = (k, k) if isinstance(k, int) else k
    padding = (dilation * (kh - 1) // 2, dilation * (kw - 1) // 2)
    assert subsampling_plan((kh, kw), (dilation, dilation), padding, (dilation, dilation))
    torch.manual_seed(2)
    groups, c_out = (4, 4) if depthwise else (1, 3)
    plain = nn.Conv2d(4, c_out, (kh, kw), dilation, padding, dilation, groups=groups, bias=False).double()
    lean = LeanConv2d(4, c_out, (kh, kw), dilation, padding, dilation, groups=groups, bias=False).double()
    lean.load_state_dict(plain.state_dict())
    for m in (plain, lean):
        m.weight.requires_grad_(not frozen)
    x = torch.randn(2, 4, *size, dtype=torch.float64).to(memory_format=layout).requires_grad_()
    y_plain, y_lean = plain(x), lean(x)
    assert y_lean.shape == y_plain.shape
    torch.testing.assert_close(y_lean, y_plain)
    g = torch.randn_like(y_plain)
    wrt = [x] if frozen else [x, plain.weight]
    expected = torch.autograd.grad(y_plain, wrt, g)
    got = torch.autograd.grad(y_lean, [x] if frozen else [x, lean.weight], g)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("size", [(9, 11), (8, 8), (2, 3)])
@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("frozen", [False, True])
def test_strided_pointwise_conv_equals_torch_on_the_subsampled_input(layout, size, shifted, frozen):
    """1x1 stride 2 (FactorizedReduce's convolutions, also on its shifted view x[:, :, 1:, 1:]): computed on
    x[..., ::2, ::2]; output and gradients equal PyTorch's (float64); a channels_last view keeps channels_last."""
    assert subsampling_plan((1, 1), (2, 2), (0, 0), (1, 1))
    torch.manual_seed(3)
    plain = nn.Conv2d(4, 3, 1, 2, bias=False).double()
    lean = LeanConv2d(4, 3, 1, 2, bias=False).double()
    lean.load_state_dict(plain.state_dict())
    for m in (plain, lean):
        m.weight.requires_grad_(not frozen)
    x = torch.randn(2, 4, *size, dtype=torch.float64).to(memory_format=layout).requires_grad_()
    inp = x[:, :, 1:, 1:] if shifted else x
    y_plain, y_lean = plain(inp), lean(inp)
    assert y_lean.shape == y_plain.shape
    torch.testing.assert_close(y_lean, y_plain)
    if layout == torch.channels_last and min(y_lean.shape[1:]) > 1:
        assert y_lean.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(y_plain)
    expected = torch.autograd.grad(y_plain, [x] if frozen else [x, plain.weight], g)
    got = torch.autograd.grad(y_lean, [x] if frozen else [x, lean.weight], g)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("offset", [(0, 0), (1, 1), (1, 0)])
@pytest.mark.parametrize("size", [(8, 6), (7, 5), (1, 1)])
def test_subsample_equals_slicing_in_the_input_layout(layout, offset, size):
    """subsample(x, 2, offset) = x[:, :, oh::2, ow::2] with x's layout, forward and backward (the gradient keeps x's
    layout too); double backward through it is exact."""
    x = torch.randn(2, 3, *size, dtype=torch.float64).to(memory_format=layout).requires_grad_()
    y = subsample(x, (2, 2), offset)
    expected = x[:, :, offset[0]::2, offset[1]::2]
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    g = torch.randn_like(expected)
    (gx,), (ex,) = torch.autograd.grad(y, x, g), torch.autograd.grad(expected, x, g)
    torch.testing.assert_close(gx, ex, rtol=0, atol=0)
    if layout == torch.channels_last:
        assert gx.is_contiguous(memory_format=torch.channels_last)
    assert torch.autograd.gradgradcheck(lambda t: subsample(t, (2, 2), offset), (x,))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("size", [(8, 6), (9, 7), (8, 7)])
def test_factorized_reduce_equals_the_darts_formula(layout, size):
    """FactorizedReduce (its shifted branch subsampled directly on even sizes, padded on odd ones) against DARTS's
    formula written with nn.Conv2d: output and every gradient, float64."""
    from fastnas.nn.operations import FactorizedReduce

    torch.manual_seed(4)
    fr = FactorizedReduce(4, 6).double()
    conv_1, conv_2 = nn.Conv2d(4, 3, 1, 2, bias=False).double(), nn.Conv2d(4, 3, 1, 2, bias=False).double()
    conv_1.load_state_dict(fr.conv_1.state_dict())
    conv_2.load_state_dict(fr.conv_2.state_dict())
    bn = nn.BatchNorm2d(6).double()
    x = torch.randn(2, 4, *size, dtype=torch.float64).to(memory_format=layout).requires_grad_()
    y = fr(x)
    r = torch.relu(x)
    shifted = nn.functional.pad(r[:, :, 1:, 1:], (0, size[1] % 2, 0, size[0] % 2))
    expected = bn(torch.cat([conv_1(r), conv_2(shifted)], dim=1))
    torch.testing.assert_close(y, expected)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, fr.conv_1.weight, fr.conv_2.weight], g)
    want = torch.autograd.grad(expected, [x, conv_1.weight, conv_2.weight], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("conf", [((3, 3), (2, 2), (2, 2), (1, 1)), ((3, 3), (1, 1), (2, 2), (2, 2)),
                                  ((3, 3), (2, 2), (1, 1), (2, 2)), ((4, 4), (2, 2), (3, 3), (2, 2)),
                                  ((1, 1), (2, 2), (1, 1), (1, 1)), ((1, 7), (1, 2), (0, 3), (1, 1))])
def test_subsampling_plan_only_where_exact(conf):
    """Undilated strided, dilated unstrided, other padding, even kernels, a padded 1x1, a dimension left unstrided:
    the convolution runs as it is."""
    assert not subsampling_plan(*conf)


def test_double_backward_is_exact():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    bn = LeanBatchNorm2d(3, affine=False).double()
    conv = LeanConv2d(3, 3, 3, 2, 2, dilation=2, groups=3, bias=False).double().requires_grad_(False)
    assert torch.autograd.gradgradcheck(lambda t: bn(t), (x,))
    assert torch.autograd.gradgradcheck(conv, (x,))


def test_affine_eval_and_amp_take_the_plain_path():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    assert LeanBatchNorm2d(3)(x).grad_fn.name() == "NativeBatchNormBackward0"  # affine
    assert not _output_saving(LeanBatchNorm2d(3, affine=False).eval()(x))
    with torch.autocast("cpu", torch.bfloat16):
        assert not _output_saving(LeanBatchNorm2d(3, affine=False)(x))


class _LeanBlock(nn.Module):
    """A frozen depthwise convolution, then a recomputed pooling with its batch norm, then a lean batch norm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = LeanConv2d(3, 3, 3, 1, 1, groups=3, bias=False).requires_grad_(False)
        self.pool_bn, self.bn = RecomputableBatchNorm(3, affine=False), LeanBatchNorm2d(3, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(recompute(lambda t: self.pool_bn(nn.functional.avg_pool2d(t, 3, 1, 1)), self.conv(x)))


def test_lean_modules_and_recompute_compile_whole_with_the_same_numbers():
    """One graph under torch.compile (the ops are opaque custom operators, the checkpoint is traced), the eager
    numbers, and the recomputed batch norm moves its running statistics once."""
    torch.manual_seed(5)
    eager, compiled = _LeanBlock(), _LeanBlock()
    compiled.load_state_dict(eager.state_dict())
    x = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    run = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    for _ in range(2):
        y, y2 = eager(x), run(x2)
        torch.testing.assert_close(y2, y)
        torch.testing.assert_close(torch.autograd.grad(y2.square().sum(), x2)[0],
                                   torch.autograd.grad(y.square().sum(), x)[0])
    for a, b in zip(compiled.buffers(), eager.buffers()):
        torch.testing.assert_close(a, b)
    assert int(eager.pool_bn.num_batches_tracked) == 2
