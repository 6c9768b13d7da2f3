"""Regional compilation of the full search supernet (first-order step, ``cpu`` backend, channels_last).

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python -m benchmarks.regional_compile regional   # cold, then run it again: warm
    python -m benchmarks.regional_compile eager                                           # the same step, eager
    python -m benchmarks.regional_compile compare [--rounds 10]           # both in one process, interleaved

``regional`` is what ``--compile`` does (the compiled-regions plan, :class:`fastnas.nn.plans.RegionsPlan`: the candidates with parameters
of each edge as one region, and both preprocessing ops of every cell). Prints the first step (compilation
included), three more steps, and Inductor's FX-graph cache counters.
``python -m benchmarks.compile_time --provider cpu_cl_regions`` measures the ``regional`` case in fresh processes,
cold and warm.
"""
from __future__ import annotations

import argparse
import os


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["regional", "eager", "compare"])
    parser.add_argument("--rounds", type=int, default=10, help="compare: interleaved rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    os.environ["FASTNAS_BENCH_STEP_BATCH"] = str(args.batch)  # read when benchmarks.steps is imported

    import torch

    from benchmarks.compile_time import median, step_seconds
    from benchmarks.steps import build_step

    torch.set_num_threads(args.threads)
    modes = {"eager": "cpu_cl", "regional": "cpu_cl_regions"}  # mode: step provider
    if args.mode == "compare":  # side by side, round by round, after two warm-up steps each
        from benchmarks.steps import interleaved_times

        steps = {mode: build_step("search1", provider) for mode, provider in modes.items()}
        for step in steps.values():
            step()
            step()
        for mode, times in interleaved_times(steps, args.rounds).items():
            print(f"{mode}: min {min(times):.3f} s, median {median(times):.3f} s", flush=True)
        return 0
    step = build_step("search1", modes[args.mode])
    print(f"first step (compilation included): {step_seconds(step, 1)[0]:.1f} s", flush=True)
    print("next steps: " + ", ".join(f"{t:.2f} s" for t in step_seconds(step, 3)), flush=True)
    from torch._dynamo.utils import counters

    print("inductor:", {k: v for k, v in counters["inductor"].items() if "fxgraph" in k},
          "dynamo:", dict(counters["stats"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
