"""Whole steps, every provider side by side: a first- and a second-order search step of the full supernet (at-darts,
C=16, 8 cells, batch 32 of 32x32, fp32) and a retraining step of the evaluation network (C=36, 20 cells, auxiliary
head, drop path; a genotype with channel and spatial attention edges), see :mod:`benchmarks.steps`.

Each test builds every available provider in this process and times them interleaved, round by round (so a busy
machine slows them alike); ``extra_info["providers"]`` holds min and median seconds per provider, and the peak memory
of each provider measured alone in a fresh process (:func:`benchmarks.steps.measure_memory_subprocess`). Ratios are
taken within one test, never across runs. The timed pytest-benchmark rounds are those of the first fused provider.

Providers by default: search1 reference_darts, reference, cpu, cpu_pc4 (+ cuda, cuda_pc4, triton on a GPU); search2
and retrain: reference, cpu (+ cuda, triton). ``FASTNAS_BENCH_STEP_COMPILE=1`` adds the torch.compile providers,
whole-model (``_compiled``) and region by region as ``--compile`` does (``_regions``); compilation takes minutes on
a small CPU, so they are opt-in; ``FASTNAS_BENCH_FULL=1`` runs
every provider of every kind. ``FASTNAS_BENCH_STEP_ROUNDS`` sets the timed rounds (default 3; 2 for search2),
``FASTNAS_BENCH_STEP_MEMORY=0`` skips the memory subprocesses.
"""
from __future__ import annotations

import os

import pytest
import torch

from benchmarks.steps import (RETRAIN_C, RETRAIN_LAYERS, SEARCH_BATCH, STEP_PROVIDERS, build_step,
                              interleaved_times, measure_memory_subprocess, skip_reason)

FULL = os.environ.get("FASTNAS_BENCH_FULL", "0") == "1"
COMPILE = FULL or os.environ.get("FASTNAS_BENCH_STEP_COMPILE", "0") == "1"
MEMORY = os.environ.get("FASTNAS_BENCH_STEP_MEMORY", "1") == "1"
ONLY = [p for p in os.environ.get("FASTNAS_BENCH_STEP_PROVIDERS", "").split(",") if p]

DEFAULT = {
    "search1": ["reference_darts", "reference", "cpu", "cpu_pc4", "cuda", "cuda_pc4", "triton",
                "reference_darts_cl", "reference_cl", "cpu_cl", "cpu_pc4_cl"],
    "search2": ["reference", "cpu", "cuda", "triton"],
    "retrain": ["reference", "cpu", "cuda", "triton", "reference_cl", "cpu_cl"],
}
COMPILED = {
    "search1": ["reference_darts_compiled", "reference_compiled", "cpu_compiled", "cpu_pc4_compiled",
                "cuda_compiled", "triton_compiled", "cpu_cl_regions", "reference_cl_regions", "cuda_regions",
                "triton_regions"],
    "search2": ["reference_compiled", "cpu_compiled", "cuda_compiled", "triton_compiled", "cpu_cl_regions"],
    "retrain": ["reference_compiled", "cpu_compiled", "cuda_compiled", "triton_compiled"],
}
DESCRIPTION = {
    "search1": f"first-order search step, supernet at-darts C=16 8 cells, batch {SEARCH_BATCH} 32x32 fp32",
    "search2": f"second-order search step, supernet at-darts C=16 8 cells, batch {SEARCH_BATCH} 32x32 fp32",
    "retrain": f"retraining step, EvalNet C={RETRAIN_C} {RETRAIN_LAYERS} cells + auxiliary, batch {SEARCH_BATCH}",
}


def _belongs(provider: str, kind: str) -> bool:
    """Whether ``provider`` means something for ``kind``: the memory, channel-sampling, plan and regional-compilation
    variants are the search step's."""
    return kind == "search1" or ("darts" not in provider and "pc4" not in provider and not (
        kind == "retrain" and (provider.endswith("_regions") or "batched" in provider)))


def providers_for(kind: str) -> list[str]:
    if ONLY:  # FASTNAS_BENCH_STEP_PROVIDERS: those of them that belong to this kind
        names = [p for p in ONLY if p in STEP_PROVIDERS and _belongs(p, kind)]
    elif FULL:
        names = [p for p in STEP_PROVIDERS if _belongs(p, kind)]
    else:
        names = DEFAULT[kind] + (COMPILED[kind] if COMPILE else [])
    return [p for p in names if skip_reason(p) is None]


@pytest.mark.parametrize("kind", ["search1", "search2", "retrain"])
def test_step(benchmark, kind, capsys):
    providers = providers_for(kind)
    if not providers:
        pytest.skip("no provider available")
    rounds = int(os.environ.get("FASTNAS_BENCH_STEP_ROUNDS", "2" if kind == "search2" else "3"))
    if benchmark.disabled:  # smoke run: one step each, no memory subprocess
        rounds = 1
    steps = {p: build_step(kind, p) for p in providers}
    for step in steps.values():  # warm-up and compilation, outside the timing
        step()
    times = interleaved_times(steps, rounds)
    stats = {p: {"min_s": min(v), "median_s": sorted(v)[len(v) // 2], "rounds": len(v),
                 "device": STEP_PROVIDERS[p].device} for p, v in times.items()}
    timed = next((p for p in providers if not p.startswith("reference")), providers[0])
    step = steps.pop(timed)
    del steps
    if MEMORY and not benchmark.disabled:
        for p in providers:
            mem = measure_memory_subprocess(kind, p)
            stats[p].update(peak_mib=mem["peak_mib"], maxrss_mib=mem.get("maxrss_mib"),
                            memory_method=mem["method"])
    info = {"kind": kind, "description": DESCRIPTION[kind], "batch": SEARCH_BATCH,
            "threads": torch.get_num_threads(), "providers": stats}
    for base in ("reference_darts", "reference", "reference_compiled"):
        if base in stats:
            info[f"time_vs_{base}"] = {p: s["median_s"] / stats[base]["median_s"] for p, s in stats.items()}
            if "peak_mib" in stats[base]:
                info[f"memory_vs_{base}"] = {p: s["peak_mib"] / stats[base]["peak_mib"] for p, s in stats.items()
                                             if "peak_mib" in s}
    benchmark.group = f"step-{kind}"
    benchmark.extra_info.update(info, provider=timed, op=kind, mode="step", dtype="fp32",
                                device=STEP_PROVIDERS[timed].device)
    benchmark.pedantic(step, rounds=1 if benchmark.disabled else 2, iterations=1)
    with capsys.disabled():
        print(f"\n[step] {DESCRIPTION[kind]}, {torch.get_num_threads()} threads")
        for p, s in stats.items():
            mem = f"  peak {s['peak_mib']:.0f} MiB" if "peak_mib" in s else ""
            rel = "".join(f"  {v[p]:.2f}x {k}" for k, v in info.items() if k.startswith(("time_vs", "memory_vs")))
            print(f"[step]   {p:26s} {s['min_s']:.2f}/{s['median_s']:.2f} s (min/median){mem}{rel}")
