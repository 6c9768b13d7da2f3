"""Tests specific to the compiled backends (``cpu``, ``cuda``): the build, the CMake library, what the backward
keeps alive, determinism, and the fast paths (channels_last, vector tails, odd strides) at sizes the shared suite in
test_ops.py does not reach. CUDA cases run on a GPU machine and are skipped elsewhere.
"""
from __future__ import annotations

import gc
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch

import fastnas.ops as ops
from fastnas.ops import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_cpp = pytest.importorskip("fastnas.ops.backends.cpp")
BUILT = _cpp.backend_available("cpu")[0]
needs_lib = pytest.mark.skipif(not BUILT, reason="fastnas._C is not built")

DEVICES = [pytest.param("cpu", id="cpu")] + [
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(
        not (torch.cuda.is_available() and _cpp.compiled_with_cuda()), reason="no CUDA device or no CUDA kernels"))
]
OPS = ("mixed_sum", "channel_pool", "channel_scale", "spatial_pool", "spatial_scale")
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _backend(device: str) -> str:
    return "cpu" if device == "cpu" else "cuda"


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "nwhc":  # dense, but neither NCHW nor NHWC
        return t.permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1)
    if layout == "strided":
        wide = torch.zeros(*t.shape[:3], t.shape[3] * 3, dtype=t.dtype, device=t.device)
        wide[..., ::3] = t
        return wide[..., ::3]
    return t.contiguous()


def _inputs(op, shape, dtype, device, layout, k=4, param_dtype=None, gen=None):
    param_dtype = param_dtype or dtype
    n, c, h, w = shape
    x = lambda: _layout(torch.randn(shape, generator=gen).to(device=device, dtype=dtype), layout)  # noqa: E731
    if op == "mixed_sum":
        return [x() for _ in range(k)], torch.randn(k, generator=gen).to(device=device, dtype=param_dtype)
    if op == "channel_scale":
        return x(), torch.randn(n, c, generator=gen).to(device=device, dtype=param_dtype)
    if op == "spatial_scale":
        return x(), torch.randn(n, 1, h, w, generator=gen).to(device=device, dtype=param_dtype)
    return (x(),)


def _leaves(args):
    return tuple([t.detach().clone().requires_grad_() for t in a] if isinstance(a, list)
                 else a.detach().clone().requires_grad_() for a in args)


def _flat(args):
    out = []
    for a in args:
        out.extend(a if isinstance(a, list) else [a])
    return out


def _fwd_bwd(fn, args, grads=None):
    args = _leaves(args)
    out = fn(*args)
    outs = list(out) if isinstance(out, tuple) else [out]
    if grads is None:
        grads = [torch.randn(o.shape, dtype=torch.float64).to(device=o.device, dtype=o.dtype) for o in outs]
    torch.autograd.backward(outs, grads)
    return outs, grads, [a.grad for a in _flat(args)]


def _compare(op, args, device, dtype):
    fn = lambda *a: getattr(ops, op)(*a, backend=_backend(device))  # noqa: E731
    outs, grads, ins = _fwd_bwd(fn, args)
    as64 = tuple([t.detach().double() for t in a] if isinstance(a, list) else a.detach().double() for a in args)
    ref_outs, _, ref_ins = _fwd_bwd(getattr(reference, op), as64, [g.double() for g in grads])
    tol = TOL[dtype]
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        torch.testing.assert_close(o.double(), r, rtol=tol, atol=tol, msg=lambda m: f"{op} output {i}: {m}")
    for i, (g, r) in enumerate(zip(ins, ref_ins)):
        torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol, msg=lambda m: f"{op} grad {i}: {m}")
    return outs, ins


# ------------------------------------------------------------------------------------------------ the build

@needs_lib
def test_library_provides_the_backends():
    assert ops.resolve_backend("cpu") == "cpu"
    assert ops.available_backends()["cpu"] == "available"
    assert _cpp.cpu_capability() in ("avx2", "default")
    for name in ("mixed_sum", "channel_pool", "channel_scale", "spatial_pool", "spatial_scale"):
        assert name in _cpp.custom_ops
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastnas::{name}", "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastnas::{name}_backward", "CPU")


def _setup_module():
    spec = importlib.util.spec_from_file_location("fastnas_setup", os.path.join(ROOT, "setup.py"))
    src = open(os.path.join(ROOT, "setup.py")).read()
    src = src[: src.index("ext_modules, cmdclass = _extensions()")]  # the helpers only, no setup() call
    mod = importlib.util.module_from_spec(spec)
    exec(compile(src, "setup.py", "exec"), mod.__dict__)
    return mod


@needs_lib
@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "setup.py")), reason="no source tree")
def test_cuda_kernels_built_for_sm80_and_sm90_when_a_toolkit_is_found():
    """setup.py builds the CUDA kernels whenever it finds a toolkit (unless FASTNAS_CUDA=0), for sm_80 and sm_90."""
    toolkit = _setup_module()._find_cuda_root()
    if toolkit is None or torch.version.cuda is None:
        pytest.skip("no CUDA toolkit here")
    if os.environ.get("FASTNAS_CUDA", "") == "0":
        pytest.skip("FASTNAS_CUDA=0")
    assert _cpp.compiled_with_cuda(), f"a CUDA toolkit is at {toolkit} but fastnas._C has no CUDA kernels"
    assert {800, 900} <= set(_cpp.cuda_arch_list())
    if not torch.cuda.is_available():
        assert "no CUDA device" in ops.available_backends()["cuda"]


def test_setup_finds_the_real_toolkit_root():
    """CUDA_HOME must be where bin/nvcc and the runtime library live, not the directory of a wrapper on PATH."""
    root = _setup_module()._find_cuda_root()
    if root is None:
        pytest.skip("no CUDA toolkit here")
    assert os.path.isfile(os.path.join(root, "bin", "nvcc"))
    assert glob.glob(os.path.join(root, "lib64", "libcudart.so*")) or glob.glob(
        os.path.join(root, "targets", "*", "lib", "libcudart.so*"))


@needs_lib
def test_built_library_is_not_older_than_its_sources():
    lib = _cpp._C.__file__
    sources = glob.glob(os.path.join(ROOT, "csrc", "**", "*.*"), recursive=True)
    if not sources or not lib.startswith(ROOT):
        pytest.skip("not an in-tree (editable) build")
    stale = [s for s in sources if os.path.getmtime(s) > os.path.getmtime(lib) + 1]
    assert not stale, f"rebuild fastnas._C (pip install --no-build-isolation -e .): newer sources {stale}"


@needs_lib
def test_portable_cpu_kernels_match_the_reference():
    """The kernels compiled for the baseline instruction set (used where AVX2 is missing) are right too."""
    code = textwrap.dedent("""
        import torch, fastnas.ops as ops
        from fastnas.ops import reference as R
        from fastnas.ops.backends import cpp as _cpp
        assert _cpp.cpu_capability() == "default", _cpp.cpu_capability()
        g = torch.Generator().manual_seed(0)
        for shape in [(3, 37, 9, 11), (2, 16, 32, 32), (1, 3, 1, 70)]:
            for cl in (False, True):
                for dtype in (torch.float32, torch.bfloat16, torch.float64):
                    mk = lambda: torch.randn(shape, generator=g).to(dtype)
                    x = mk()
                    if cl:
                        x = x.contiguous(memory_format=torch.channels_last)
                    n, c, h, w = shape
                    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else {}
                    xs, wts = [mk() for _ in range(3)], torch.randn(3)
                    cases = [("mixed_sum", (xs, wts)), ("channel_pool", (x,)), ("spatial_pool", (x,)),
                             ("channel_scale", (x, torch.randn(n, c))), ("spatial_scale", (x, torch.randn(n, 1, h, w)))]
                    for op, args in cases:
                        torch.testing.assert_close(getattr(ops, op)(*args, backend="cpu"), getattr(R, op)(*args), **tol)
                        xg = x.detach().requires_grad_()
                        if op in ("channel_pool", "spatial_pool"):
                            out = getattr(ops, op)(xg, backend="cpu")
                            sum(o.square().sum() for o in (out if isinstance(out, tuple) else (out,))).backward()
                            xr = x.detach().requires_grad_()
                            out = getattr(R, op)(xr)
                            sum(o.square().sum() for o in (out if isinstance(out, tuple) else (out,))).backward()
                            torch.testing.assert_close(xg.grad, xr.grad, **tol)
        # the network-layer kernels (float64, channels_last): channel gate, pools, affine batch norm
        import torch.nn.functional as F
        from fastnas.nn import ChannelAttention
        from fastnas.nn.lean import LeanBatchNorm2d
        x = torch.randn(3, 21, 5, 6, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
        gate = ChannelAttention(21, reduction=2).double()
        pairs = [(lambda t: gate(t), "cpu", "reference"),
                 (lambda t: ops.max_pool2d(t, 3, 1, 1), "cpu", "reference"),
                 (lambda t: ops.avg_pool2d(t, 3, 2, 1), "cpu", "reference")]
        for fn, a, b in pairs:
            outs = []
            for name in (a, b):
                t = x.detach().requires_grad_()
                with ops.backend(name):
                    y = fn(t)
                y.square().sum().backward()
                outs.append((y, t.grad))
            for u, v in zip(*outs):
                torch.testing.assert_close(u, v)
        bn, ref = LeanBatchNorm2d(21).double(), torch.nn.BatchNorm2d(21).double()
        t, r = x.detach().requires_grad_(), x.detach().requires_grad_()
        with ops.backend("cpu"):
            y = bn(t)
        assert "batch_norm_affine_train" in y.grad_fn.name()
        y.square().sum().backward()
        ref(r).square().sum().backward()
        torch.testing.assert_close(t.grad, r.grad)
        torch.testing.assert_close(bn.weight.grad, ref.weight.grad)
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={**os.environ, "FASTNAS_CPU_CAPABILITY": "default"})
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


def test_missing_library_falls_back_to_reference():
    """Without fastnas._C, `import fastnas` works, `auto` uses the reference and the cpu backend says why."""
    code = textwrap.dedent("""
        import sys
        sys.modules["fastnas._C"] = None  # makes `from fastnas import _C` raise ImportError
        import torch, fastnas, fastnas.ops as ops
        assert ops.resolve_backend("cpu") == "reference", ops.resolve_backend("cpu")
        why = ops.available_backends()["cpu"]
        assert why.startswith("unavailable") and "fastnas._C" in why, why
        try:
            ops.resolve_backend("cpu", "cpu")
        except ops.BackendUnavailable as exc:
            assert "fastnas._C" in str(exc)
        else:
            raise AssertionError("the cpu backend should be unavailable")
        x = torch.randn(2, 3, 4, 5)
        torch.testing.assert_close(ops.mixed_sum([x, x], torch.tensor([1.0, 2.0])), 3 * x)
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


def _cmake():
    exe = shutil.which("cmake")
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.split()
    try:
        version = tuple(int(p) for p in out[2].split(".")[:2])
    except (IndexError, ValueError):
        return None
    return exe if version >= (3, 26) else None


@pytest.mark.skipif(_cmake() is None, reason="needs cmake >= 3.26")
def test_cmake_build_loads_with_torch_ops_load_library(tmp_path):
    """CMakeLists.txt builds the same operators; torch.ops.load_library loads them (in a fresh process, since the
    schemas can be registered once per process). CPU kernels only unless FASTNAS_TEST_CMAKE_CUDA=1."""
    build = tmp_path / "build"
    cuda = "ON" if os.environ.get("FASTNAS_TEST_CMAKE_CUDA", "0") == "1" else "OFF"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    cfg = subprocess.run([_cmake(), "-S", ROOT, "-B", str(build), *gen, f"-DFASTNAS_CUDA={cuda}",
                          f"-DPython3_EXECUTABLE={sys.executable}"], capture_output=True, text=True, timeout=600)
    assert cfg.returncode == 0, cfg.stdout[-4000:] + cfg.stderr[-4000:]
    jobs = os.environ.get("MAX_JOBS", "2")
    res = subprocess.run([_cmake(), "--build", str(build), "-j", jobs], capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    (lib,) = glob.glob(str(build / "libfastnas_ops.so"))
    code = textwrap.dedent(f"""
        import torch
        torch.ops.load_library({lib!r})
        from fastnas.ops import reference as R
        F = torch.ops.fastnas
        x = torch.randn(2, 5, 6, 7).contiguous(memory_format=torch.channels_last)
        w = torch.randn(3)
        torch.testing.assert_close(F.mixed_sum([x, 2 * x, -x], w), R.mixed_sum([x, 2 * x, -x], w))
        avg, mx, arg = F.channel_pool(x)
        torch.testing.assert_close((avg, mx), R.channel_pool(x))
        torch.testing.assert_close(F.spatial_pool(x)[0], R.spatial_pool(x))
        l = torch.randn(2, 5)
        torch.testing.assert_close(F.channel_scale(x, l), R.channel_scale(x, l))
        l = torch.randn(2, 1, 6, 7)
        torch.testing.assert_close(F.spatial_scale(x, l), R.spatial_scale(x, l))
        print("ok", list(F.cuda_arch_list()))
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path), timeout=300,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert run.returncode == 0 and "ok" in run.stdout, run.stdout + run.stderr
    if cuda == "ON":
        assert "800" in run.stdout and "900" in run.stdout


# ------------------------------------------------------------------------------------------------ saved tensors

@needs_lib
@pytest.mark.parametrize("device", DEVICES)
def test_mixed_sum_keeps_no_reference_to_inputs_without_weight_grad(device):
    leaf = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    w = torch.softmax(torch.randn(3, device=device), 0)  # needs no gradient
    xs = [leaf * (k + 1.0) for k in range(3)]  # non-leaf inputs: only this graph could keep them alive
    refs = [weakref.ref(x) for x in xs]
    y = ops.mixed_sum(xs, w, backend=_backend(device))
    del xs
    gc.collect()
    assert all(r() is None for r in refs), "mixed_sum kept its inputs alive although the weights need no gradient"
    y.sum().backward()
    torch.testing.assert_close(leaf.grad, torch.full_like(leaf, float(sum((k + 1.0) * w[k] for k in range(3)))))

    # with a weight gradient they are needed (and kept)
    w.requires_grad_()
    xs = [leaf * (k + 1.0) for k in range(3)]
    refs = [weakref.ref(x) for x in xs]
    y = ops.mixed_sum(xs, w, backend=_backend(device))
    del xs
    gc.collect()
    assert all(r() is not None for r in refs)
    y.sum().backward()
    torch.testing.assert_close(w.grad, torch.stack([(leaf * (k + 1.0)).sum() for k in range(3)]).detach())


@needs_lib
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["channel_scale", "spatial_scale"])
def test_scale_keeps_no_x_without_logits_grad(device, op):
    leaf = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    x = leaf * 2.0
    logits = torch.randn(2, 3, device=device) if op == "channel_scale" else torch.randn(2, 1, 4, 5, device=device)
    ref = weakref.ref(x)
    y = getattr(ops, op)(x, logits, backend=_backend(device))
    del x
    gc.collect()
    assert ref() is None
    y.sum().backward()
    s = torch.sigmoid(logits)
    expected = 2.0 * (s[:, :, None, None] if op == "channel_scale" else s).expand_as(leaf)
    torch.testing.assert_close(leaf.grad, expected)


# ------------------------------------------------------------------------------------------------ determinism

@needs_lib
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["mixed_sum", "channel_scale", "spatial_scale"])
def test_parameter_gradients_are_bitwise_deterministic(device, op):
    """Weight / logit gradients are reduced in a fixed order: identical across runs and thread counts."""
    gen = torch.Generator().manual_seed(1)
    args = _inputs(op, (8, 24, 33, 29), torch.float32, device, "contiguous", k=7, gen=gen)
    fn = lambda *a: getattr(ops, op)(*a, backend=_backend(device))  # noqa: E731
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (threads, 1, threads, max(2, threads)):
            torch.set_num_threads(t)
            _, g, ins = _fwd_bwd(fn, args, None if not results else results[0][0])
            results.append((g, ins[-1]))
    finally:
        torch.set_num_threads(threads)
    for _, param_grad in results[1:]:
        assert torch.equal(param_grad, results[0][1])


# ------------------------------------------------------------------------------------------------ fast paths

@needs_lib
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(3, 37, 9, 11), (2, 16, 32, 32), (1, 70, 1, 3), (2, 1, 45, 1)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "nwhc", "strided"])
def test_larger_odd_shapes_every_layout(device, op, shape, layout):
    """Shapes with full vectors and tails on both fast paths, and the two slow paths."""
    args = _inputs(op, shape, torch.float32, device, layout, gen=torch.Generator().manual_seed(2))
    _compare(op, args, device, torch.float32)


@needs_lib
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_larger_shapes_every_dtype(device, op, dtype, layout):
    args = _inputs(op, (2, 21, 13, 17), dtype, device, layout, gen=torch.Generator().manual_seed(3))
    _compare(op, args, device, dtype)


@needs_lib
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_output_layout_follows_input(device, op):
    """channels_last in, channels_last out (activations and their gradients)."""
    args = _inputs(op, (2, 19, 6, 5), torch.float32, device, "channels_last", gen=torch.Generator().manual_seed(4))
    outs, ins = _compare(op, args, device, torch.float32)
    cl = torch.channels_last
    for o in outs:
        if o.dim() == 4:
            assert o.is_contiguous(memory_format=cl)
    for g in ins:
        if g.dim() == 4:
            assert g.is_contiguous(memory_format=cl)


@needs_lib
@pytest.mark.parametrize("device", DEVICES)
def test_spatial_pool_result_is_channels_last_for_the_convolution(device):
    """spatial_pool hands the 7x7 conv of a spatial gate (max, mean) pairs per position: channels_last [N, 2, H, W],
    whatever x's layout; its backward takes the gradient in that layout (or any other)."""
    x = torch.randn(2, 7, 5, 6, device=device, requires_grad=True)
    out = ops.spatial_pool(x, backend=_backend(device))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, reference.spatial_pool(x))
    for g in (torch.randn(2, 2, 5, 6, device=device), torch.randn(2, 2, 5, 6, device=device).transpose(2, 3).mT):
        (gx,) = torch.autograd.grad(out, x, g, retain_graph=True)
        (gr,) = torch.autograd.grad(reference.spatial_pool(x), x, g)
        torch.testing.assert_close(gx, gr)


@needs_lib
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_max_ties_and_nan_on_every_path(device, layout):
    """First maximum wins on both layouts and for rows longer than a vector; NaN wins over everything."""
    backend = _backend(device)
    x = _layout(torch.zeros(2, 20, 9, 7, device=device), layout).requires_grad_()
    _, mx = ops.channel_pool(x, backend=backend)
    mx.sum().backward()
    expected = torch.zeros_like(x)
    expected[:, :, 0, 0] = 1
    assert torch.equal(x.grad, expected)
    x.grad = None
    ops.spatial_pool(x, backend=backend)[:, 0].sum().backward()
    expected = torch.zeros_like(x)
    expected[:, 0] = 1
    assert torch.equal(x.grad, expected)

    y = torch.randn(2, 20, 9, 7, device=device)
    y[0, 3, 5, 6] = float("nan")
    y[0, 3, 2, 2] = float("nan")
    y[1, 11, 4, 4] = 1e6
    y = _layout(y, layout).requires_grad_()
    avg, mx = ops.channel_pool(y, backend=backend)
    assert torch.isnan(mx[0, 3]) and torch.isnan(avg[0, 3]) and mx[1, 11] == 1e6
    mx.sum().backward()
    assert y.grad[0, 3, 2, 2] == 1 and y.grad[0, 3, 5, 6] == 0 and y.grad[1, 11, 4, 4] == 1
    sp = ops.spatial_pool(y, backend=backend)
    assert torch.isnan(sp[0, :, 5, 6]).all() and sp[1, 0, 4, 4] == 1e6


@needs_lib
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("special", ["nan", "inf", "both_infs", "ties"])
def test_pools_with_special_values(device, layout, special):
    """NaN / inf / ties anywhere (vector lanes, tails): values as the reference, gradient to the first maximum."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 37, 9, 11, generator=gen)
    flat = x.view(-1)
    idx = torch.randperm(flat.numel(), generator=gen)[:40]
    if special == "nan":
        flat[idx] = float("nan")
    elif special == "inf":
        flat[idx] = float("inf")
    elif special == "both_infs":
        flat[idx[:20]] = float("inf")
        flat[idx[20:]] = float("-inf")
    else:
        x = torch.randint(0, 3, x.shape, generator=gen).float()
    x = _layout(x.to(device), layout)
    backend = _backend(device)
    for pool, dim in (("channel_pool", (2, 3)), ("spatial_pool", (1,))):
        xg = x.detach().requires_grad_()
        out = getattr(ops, pool)(xg, backend=backend)
        ref = getattr(reference, pool)(x)
        for o, r in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
            torch.testing.assert_close(o, r, equal_nan=True)
        mx = out[1] if pool == "channel_pool" else out[:, :1]
        mx.sum().backward()
        # exactly one element per reduced group gets the max gradient: the first NaN, else the first maximum
        if pool == "channel_pool":
            rows = x.detach().reshape(*x.shape[:2], -1)
            hit = xg.grad.reshape(*x.shape[:2], -1) != 0
        else:
            rows = x.detach().permute(0, 2, 3, 1)
            hit = xg.grad.permute(0, 2, 3, 1) != 0
        # NaN beats every number: where a row holds a NaN, only NaNs are candidates
        has_nan = torch.isnan(rows).any(dim=-1, keepdim=True)
        m = torch.where(torch.isnan(rows), float("-inf"), rows).max(dim=-1, keepdim=True).values
        is_best = torch.where(has_nan, torch.isnan(rows), rows == m)
        first = torch.zeros_like(is_best)
        first.scatter_(-1, is_best.int().argmax(dim=-1, keepdim=True), True)
        assert torch.equal(hit, first), f"{pool}: max gradient not at the first maximum"


@needs_lib
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_expanded_upstream_gradient(device, op):
    """`.sum().backward()` hands the backward an expanded (stride-0) gradient."""
    args = _leaves(_inputs(op, (2, 9, 5, 6), torch.float32, device, "channels_last",
                           gen=torch.Generator().manual_seed(5)))
    out = getattr(ops, op)(*args, backend=_backend(device))
    sum(o.sum() for o in (out if isinstance(out, tuple) else (out,))).backward()
    ref_args = _leaves(tuple([t.detach() for t in a] if isinstance(a, list) else a.detach() for a in args))
    out = getattr(reference, op)(*ref_args)
    sum(o.sum() for o in (out if isinstance(out, tuple) else (out,))).backward()
    for a, b in zip(_flat(args), _flat(ref_args)):
        torch.testing.assert_close(a.grad, b.grad)


@needs_lib
@pytest.mark.parametrize("device", DEVICES)
def test_mixed_sum_many_inputs_and_generic_rank(device):
    """More inputs than one CUDA launch takes (16), and tensors of any rank."""
    gen = torch.Generator().manual_seed(6)
    args = ([torch.randn(3, 5, 7, generator=gen).to(device) for _ in range(19)], torch.randn(19, generator=gen).to(device))
    _compare("mixed_sum", args, device, torch.float32)
    args = ([torch.randn(1000, generator=gen).to(device) for _ in range(3)], torch.randn(3, generator=gen).to(device))
    _compare("mixed_sum", args, device, torch.float32)


@needs_lib
@pytest.mark.parametrize("device", DEVICES)
def test_mixed_sum_only_weight_grad(device):
    xs = [torch.randn(2, 3, 4, 5, device=device) for _ in range(3)]
    w = torch.randn(3, device=device, requires_grad=True)
    ops.mixed_sum(xs, w, backend=_backend(device)).sum().backward()
    torch.testing.assert_close(w.grad, torch.stack([x.sum() for x in xs]))


# ------------------------------------------------------------------------------------------------ compiler stack

@needs_lib
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_opcheck_other_layouts(device, op, layout):
    """The fake kernels reproduce the real strides for every layout (opcheck compares them)."""
    args = _leaves(_inputs(op, (2, 3, 4, 1), torch.float32, device, layout, k=2))
    torch.library.opcheck(_cpp.custom_ops[op], args)
    args = _leaves(_inputs(op, (3, 5, 1, 4), torch.float64, device, layout, k=2))
    torch.library.opcheck(_cpp.custom_ops[op], args)


@needs_lib
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_gradcheck_channels_last_fp64(device, op):
    args = _leaves(_inputs(op, (2, 4, 3, 2), torch.float64, device, "channels_last", k=2))
    fn = lambda *a: getattr(ops, op)(*a, backend=_backend(device))  # noqa: E731
    if op == "mixed_sum":
        xs, w = args
        assert torch.autograd.gradcheck(lambda w, *xs: fn(list(xs), w), (w, *xs))
    else:
        assert torch.autograd.gradcheck(fn, args)


@needs_lib
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_gate_matches_eager(device):
    """A whole CBAM channel gate (pool -> MLP -> scale) under torch.compile(fullgraph=True), forward and backward."""
    torch._dynamo.reset()
    backend = _backend(device)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 2), torch.nn.ReLU(), torch.nn.Linear(2, 16)).to(device)

    def gate(x):
        avg, mx = ops.channel_pool(x, backend=backend)
        return ops.channel_scale(x, mlp(avg) + mlp(mx), backend=backend)

    x = torch.randn(4, 16, 8, 8, device=device, requires_grad=True)
    y = torch.compile(gate, fullgraph=True)(x)
    y.square().sum().backward()
    gx = x.grad
    x.grad = None
    y_ref = gate(x)
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, x.grad)


@needs_lib
def test_bad_input_under_compile_names_the_problem():
    torch._dynamo.reset()
    fn = torch.compile(lambda x, l: ops.channel_scale(x, l, backend="cpu"), fullgraph=True)
    with pytest.raises(Exception, match="logits"):
        fn(torch.randn(2, 3, 4, 4), torch.randn(2, 4))


@needs_lib
def test_cuda_backend_refuses_cpu_tensors():
    with pytest.raises(ops.BackendUnavailable):
        ops.mixed_sum([torch.ones(2)], torch.ones(1), backend="cuda")


@needs_lib
@pytest.mark.skipif(not (torch.cuda.is_available() and _cpp.compiled_with_cuda()), reason="needs a GPU")
def test_mixed_devices_name_the_argument():
    with pytest.raises(ValueError, match=r"fastnas.mixed_sum: weights is on cpu, expected cuda"):
        ops.mixed_sum([torch.ones(2, device="cuda")], torch.ones(1), backend="cuda")
    with pytest.raises(ValueError, match=r"fastnas.channel_scale: logits is on cpu"):
        ops.channel_scale(torch.ones(1, 2, 3, 3, device="cuda"), torch.ones(1, 2), backend="cuda")
