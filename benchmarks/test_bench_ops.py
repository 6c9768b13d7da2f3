"""Fused ops and attention gates: every provider side by side (pytest-benchmark).

Providers: ``reference`` (unfused eager PyTorch), ``reference_compiled`` (torch.compile of it), ``cpu`` /
``cpu_compiled`` (the C++ backend, eager and inside torch.compile), ``cuda`` and ``triton`` (CUDA tensors only; skipped
without a GPU). Cases: the five ops and the two whole attention gates, ``fastnas.nn.ChannelAttention`` (pool -> shared
MLP C -> C/16 -> C -> add -> scale) and ``fastnas.nn.SpatialAttention`` (pool -> 7x7 conv 2 -> 1 + batch norm ->
scale) with the provider's backend selected (on ``reference``, PyTorch's layers and the reference ops), forward and
forward+backward, at the three DARTS
search-stage shapes (batch 64: C=16 @ 32x32, 32 @ 16x16, 64 @ 8x8; K = 7 inputs for mixed_sum), fp32 and bf16.

By default the torch.compile providers run at the stage-1 shape in fp32 only and bf16 runs at the stage-1 shape
(each compilation costs seconds on a small machine); ``FASTNAS_BENCH_FULL=1`` runs the whole matrix.
``benchmark.extra_info`` records provider, op, mode, shape, dtype, device and the bytes a fused implementation must
move (for a roofline). Compare providers within one group: ``pytest benchmarks/ --benchmark-group-by=group``.
"""
from __future__ import annotations

import os
import time

import pytest
import torch

import fastnas.ops as ops
from fastnas.nn import ChannelAttention, SpatialAttention
from fastnas.ops import reference  # noqa: F401

from benchmarks import allocator
from benchmarks.roofline import bytes_moved, copy_time

FULL = os.environ.get("FASTNAS_BENCH_FULL", "0") == "1"
K = 7
SHAPES = {"s1": (64, 16, 32, 32), "s2": (64, 32, 16, 16), "s3": (64, 64, 8, 8)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OPS = ("mixed_sum", "channel_pool", "channel_scale", "spatial_pool", "spatial_scale", "channel_gate", "spatial_gate")
MODES = ("fwd", "fwdbwd")
PROVIDERS = ("reference", "reference_compiled", "cpu", "cpu_compiled", "cuda", "triton")
HAS_CUDA = torch.cuda.is_available()


def _device(provider: str) -> str:
    if provider in ("cuda", "triton"):
        return "cuda"
    if provider in ("cpu", "cpu_compiled"):
        return "cpu"
    return "cuda" if HAS_CUDA and os.environ.get("FASTNAS_BENCH_REFERENCE_DEVICE", "cpu") == "cuda" else "cpu"


def _backend(provider: str) -> str:
    return provider.removesuffix("_compiled")


def _skip_reason(provider: str, shape_id: str, dtype_id: str) -> str | None:
    dev = _device(provider)
    if dev == "cuda" and not HAS_CUDA:
        return "no CUDA device"
    try:
        ops.resolve_backend(dev, _backend(provider))
    except ops.BackendUnavailable as exc:
        return str(exc)
    if not FULL and (shape_id != "s1" and (provider.endswith("_compiled") or dtype_id == "bf16")):
        return "reduced matrix (set FASTNAS_BENCH_FULL=1)"
    if not FULL and provider.endswith("_compiled") and dtype_id == "bf16":
        return "reduced matrix (set FASTNAS_BENCH_FULL=1)"
    return None


def _bytes_moved(op: str, mode: str, shape, dtype: torch.dtype) -> int:
    """Bytes a fused implementation must read and write (activation-sized tensors only): see benchmarks.roofline."""
    return bytes_moved(op, mode, shape, dtype, K)


def _make_case(op: str, provider: str, shape, dtype: torch.dtype, layout: str = "nchw"):
    """(function to time, leaves that receive gradients, upstream grads) for one case; ``layout`` "cl" makes the 4-D
    inputs channels_last (the layout fastnas's CLIs use on the CPU)."""
    dev = _device(provider)
    backend = _backend(provider)
    ops.resolve_backend(dev, backend)  # loads the backend module now, outside any compiled region
    n, c, h, w = shape
    gen = torch.Generator().manual_seed(0)

    def rand(*s):
        t = torch.randn(*s, generator=gen).to(device=dev, dtype=dtype)
        if layout == "cl" and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t.requires_grad_()

    if op == "mixed_sum":
        xs = [rand(*shape) for _ in range(K)]
        weights = torch.softmax(torch.randn(K, generator=gen), 0).to(dev).requires_grad_()  # fp32, as under AMP
        fn = lambda: ops.mixed_sum(xs, weights, backend=backend)  # noqa: E731
        leaves = [*xs, weights]
    elif op in ("channel_pool", "spatial_pool"):
        x = rand(*shape)
        fn = lambda: getattr(ops, op)(x, backend=backend)  # noqa: E731
        leaves = [x]
    elif op == "channel_scale":
        x, logits = rand(*shape), rand(n, c)
        fn = lambda: ops.channel_scale(x, logits, backend=backend)  # noqa: E731
        leaves = [x, logits]
    elif op == "spatial_scale":
        x, logits = rand(*shape), rand(n, 1, h, w)
        fn = lambda: ops.spatial_scale(x, logits, backend=backend)  # noqa: E731
        leaves = [x, logits]
    else:  # the library's gate modules, which run on the selected backend
        module = ChannelAttention(c) if op == "channel_gate" else SpatialAttention()
        module = module.to(device=dev, dtype=dtype)
        x = rand(*shape)
        fn = lambda: module(x)  # noqa: E731
        leaves = [x, *module.parameters()]
    if provider.endswith("_compiled"):
        torch._dynamo.reset()
        fn = torch.compile(fn, fullgraph=True)
    return _on_backend(fn, backend), leaves


def _on_backend(fn, backend: str):
    """fn with ``backend`` selected while it runs (outside any compiled region, so its graph sees one backend)."""
    def run():
        with ops.backend(backend):
            return fn()
    return run


def _timed(fn, mode: str, leaves, dev: str):
    grads = None

    def fwd():
        with torch.no_grad():
            fn()
        if dev == "cuda":
            torch.cuda.synchronize()

    def fwdbwd():
        nonlocal grads
        out = fn()
        outs = list(out) if isinstance(out, tuple) else [out]
        if grads is None:
            grads = [torch.randn_like(o) for o in outs]
        torch.autograd.backward(outs, grads)
        for t in leaves:
            t.grad = None
        if dev == "cuda":
            torch.cuda.synchronize()

    return fwd if mode == "fwd" else fwdbwd


@pytest.mark.parametrize("dtype_id", list(DTYPES))
@pytest.mark.parametrize("shape_id", list(SHAPES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_bench(benchmark, provider, op, mode, shape_id, dtype_id):
    why = _skip_reason(provider, shape_id, dtype_id)
    if why:
        pytest.skip(why)
    shape, dtype, dev = SHAPES[shape_id], DTYPES[dtype_id], _device(provider)
    fn, leaves = _make_case(op, provider, shape, dtype)
    run = _timed(fn, mode, leaves, dev)
    for _ in range(3):  # compile (for the compiled providers) and warm up, outside the timing
        run()
    t0 = time.perf_counter()
    run()
    once = time.perf_counter() - t0
    rounds = int(max(5, min(60, 0.4 / max(once, 1e-6))))
    benchmark.group = f"{op}-{mode}-{shape_id}-{dtype_id}"
    benchmark.extra_info.update(
        provider=provider, op=op, mode=mode, shape=list(shape), dtype=dtype_id, device=dev,
        threads=torch.get_num_threads(), bytes=_bytes_moved(op, mode, shape, dtype),
        k=K if op == "mixed_sum" else None,
        floor_s=copy_time(_bytes_moved(op, mode, shape, dtype), dev),  # a copy moving the same bytes
    )
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)


WARM_BLOCK = 10  # calls per block in the warm side-by-side measurement
TARGETS = {  # issue's speed targets at the stage-1 shape (fp32, forward+backward): (min speedup vs eager reference)
    "mixed_sum": 3.0,
    "channel_gate": 2.0,
    "spatial_gate": 2.0,
}


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("op", list(TARGETS))
def test_speed_targets_side_by_side(benchmark, op, layout, capsys):
    """The speed targets, measured side by side in two regimes: cold, the providers interleaved call by call (each
    starts after the others evicted its tensors from the caches); warm, blocks of consecutive calls interleaved (the
    op's tensors are cache-resident, as when it runs repeatedly; the stage-1 tensors are 4 MiB, the L3 cache here 32
    MiB). Both interleave, so a busy machine slows the providers alike. extra_info records min and median of each and
    the speedups of `cpu` over the eager reference and over torch.compile of it. A benchmark: nothing is asserted."""
    providers = [p for p in ("reference", "reference_compiled", "cpu") if _skip_reason(p, "s1", "fp32") is None]
    if "cpu" not in providers:
        pytest.skip("the cpu backend is unavailable")
    shape, rounds = SHAPES["s1"], int(os.environ.get("FASTNAS_BENCH_TARGET_ROUNDS", "40"))
    runs = {}
    for p in providers:
        fn, leaves = _make_case(op, p, shape, torch.float32, layout)
        runs[p] = _timed(fn, "fwdbwd", leaves, "cpu")
        for _ in range(3):
            runs[p]()
    times = {p: [] for p in providers}
    for _ in range(rounds):
        for p in providers:
            t0 = time.perf_counter()
            runs[p]()
            times[p].append(time.perf_counter() - t0)
    # warm: blocks of consecutive calls of one provider, blocks interleaved; the first call of a block is not counted,
    # so the provider's tensors are in the caches as when an op runs repeatedly (single calls above: each provider
    # starts after the others have evicted its data)
    warm = {p: [] for p in providers}
    for _ in range(int(os.environ.get("FASTNAS_BENCH_TARGET_BLOCKS", "15"))):
        for p in providers:
            runs[p]()
            for _ in range(WARM_BLOCK):
                t0 = time.perf_counter()
                runs[p]()
                warm[p].append(time.perf_counter() - t0)

    def summary(samples: dict) -> dict:
        return {p: {"min_ms": min(v) * 1e3, "median_ms": sorted(v)[len(v) // 2] * 1e3} for p, v in samples.items()}

    stats, warm_stats = summary(times), summary(warm)
    info = {"op": op, "mode": "fwdbwd", "shape": list(shape), "dtype": "fp32", "layout": layout,
            "threads": torch.get_num_threads(),
            "malloc": allocator.regime,
            "target_speedup_vs_reference": TARGETS[op], "providers": stats, "providers_warm": warm_stats}
    for p in ("reference", "reference_compiled"):
        if p in stats:
            info[f"speedup_vs_{p}_min"] = stats[p]["min_ms"] / stats["cpu"]["min_ms"]
            info[f"speedup_vs_{p}_median"] = stats[p]["median_ms"] / stats["cpu"]["median_ms"]
            info[f"speedup_vs_{p}_warm_median"] = warm_stats[p]["median_ms"] / warm_stats["cpu"]["median_ms"]
    benchmark.group = f"targets-{op}-{layout}"
    benchmark.extra_info.update(info, provider="cpu", bytes=_bytes_moved(op, "fwdbwd", shape, torch.float32))
    benchmark.pedantic(runs["cpu"], rounds=5, iterations=1, warmup_rounds=1)
    with capsys.disabled():
        line = "  ".join(f"{p} {s['min_ms']:.2f}/{s['median_ms']:.2f} ms" for p, s in stats.items())
        ratios = "  ".join(f"{k.removeprefix('speedup_vs_')} {v:.2f}x" for k, v in info.items() if k.startswith("speedup"))
        warm_line = "  ".join(f"{p} {s['min_ms']:.2f}/{s['median_ms']:.2f} ms" for p, s in warm_stats.items())
        case = f"{op} {layout}"
        print(f"\n[targets] {case} fwd+bwd s1 fp32, {torch.get_num_threads()} threads, malloc {allocator.regime} "
              f"(min/median): {line}\n"
              f"[targets] {case} warm (blocks of {WARM_BLOCK}, min/median): {warm_line}\n"
              f"[targets] {case} speedup of cpu: {ratios} (target >= {TARGETS[op]}x vs reference, >= 1x vs compiled)")
