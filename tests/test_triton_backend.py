"""Triton-specific tests: ahead-of-time compilation for a real GPU, launch paths the small shapes of the shared suite
do not take (R split over programs, several programs with partial sums, K > 8), block-size choice, determinism and
what the autograd nodes keep alive.

On the CPU they run under ``TRITON_INTERPRET=1`` (set in conftest); on a GPU machine the same tests run on CUDA
tensors without the interpreter.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref

import pytest
import torch

import fastnas.ops as ops
from fastnas.ops import reference

triton = pytest.importorskip("triton")

from fastnas.kernels import _aot, _common  # noqa: E402
from fastnas.kernels import mixed_sum as k_mixed_sum  # noqa: E402
from fastnas.kernels import pooling as k_pool  # noqa: E402
from fastnas.kernels import scale as k_scale  # noqa: E402
from fastnas.kernels._common import TileConfig  # noqa: E402

DEVICES = (["cpu"] if _common.interpreted() else []) + (["cuda"] if torch.cuda.is_available() else [])
if not DEVICES:
    pytest.skip("the triton backend runs nowhere here (no GPU and TRITON_INTERPRET is not 1)", allow_module_level=True)

ALL_KERNELS = {
    "_mixed_sum_fwd_kernel", "_mixed_sum_bwd_kernel", "sum_partials_kernel",
    "pool_fwd_kernel", "pool_combine_kernel", "pool_bwd_kernel", "scale_fwd_kernel", "scale_bwd_kernel",
}


# ---------------------------------------------------------------------------------------------------------------------
# ahead-of-time compilation for sm_90


def test_every_kernel_compiles_for_sm90(tmp_path):
    """Every launch the launchers make (DARTS shape and an odd one; fp32/bf16/fp16/fp64; NCHW and channels_last;
    AMP; every needs-grad combination) compiles to a cubin for sm_90 with the real Triton compiler. It runs in a
    fresh process without the interpreter, which patches ``triton.language`` in the process that uses it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    proc = subprocess.run([sys.executable, "-m", "fastnas.kernels._aot", "--arch", "90", "--json"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert {r["kernel"] for r in rows} == ALL_KERNELS
    assert not [r for r in rows if "error" in r]
    # the fast paths are vectorised: 16-byte loads/stores in the contiguous fp32 kernels at the DARTS shape
    darts = [r for r in rows if "[64, 16, 32, 32] torch.float32" in r["case"]]
    for kernel in ("_mixed_sum_fwd_kernel", "_mixed_sum_bwd_kernel", "scale_fwd_kernel", "scale_bwd_kernel",
                   "pool_fwd_kernel"):
        assert any(r["kernel"] == kernel and r["ld_v4"] > 0 for r in darts), kernel
    assert any(r["kernel"] == "pool_bwd_kernel" and r["st_v4"] > 0 for r in darts)


def test_benchmark_script_runs():
    """The GPU benchmark (``python -m fastnas.kernels.bench``) in its CPU dry-run mode, so that it does not first
    fail on the GPU machine."""
    from fastnas.kernels import bench

    if _common.interpreted():
        assert bench.main(["--dry", "--dtypes", "bfloat16", "--layouts", "channels_last"]) == 0
    else:
        assert bench.main(["--shape", "8", "16", "8", "8", "--sets", "2", "--dtypes", "float32"]) == 0


def test_capture_records_gpu_launches_without_running():
    x = torch.randn(64, 16, 32, 32)
    out = torch.full_like(x, 7.0)
    with _aot.capture_launches() as launches:
        k_scale.scale_forward(x, torch.randn(64, 16), False, out)
    assert out.eq(7.0).all()  # nothing ran
    assert [launch.name for launch in launches] == ["scale_fwd_kernel"]
    assert launches[0].kwargs["num_warps"] > 1  # GPU block choice, not the interpreter's


# ---------------------------------------------------------------------------------------------------------------------
# block-size choice


def test_gpu_block_choice_at_darts_shape():
    """On a GPU: ≥ 2 programs per SM (132 SMs) for every kernel at the DARTS search shape, tiles long along the
    unit-stride axis."""
    with _aot.capture_launches() as launches:
        for layout in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(64, 16, 32, 32).contiguous(memory_format=layout)
            k_mixed_sum.mixed_sum_forward([x] * 7, torch.randn(7))
            k_mixed_sum.mixed_sum_backward(x, [x] * 7, torch.randn(7), True, True)
            for spatial in (False, True):
                shp = (64, 1024) if spatial else (64, 16)
                a, b, i = torch.empty(shp), torch.empty(shp), torch.zeros(shp, dtype=torch.int32)
                k_pool.pool_forward(x, spatial, a, b, i)
                k_pool.pool_backward(torch.empty_like(x), spatial, a, b, i)
                lg = torch.randn((64, 1, 32, 32) if spatial else (64, 16))
                k_scale.scale_forward(x, lg, spatial, torch.empty_like(x))
                k_scale.scale_backward(x, x, lg, spatial, torch.empty_like(x), torch.empty(lg.shape))
    for launch in launches:
        if launch.name in ("sum_partials_kernel", "pool_combine_kernel"):  # the small second pass
            continue
        assert launch.grid[0] >= 264, (launch.name, launch.grid, launch.kwargs)


@pytest.mark.parametrize("shape,unit_p", [((64, 16, 1024), False), ((64, 16, 1024), True), ((64, 1024, 16), True),
                                          ((64, 1024, 16), False), ((2, 3, 5), False), ((0, 4, 4), True)])
def test_tile_config_covers_r(shape, unit_p):
    n, p, r = shape
    prev = _common._gpu_configs_forced
    _common._gpu_configs_forced = True
    try:
        cfg = _common.tile_config(n, p, r, unit_p, 4, torch.device("cpu"))
    finally:
        _common._gpu_configs_forced = prev
    assert cfg.split * cfg.r_chunk >= r and (cfg.split - 1) * cfg.r_chunk < max(r, 1)
    assert cfg.r_chunk % cfg.br == 0 and cfg.bp * cfg.br <= 2048
    if unit_p and p >= 16:
        assert cfg.bp >= 16  # whole vectors along the contiguous axis
    if not unit_p and r >= 1024:
        assert cfg.br >= 512


def test_interpreter_uses_few_programs():
    if not _common.interpreted():
        pytest.skip("interpreter only")
    assert k_mixed_sum.block_config(3 * 17 * 4 * 3, 4)[0] >= 3 * 17 * 4 * 3
    cfg = _common.tile_config(3, 17, 12, False, 4, torch.device("cpu"))
    assert cfg.programs(3, 17) == 3


# ---------------------------------------------------------------------------------------------------------------------
# launch paths with several programs per reduction (forced small blocks), against the reference


def _x(shape, dtype, device, layout):
    x = torch.randn(shape, device=device, dtype=torch.float64).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float64: dict(rtol=1e-10, atol=1e-10)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("k", [3, 11])
def test_mixed_sum_many_programs_and_chunks(device, dtype, k):
    """BLOCK 64 on 3·5·6·7 = 630 elements: 10 programs, partial weight sums reduced in order; K = 11 runs in two
    chunks of at most 8 inputs (fp32 accumulator between them)."""
    shape = (3, 5, 6, 7)
    xs = [_x(shape, dtype, device, "channels_last" if i == 1 else "nchw") for i in range(k)]
    w = torch.randn(k, device=device)
    g = torch.randn(shape, device=device).to(dtype)
    y = k_mixed_sum.mixed_sum_forward(xs, w, block=64)
    gxs, gw = k_mixed_sum.mixed_sum_backward(g, xs, w, True, True, block=64)
    ref = sum(x.double() * w[i].double() for i, x in enumerate(xs))
    torch.testing.assert_close(y.double(), ref, **TOL[dtype])
    for i in range(k):
        torch.testing.assert_close(gxs[i].double(), g.double() * w[i].double(), **TOL[dtype])
    ref_gw = torch.stack([(g.double() * x.double()).sum() for x in xs])
    torch.testing.assert_close(gw.double(), ref_gw, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spatial", [False, True], ids=["channel", "spatial"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_scale_split_over_r(device, spatial, layout, dtype):
    """R cut over 3 programs of 2 tiles each: partial logit-gradient sums, then the ordered second pass."""
    x = _x((2, 9, 5, 5), dtype, device, layout)
    lg = torch.randn((2, 1, 5, 5) if spatial else (2, 9), device=device)
    g = _x(x.shape, dtype, device, layout)
    r = 9 if spatial else 25
    cfg = TileConfig(bp=4, br=2, split=3, r_chunk=4, num_warps=1) if spatial else \
        TileConfig(bp=4, br=4, split=3, r_chunk=12, num_warps=1)
    assert cfg.split == -(-r // cfg.r_chunk)
    y = k_scale.scale_forward(x, lg, spatial, torch.empty_like(x), cfg)
    gx, gl = torch.empty_like(x), torch.empty(lg.shape, device=device)
    k_scale.scale_backward(g, x, lg, spatial, gx, gl, cfg)
    fn = reference.spatial_scale if spatial else reference.channel_scale
    xr, lr = x.double().requires_grad_(), lg.double().requires_grad_()
    yr = fn(xr, lr)
    yr.backward(g.double())
    torch.testing.assert_close(y.double(), yr.detach(), **TOL[dtype])
    torch.testing.assert_close(gx.double(), xr.grad, **TOL[dtype])
    torch.testing.assert_close(gl.double(), lr.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spatial", [False, True], ids=["channel", "spatial"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_pool_split_over_r_first_maximum(device, spatial, layout):
    """R cut over several programs; the maximum occurs in several of them (and a NaN in a later one for one row):
    the combined argmax is the first occurrence, as torch.max(dim) gives it."""
    n, c, h, w = 2, 6, 3, 4
    x = torch.randint(0, 3, (n, c, h, w), device=device).float()  # many ties
    x[1, 2, 2, 1] = float("nan")
    x[1, 2, 2, 3] = float("nan")
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    r = c if spatial else h * w
    cfg = TileConfig(bp=2, br=2, split=-(-r // 2), r_chunk=2, num_warps=1)
    p_shape = (n, h * w) if spatial else (n, c)
    mean, mx = torch.empty(p_shape, device=device), torch.empty(p_shape, device=device)
    idx = torch.empty(p_shape, dtype=torch.int32, device=device)
    k_pool.pool_forward(x, spatial, mean, mx, idx, cfg)
    flat = x.flatten(2).transpose(1, 2) if spatial else x.flatten(2)  # [N, P, R]
    ref = flat.max(dim=2)
    torch.testing.assert_close(mx, ref.values, equal_nan=True)
    assert torch.equal(idx.long(), ref.indices)
    torch.testing.assert_close(mean, flat.mean(dim=2), equal_nan=True)
    # backward with forced small tiles
    gx = torch.empty_like(x)
    gm, gM = torch.randn(p_shape, device=device), torch.randn(p_shape, device=device)
    k_pool.pool_backward(gx, spatial, gm, gM, idx, cfg)
    expect = (gm / r)[:, :, None].expand(n, flat.shape[1], r).clone()
    expect.scatter_add_(2, ref.indices[:, :, None], gM[:, :, None])
    got = gx.flatten(2).transpose(1, 2) if spatial else gx.flatten(2)
    torch.testing.assert_close(got, expect)


@pytest.mark.parametrize("device", DEVICES)
def test_max_gradient_goes_to_first_nan(device):
    x = torch.randn(1, 3, 2, 3, device=device)
    x[0, 1, 0, 2] = float("nan")
    x[0, 1, 1, 1] = float("nan")
    x[0, 2, 1, 0] = float("nan")
    for op in ("channel_pool", "spatial_pool"):
        xt, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        out = getattr(ops, op)(xt, backend="triton")
        ref = getattr(reference, op)(xr)
        pick = (lambda o: o[1]) if op == "channel_pool" else (lambda o: o[:, 0])
        pick(out).sum().backward()
        pick(ref).sum().backward()
        assert torch.equal(xt.grad, xr.grad), op


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["channel_scale", "spatial_scale", "mixed_sum", "channel_pool", "spatial_pool"])
def test_mixed_layouts_and_strided_parameters(device, op):
    """channels_last x with an NCHW upstream gradient, a non-contiguous (transposed / sliced) logits or weights
    tensor, and a non-mergeable (H, W) layout."""
    n, c, h, w = 2, 5, 3, 4
    x = torch.randn(n, c, h, w, device=device).contiguous(memory_format=torch.channels_last)
    odd = torch.randn(n, c, w, h, device=device).transpose(2, 3)  # W-major: H and W do not merge
    if op == "channel_scale":
        args = [(x, torch.randn(c, n, device=device).t()), (odd, torch.randn(n, c, device=device))]
    elif op == "spatial_scale":
        args = [(x, torch.randn(n, 1, w, h, device=device).transpose(2, 3)), (odd, torch.randn(n, 1, h, w, device=device))]
    elif op == "mixed_sum":
        args = [([x, x.contiguous(), odd], torch.randn(3, 2, device=device)[:, 1])]
    else:
        args = [(x,), (odd,)]
    for a in args:
        leaves = [[t.detach().clone().requires_grad_() for t in v] if isinstance(v, list) else
                  v.detach().clone().requires_grad_() for v in a]
        refs = [[t.detach().double().requires_grad_() for t in v] if isinstance(v, list) else
                v.detach().double().requires_grad_() for v in a]
        out = getattr(ops, op)(*leaves, backend="triton")
        ref = getattr(reference, op)(*refs)
        outs, routs = (list(out), list(ref)) if isinstance(out, tuple) else ([out], [ref])
        gs = [torch.randn(o.shape, device=device) for o in outs]  # contiguous NCHW upstream gradients
        torch.autograd.backward(outs, gs)
        torch.autograd.backward(routs, [g.double() for g in gs])
        for o, r in zip(outs, routs):
            torch.testing.assert_close(o.double(), r.detach(), **TOL[torch.float32])
        flat = [t for v in leaves for t in (v if isinstance(v, list) else [v])]
        rflat = [t for v in refs for t in (v if isinstance(v, list) else [v])]
        for t, r in zip(flat, rflat):
            torch.testing.assert_close(t.grad.double(), r.grad, **TOL[torch.float32])


# ---------------------------------------------------------------------------------------------------------------------
# determinism and what autograd keeps


@pytest.mark.parametrize("device", DEVICES)
def test_parameter_gradients_are_bitwise_reproducible(device):
    """Weight and logit gradients come from per-program partial sums reduced in a fixed order (no atomics)."""
    xs = [torch.randn(4, 8, 6, 6, device=device) for _ in range(7)]
    x = xs[0].contiguous(memory_format=torch.channels_last)
    runs = []
    for _ in range(2):
        w = torch.randn(7, device=device, generator=torch.Generator(device).manual_seed(1)).requires_grad_()
        lc = torch.randn(4, 8, device=device, generator=torch.Generator(device).manual_seed(2)).requires_grad_()
        ls = torch.randn(4, 1, 6, 6, device=device, generator=torch.Generator(device).manual_seed(3)).requires_grad_()
        y = ops.mixed_sum(xs, w, backend="triton")
        y = ops.channel_scale(y, lc, backend="triton")
        y = ops.spatial_scale(y + x, ls, backend="triton")
        y.square().sum().backward()
        runs.append((w.grad.clone(), lc.grad.clone(), ls.grad.clone()))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["mixed_sum", "channel_scale", "spatial_scale"])
def test_input_kept_only_for_parameter_gradient(device, op):
    """mixed_sum keeps its inputs only for the weights' gradient; the scale ops keep x only for the logits'.
    The input is a non-leaf tensor, so only the autograd node can keep it alive."""
    def input_alive(param_grad: bool) -> bool:
        base = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
        inp = base * 2
        ref = weakref.ref(inp)
        if op == "mixed_sum":
            out = ops.mixed_sum([inp], torch.ones(1, device=device, requires_grad=param_grad), backend="triton")
        elif op == "channel_scale":
            out = ops.channel_scale(inp, torch.randn(2, 3, device=device, requires_grad=param_grad), backend="triton")
        else:
            out = ops.spatial_scale(inp, torch.randn(2, 1, 4, 5, device=device, requires_grad=param_grad),
                                    backend="triton")
        del inp
        gc.collect()
        alive = ref() is not None
        out.sum().backward()
        assert base.grad is not None
        return alive

    assert not input_alive(False), "the input is kept although no parameter gradient is needed"
    assert input_alive(True), "the input is needed for the parameter gradient"


@pytest.mark.parametrize("device", DEVICES)
def test_parameter_gradient_without_input_gradient(device):
    x = torch.randn(2, 3, 4, 5, device=device)
    for op, shape in (("channel_scale", (2, 3)), ("spatial_scale", (2, 1, 4, 5))):
        lg = torch.randn(shape, device=device, requires_grad=True)
        lr = lg.detach().clone().requires_grad_()
        getattr(ops, op)(x, lg, backend="triton").square().sum().backward()
        getattr(reference, op)(x, lr).square().sum().backward()
        torch.testing.assert_close(lg.grad, lr.grad)
    w = torch.randn(3, device=device, requires_grad=True)
    wr = w.detach().clone().requires_grad_()
    xs = [torch.randn(2, 3, 4, 5, device=device) for _ in range(3)]
    ops.mixed_sum(xs, w, backend="triton").square().sum().backward()
    reference.mixed_sum(xs, wr).square().sum().backward()
    torch.testing.assert_close(w.grad, wr.grad)
