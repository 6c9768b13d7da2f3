"""Compile time of a whole search step under ``torch.compile`` (opt-in: minutes on a small CPU).

    python -m benchmarks.compile_time [--provider cpu_cl_regions] [--kind search1] [--steps 3] [--json out.json]

Runs two fresh processes in turn, both with the same new, empty ``TORCHINDUCTOR_CACHE_DIR`` (and Triton cache):
*cold* (empty caches: Dynamo tracing, AOT autograd, Inductor code generation and the C++ compiler) and then *warm*
(the Inductor FX graph cache and the compiled kernels from the cold run; Dynamo still traces). Each process times
the first step (compilation + one step), then ``--steps`` more compiled steps, and the same step eager on the same
backend (``cpu_compiled`` and ``cpu_regions`` are compared with ``cpu``). Compile time = first step - median compiled
step.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def step_seconds(step, n: int) -> list[float]:
    """Wall-clock seconds of ``n`` calls of ``step``."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _child(kind: str, provider: str, steps: int) -> dict:
    import torch

    from benchmarks.steps import build_step

    eager = provider.removesuffix("_compiled").removesuffix("_regions")
    out = {"kind": kind, "provider": provider, "eager_provider": eager, "threads": torch.get_num_threads()}
    step = build_step(kind, provider)
    out["first_step_s"] = step_seconds(step, 1)[0]
    out["compiled_step_s"] = median(step_seconds(step, steps))
    del step
    step = build_step(kind, eager)
    step()
    out["eager_step_s"] = median(step_seconds(step, steps))
    out["compile_s"] = out["first_step_s"] - out["compiled_step_s"]
    try:
        from torch._dynamo.utils import counters

        out["fxgraph_cache"] = {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")}
    except Exception:  # noqa: BLE001 - counters are private and change between versions
        pass
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", default="search1", choices=["search1", "search2", "retrain"])
    parser.add_argument("--provider", default="cpu_cl_regions")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("FASTNAS_BENCH_THREADS", "2")))
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(_child(args.kind, args.provider, args.steps)))
        return 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = {}
    with tempfile.TemporaryDirectory(prefix="fastnas-compile-") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"),
                   TRITON_CACHE_DIR=os.path.join(cache, "triton"), OMP_NUM_THREADS=str(args.threads))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        for phase in ("cold", "warm"):
            cmd = [sys.executable, "-m", "benchmarks.compile_time", "--child", "--kind", args.kind, "--provider",
                   args.provider, "--steps", str(args.steps), "--threads", str(args.threads)]
            t0 = time.perf_counter()
            res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
            if res.returncode != 0:
                print(res.stderr[-4000:], file=sys.stderr)
                return 1
            results[phase] = json.loads(res.stdout.strip().splitlines()[-1])
            results[phase]["process_s"] = time.perf_counter() - t0
            r = results[phase]
            print(f"{phase}: first step {r['first_step_s']:.1f} s (compile {r['compile_s']:.1f} s), compiled step "
                  f"{r['compiled_step_s']:.2f} s, eager {r['eager_provider']} step {r['eager_step_s']:.2f} s "
                  f"({r['compiled_step_s'] / r['eager_step_s']:.2f}x), process {r['process_s']:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
