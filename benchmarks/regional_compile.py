"""Experiment: regional compilation of the full search supernet (first-order step, ``cpu`` backend, channels_last).

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python -m benchmarks.regional_compile regional   # cold, then run it again: warm
    python -m benchmarks.regional_compile edges                                           # one region per edge
    python -m benchmarks.regional_compile eager                                           # the same step, eager
    python -m benchmarks.regional_compile compare [--rounds 10]             # all three in one process, interleaved

``regional`` is what ``--compile`` does (:func:`fastnas.compilation.compile_regions`: every candidate op with
parameters, after the ReLU the cell shares, and both preprocessing ops of every cell as its own region; about 40
graphs for the full supernet). ``edges`` compiles one region per edge instead (all its candidates with parameters,
and skip), an alternative that was measured and not taken. Prints the first step (compilation included), three more
steps, and Inductor's FX-graph cache counters. ``python -m benchmarks.compile_time --provider cpu_cl_regions`` measures
the ``regional`` case in fresh processes, cold and warm.
"""
from __future__ import annotations

import argparse
import os


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["regional", "edges", "eager", "compare"])
    parser.add_argument("--rounds", type=int, default=10, help="compare: interleaved rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    os.environ["FASTNAS_BENCH_STEP_BATCH"] = str(args.batch)  # read when benchmarks.steps is imported

    import torch
    import torch._dynamo

    from benchmarks.compile_time import step_seconds
    from benchmarks.steps import build_step

    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # one code object (Module._call_impl) serves every region
    torch._dynamo.config.accumulated_recompile_limit = 4096
    if args.mode == "compare":  # the three side by side, round by round, after two warm-up steps each
        from benchmarks.steps import interleaved_times

        steps = {mode: build_step("search1", "cpu_cl", prepare=prepare)
                 for mode, prepare in (("eager", None), ("regional", _compile_regions), ("edges", _compile_edges))}
        for step in steps.values():
            step()
            step()
        for mode, times in interleaved_times(steps, args.rounds).items():
            print(f"{mode}: min {min(times):.3f} s, median {sorted(times)[len(times) // 2]:.3f} s", flush=True)
        return 0
    prepare = {"regional": _compile_regions, "edges": _compile_edges, "eager": None}[args.mode]
    step = build_step("search1", "cpu_cl", prepare=prepare)
    print(f"first step (compilation included): {step_seconds(step, 1)[0]:.1f} s", flush=True)
    print("next steps: " + ", ".join(f"{t:.2f} s" for t in step_seconds(step, 3)), flush=True)
    from torch._dynamo.utils import counters

    print("inductor:", {k: v for k, v in counters["inductor"].items() if "fxgraph" in k},
          "dynamo:", dict(counters["stats"]))
    return 0


def _compile_regions(net) -> None:
    """What ``--compile`` does: :func:`fastnas.compilation.compile_regions`."""
    from fastnas.compilation import compile_regions

    print(f"compiled regions: {compile_regions(net, 'cpu')}", flush=True)


def _compile_edges(net) -> None:
    """One region per edge: all candidates of the edge that have parameters (and skip), in one compiled module."""
    import types

    import torch
    from torch import nn

    from fastnas import ops
    from fastnas.compilation import inductor_options
    from fastnas.nn.recompute import recompute

    class EdgeRegion(nn.Module):
        def __init__(self, kept):
            super().__init__()
            self.kept = nn.ModuleList(kept)

        def forward(self, h):
            return tuple(op(h) for op in self.kept)

    def node(self, states, offset, node_weights, relus):
        kept, kept_w, free = [], [], []
        for j, h in enumerate(states):
            outs = iter(self.edge_regions[offset + j](h))
            for c, _ in enumerate(self.edges[offset + j]):
                if self.parameter_free[offset + j][c]:
                    free.append((j, c))
                else:
                    kept.append(next(outs))
                    kept_w.append(node_weights[j, c])
        edges = self.edges[offset:offset + len(states)]
        backend = ops.get_backend()

        def free_share(free_w, *hs):
            return ops.mixed_sum([edges[j][c](hs[j]) for j, c in free], free_w, backend=backend)

        share = recompute(free_share, torch.stack([node_weights[j, c] for j, c in free]), *states)
        weights = torch.stack(kept_w + [torch.ones((), dtype=node_weights.dtype)])
        return ops.mixed_sum(kept + [share], weights)

    for cell in net.cells:
        regions = []
        for e, edge in enumerate(cell.edges):
            region = EdgeRegion([op for c, op in enumerate(edge) if not cell.parameter_free[e][c]])
            region.compile(dynamic=False, options=inductor_options("cpu"))
            regions.append(region)
        object.__setattr__(cell, "edge_regions", regions)  # not submodules: the parameters stay the cell's
        cell._node_recomputing_parameter_free = types.MethodType(node, cell)
        cell.preprocess0.compile(dynamic=False, options=inductor_options("cpu"))
        cell.preprocess1.compile(dynamic=False, options=inductor_options("cpu"))
    print(f"compiled regions: {sum(len(c.edges) for c in net.cells)} edges + {2 * len(net.cells)} preprocessing ops",
          flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
