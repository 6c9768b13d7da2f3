"""Experiment: regional compilation of the full search supernet (first-order step, ``cpu`` backend, channels_last).

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python -m benchmarks.regional_compile regional   # cold, then run it again: warm
    python -m benchmarks.regional_compile eager                                           # the same step, eager

``regional`` compiles every candidate op with parameters and both preprocessing ops of every cell as its own region
(``module.compile(dynamic=False)``; cells call their candidates whole, so ReLU is inside the region), instead of the
whole network as ``--compile`` does. Modules of one class and shapes share the compiled code, so the full supernet
needs about 40 graphs. Prints the first step (compilation included), three more steps, and Inductor's FX-graph cache
counters. Not used by the CLI yet: see the README's compile figures.
"""
from __future__ import annotations

import argparse
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["regional", "eager"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)

    import torch
    import torch._dynamo
    from torch import nn

    import fastnas.ops as ops
    from fastnas.architect import Architect, weight_step
    from fastnas.config import SearchConfig
    from fastnas.nn.search_cell import is_parameter_free
    from fastnas.supernet import SuperNet

    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # one code object (Module._call_impl) serves every region
    torch._dynamo.config.accumulated_recompile_limit = 4096
    ops.resolve_backend("cpu", "cpu")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    cfg = SearchConfig()
    net = SuperNet(cfg.C, cfg.layers, 10, "at-darts").to(memory_format=torch.channels_last)
    if args.mode == "regional":
        regions = 0
        for cell in net.cells:
            cell.share_relu = False
            for edge in cell.edges:
                for op in edge:
                    if not is_parameter_free(op) and not isinstance(op, nn.Identity):
                        op.compile(dynamic=False)
                        regions += 1
            cell.preprocess0.compile(dynamic=False)
            cell.preprocess1.compile(dynamic=False)
        print(f"compiled regions: {regions} candidate ops + {2 * len(net.cells)} preprocessing ops", flush=True)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.weight_parameters(), cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    architect = Architect(net, criterion, cfg.arch_lr, cfg.arch_betas, cfg.arch_weight_decay, 1, cfg.momentum,
                          cfg.weight_decay, forward=net)
    x, xv = (torch.randn(args.batch, 3, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last)
             for _ in range(2))
    y, yv = (torch.randint(0, 10, (args.batch,), generator=gen) for _ in range(2))

    def step() -> None:
        with ops.backend("cpu"):
            architect.step(x, y, xv, yv, cfg.lr, optimizer)
            weight_step(net, net, criterion, optimizer, x, y, cfg.grad_clip, net.arch_parameters())

    net.train()
    t0 = time.perf_counter()
    step()
    print(f"first step (compilation included): {time.perf_counter() - t0:.1f} s", flush=True)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print("next steps: " + ", ".join(f"{t:.2f} s" for t in times), flush=True)
    from torch._dynamo.utils import counters

    print("inductor:", {k: v for k, v in counters["inductor"].items() if "fxgraph" in k},
          "dynamo:", dict(counters["stats"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
