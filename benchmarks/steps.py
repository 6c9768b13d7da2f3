"""Whole training steps for the benchmarks: a search step (first or second order) of the full supernet and a
retraining step of the evaluation network, per provider, plus their peak memory measured in a fresh process.

A search step is what ``Search.train_epoch`` runs per batch: ``Architect.step`` (first or second order) and then
``weight_step`` with the architecture frozen, with the search defaults of :class:`fastnas.config.SearchConfig`
(SGD 0.025/0.9/3e-4, gradient clip 5, α Adam 3e-4). A retraining step is ``Trainer.step``: forward with the
auxiliary head, CE + 0.4 · CE(aux), backward, clip 5, SGD, drop path 0.2.

Step providers (``STEP_PROVIDERS``): a fused-op backend, the memory plan on or off (``reference_darts``: every
activation stored, as DARTS does), partial channels, ``torch.compile`` of the whole model (``_compiled``) or region
by region as ``--compile`` does (``_regions``, search steps only), NHWC layout (``_cl``:
model and inputs channels_last, the layout fastnas's CLIs use on the CPU by default). Peak memory:
``python -m benchmarks.steps memory --kind search1 --provider cpu`` runs one provider alone in a fresh process and
prints a JSON line (:func:`measure_memory_subprocess` calls it). On the CPU it is the peak resident set size during
the measured steps (sampled every 0.5 ms by a thread; compiled providers run one warm-up step first, so compilation
is excluded) minus the resident set just before them; glibc's ``MALLOC_MMAP_THRESHOLD_`` is fixed at 64 KiB in that process so that every
tensor is its own mapping, returned to the system when freed, and the resident set follows the live tensors instead of
the allocator's caches. ``maxrss_mib`` (the process's ``ru_maxrss`` minus the resident set after building the model
and inputs, before the first step) is recorded too. On a GPU: ``torch.cuda.max_memory_allocated`` over the measured
steps, minus the memory allocated before them.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

STEP_KINDS = ("search1", "search2", "retrain")
SEARCH_BATCH = int(os.environ.get("FASTNAS_BENCH_STEP_BATCH", "32"))
RETRAIN_C = int(os.environ.get("FASTNAS_BENCH_RETRAIN_C", "36"))
RETRAIN_LAYERS = int(os.environ.get("FASTNAS_BENCH_RETRAIN_LAYERS", "20"))
MMAP_THRESHOLD = "65536"

# a DARTS_V2-like cell with attention edges (channel attention in the normal cell, spatial in the reduction cell), so
# that the retraining step runs the fused gates
RETRAIN_GENOTYPE = (
    "Genotype(normal=[('sep_conv_3x3', 0), ('channel_attention', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), "
    "('channel_attention', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)], "
    "normal_concat=[2, 3, 4, 5], "
    "reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('spatial_attention', 1), "
    "('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)], "
    "reduce_concat=[2, 3, 4, 5])"
)


@dataclass(frozen=True)
class StepProvider:
    backend: str  # fused-op backend: reference, cpu, cuda, triton
    memory_efficient: bool = True  # fastnas's memory plan (search only)
    partial_channels: int = 1  # PC-DARTS (search only)
    compiled: bool = False  # torch.compile(model)
    regions: bool = False  # the compiled-regions plan, what --compile does (search only)
    channels_last: bool = False  # model and inputs in NHWC (fastnas's default on the CPU)
    plan: str | None = None  # a plan by name (search only; None: the factory's choice)
    fused_optimizers: bool = True  # fastnas's fused SGD and Adam (False: PyTorch's defaults, as DARTS runs them)
    cuda_graphs: bool = False  # the whole step captured as a CUDA graph and replayed (--cuda-graphs)

    @property
    def device(self) -> str:
        if self.backend in ("cuda", "triton"):
            return "cuda"
        if self.backend == "cpu":
            return "cpu"
        return os.environ.get("FASTNAS_BENCH_REFERENCE_DEVICE", "cpu") if torch.cuda.is_available() else "cpu"


STEP_PROVIDERS = {
    "reference_darts": StepProvider("reference", memory_efficient=False, fused_optimizers=False),
    "reference": StepProvider("reference"),
    "cpu": StepProvider("cpu"),
    "cpu_pc4": StepProvider("cpu", partial_channels=4),
    "cuda": StepProvider("cuda"),
    "cuda_pc4": StepProvider("cuda", partial_channels=4),
    "triton": StepProvider("triton"),
    "reference_darts_compiled": StepProvider("reference", memory_efficient=False, compiled=True,
                                             fused_optimizers=False),
    "reference_compiled": StepProvider("reference", compiled=True),
    "cpu_compiled": StepProvider("cpu", compiled=True),
    "cpu_pc4_compiled": StepProvider("cpu", partial_channels=4, compiled=True),
    "cuda_compiled": StepProvider("cuda", compiled=True),
    "triton_compiled": StepProvider("triton", compiled=True),
    "reference_darts_cl": StepProvider("reference", memory_efficient=False, channels_last=True, fused_optimizers=False),
    "reference_cl": StepProvider("reference", channels_last=True),
    "reference_cl_batched": StepProvider("reference", channels_last=True, plan="batched"),
    "cpu_cl_batched": StepProvider("cpu", channels_last=True, plan="batched"),
    "cpu_cl_fused_norms": StepProvider("cpu", channels_last=True, plan="fused_norms"),
    "cuda_batched": StepProvider("cuda", plan="batched"),
    "cuda_graphs": StepProvider("cuda", cuda_graphs=True),
    "cuda_batched_graphs": StepProvider("cuda", plan="batched", cuda_graphs=True),
    "cpu_cl": StepProvider("cpu", channels_last=True),
    "cpu_pc4_cl": StepProvider("cpu", partial_channels=4, channels_last=True),
    "reference_cl_compiled": StepProvider("reference", compiled=True, channels_last=True),
    "cpu_cl_compiled": StepProvider("cpu", compiled=True, channels_last=True),
    "cpu_regions": StepProvider("cpu", regions=True),
    "cpu_cl_regions": StepProvider("cpu", regions=True, channels_last=True),
    "cpu_cl_batched_regions": StepProvider("cpu", regions=True, channels_last=True, plan="batched"),
    "reference_cl_regions": StepProvider("reference", regions=True, channels_last=True),
    "cuda_regions": StepProvider("cuda", regions=True),
    "triton_regions": StepProvider("triton", regions=True),
}


def skip_reason(provider: str) -> str | None:
    """Why ``provider`` cannot run here (None when it can)."""
    import fastnas.ops as ops

    p = STEP_PROVIDERS[provider]
    if p.device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    try:
        ops.resolve_backend(p.device, p.backend)
    except ops.BackendUnavailable as exc:
        return str(exc)
    return None


def build_step(kind: str, provider: str, seed: int = 0, primitives: str = "at-darts",
               batch: int = SEARCH_BATCH) -> Callable[[], None]:
    """A closure running one whole step of ``kind`` on ``provider`` (model, optimisers and a fixed batch of
    ``batch`` images built now; a search step over the space ``primitives``)."""
    import fastnas.ops as ops
    from fastnas.architect import Architect, weight_step
    from fastnas.config import SearchConfig
    from fastnas.cudagraph import GraphedStep

    p = STEP_PROVIDERS[provider]
    dev = torch.device(p.device)
    ops.resolve_backend(p.device, p.backend)  # load the backend before any tracing
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    criterion = nn.CrossEntropyLoss()
    if kind in ("search1", "search2"):
        from fastnas.nn.plans import Execution
        from fastnas.supernet import SuperNet

        cfg = SearchConfig()
        scope = "regions" if p.regions else "model" if p.compiled else None
        execution = Execution(dev.type, p.backend, p.channels_last, compile=scope)
        net = SuperNet(cfg.C, cfg.layers, 10, primitives, partial_channels=p.partial_channels,
                       memory_efficient=p.memory_efficient, plan=p.plan, execution=execution).to(dev)
        if p.channels_last:
            net = net.to(memory_format=torch.channels_last)
        forward = torch.compile(net) if p.compiled else net
        optimizer = torch.optim.SGD(net.weight_parameters(), cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay, fused=p.fused_optimizers or None)
        architect = Architect(net, criterion, cfg.arch_lr, cfg.arch_betas, cfg.arch_weight_decay,
                              1 if kind == "search1" else 2, cfg.momentum, cfg.weight_decay, forward=forward,
                              capturable=p.cuda_graphs)
        if not p.fused_optimizers:
            architect.optimizer = torch.optim.Adam(net.arch_parameters(), cfg.arch_lr, cfg.arch_betas,
                                                   weight_decay=cfg.arch_weight_decay)
        layout = torch.channels_last if p.channels_last else torch.contiguous_format
        x, xv = (torch.randn(batch, 3, 32, 32, generator=gen).to(dev, memory_format=layout) for _ in range(2))
        y, yv = (torch.randint(0, 10, (batch,), generator=gen).to(dev) for _ in range(2))

        def compute() -> None:
            with ops.backend(p.backend):
                architect.step(x, y, xv, yv, cfg.lr, optimizer)
                weight_step(net, forward, criterion, optimizer, x, y, cfg.grad_clip, net.arch_parameters())
        net.train()
        return _finished(GraphedStep(compute) if p.cuda_graphs else compute, dev)
    if kind == "retrain":
        from fastnas.evalnet import EvalNet

        if p.regions:
            raise ValueError(f"{provider}: regional compilation is for search steps; use a _compiled provider")

        net = EvalNet(RETRAIN_GENOTYPE, RETRAIN_C, RETRAIN_LAYERS, 10, auxiliary=True, drop_path_prob=0.2).to(dev)
        layout = torch.channels_last if p.channels_last else torch.contiguous_format
        net = net.to(memory_format=layout)
        net.train()
        forward = torch.compile(net) if p.compiled else net
        optimizer = torch.optim.SGD(net.parameters(), 0.025, momentum=0.9, weight_decay=3e-4, fused=True)
        x = torch.randn(batch, 3, 32, 32, generator=gen).to(dev, memory_format=layout)
        y = torch.randint(0, 10, (batch,), generator=gen).to(dev)

        def compute() -> None:
            with ops.backend(p.backend):
                optimizer.zero_grad(set_to_none=True)
                logits, aux = forward(x)
                loss = criterion(logits, y) + 0.4 * criterion(aux, y)
                loss.backward()
                nn.utils.clip_grad_norm_(net.parameters(), 5.0, foreach=True)
                optimizer.step()
        return _finished(GraphedStep(compute) if p.cuda_graphs else compute, dev)
    raise ValueError(f"unknown step kind {kind!r}; choose one of {', '.join(STEP_KINDS)}")


def _finished(compute: Callable[[], None], dev: torch.device) -> Callable[[], None]:
    """``compute`` and, on a GPU, the wait for it to finish (what a timing must include)."""
    def step() -> None:
        compute()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    return step


# -- peak memory ------------------------------------------------------------------------------------------------------
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class RssSampler:
    """Highest resident set size seen by a thread polling /proc/self/statm every ``interval`` seconds."""

    def __init__(self, interval: float = 5e-4) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> "RssSampler":
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def measure_memory(kind: str, provider: str, steps: int = 1, **step_options) -> dict:
    """Peak memory of ``steps`` steps, in this process (run it in a fresh one). Eager CPU providers measure their
    first steps (nothing is cached between steps but the optimiser states, created in the first); compiled ones and
    GPU ones run one warm-up step first."""
    mib = 2.0 ** 20
    base_build = rss_bytes()  # imports done; the model is not built yet
    step = build_step(kind, provider, **step_options)
    after_build = rss_bytes()
    dev = STEP_PROVIDERS[provider].device
    compiled = STEP_PROVIDERS[provider].compiled or STEP_PROVIDERS[provider].regions
    out = {"kind": kind, "provider": provider, "device": dev, "model_mib": (after_build - base_build) / mib}
    if compiled or dev == "cuda":  # warm-up (and compilation) outside the measurement
        t0 = time.perf_counter()
        step()
        out["first_step_s"] = time.perf_counter() - t0
    if dev == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            step()
        out.update(peak_mib=(torch.cuda.max_memory_allocated() - before) / mib, method="cuda max_memory_allocated")
    else:
        before = rss_bytes()
        with RssSampler() as sampler:
            for _ in range(steps):
                step()
        out.update(peak_mib=(sampler.peak - before) / mib, method="sampled RSS, MALLOC_MMAP_THRESHOLD_=64KiB")
    out["maxrss_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - after_build) / mib
    return out


def measure_memory_subprocess(kind: str, provider: str, timeout: float = 900) -> dict:
    """:func:`measure_memory` in a fresh Python process (same threads), so that providers do not share a heap."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "benchmarks.steps", "memory", "--kind", kind, "--provider", provider,
           "--threads", str(torch.get_num_threads())]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=root)
    if res.returncode != 0:
        raise RuntimeError(f"memory measurement of {kind}/{provider} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def interleaved_times(steps: dict[str, Callable[[], None]], rounds: int) -> dict[str, list[float]]:
    """Time each step ``rounds`` times, the providers taking turns round by round (a busy machine slows all alike)."""
    times = {p: [] for p in steps}
    for _ in range(rounds):
        for p, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[p].append(time.perf_counter() - t0)
    return times


def measure_time(kind: str, provider: str, steps: int = 5, **step_options) -> dict:
    """Wall time of ``steps`` steps after two warm-up steps, in this process (compare providers in fresh processes,
    alternating: ``for i in 1 2 3; do for p in A B; do python -m benchmarks.steps time --provider $p; done; done``)."""
    step = build_step(kind, provider, **step_options)
    step(), step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"kind": kind, "provider": provider, **step_options, "median_s": statistics.median(times),
            "min_s": min(times)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("memory", help="peak memory of one provider's step (run alone in this process)")
    t = sub.add_parser("time", help="wall time of one provider's step in this process (median of --steps)")
    for p in (m, t):
        p.add_argument("--kind", choices=STEP_KINDS, required=True)
        p.add_argument("--provider", choices=list(STEP_PROVIDERS), required=True)
        p.add_argument("--threads", type=int, default=int(os.environ.get("FASTNAS_BENCH_THREADS", "2")))
        p.add_argument("--primitives", default="at-darts", help="the search space (search steps)")
        p.add_argument("--batch", type=int, default=SEARCH_BATCH)
    m.add_argument("--steps", type=int, default=1)
    t.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    measure = measure_memory if args.cmd == "memory" else measure_time
    print(json.dumps(measure(args.kind, args.provider, args.steps, primitives=args.primitives, batch=args.batch)))
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
