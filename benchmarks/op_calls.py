"""Operator calls per search step: what a GPU pays a kernel launch (and a trip through Python and the dispatcher)
for, counted where it can be counted without one.

A :class:`~torch.utils._python_dispatch.TorchDispatchMode` counts every ATen and custom-op call below autograd, in
the forward, the backward and the optimiser steps, of one first-order search step (``Architect.step`` then
``weight_step``, as ``Search.train_epoch`` runs them), after a warm-up step. Host synchronisations are the calls that
read a tensor's value on the host (``aten::_local_scalar_dense``, behind ``.item()``, ``float()``, ``bool()``).

    python -m benchmarks.op_calls                       # darts and at-darts, C=16, 8 cells, batch 8
    python -m benchmarks.op_calls --providers reference_darts_cl,cpu_cl --json benchmarks/out/op-calls.json

The DARTS formulation (``reference_darts*``: every activation stored, PyTorch's modules, the reference backend) is
the baseline the other providers are compared with. Beside all calls, the calls that are not views (``detach``,
``view``, ``slice``, ...: no kernel runs for them on a GPU) are counted apart.
"""
from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .steps import STEP_PROVIDERS, build_step, skip_reason

SPACES = ("darts", "at-darts")
DEFAULT_PROVIDERS = ("reference_darts_cl", "reference_cl", "cpu_cl", "cpu_cl_batched", "cpu_pc4_cl")
SYNC_OPS = ("aten::_local_scalar_dense", "aten::item")
# calls that only make a new view of existing data (or a tensor's autograd alias): no kernel runs on a GPU
VIEW_OPS = frozenset(f"aten::{name}" for name in (
    "detach", "view", "_unsafe_view", "reshape", "slice", "select", "split", "split_with_sizes", "unbind", "permute",
    "transpose", "t", "expand", "unsqueeze", "squeeze", "as_strided", "alias", "unflatten", "flatten", "narrow",
    "view_as", "_reshape_alias", "diagonal", "unfold", "chunk"))


class OpCounter(TorchDispatchMode):
    """Counts every operator call by name (``namespace::op``)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func._schema.name] += 1
        return func(*args, **(kwargs or {}))


def count_step(provider: str, space: str, batch: int) -> dict:
    """Operator calls of one first-order search step of ``provider`` over ``space`` (after a warm-up step)."""
    step = build_step("search1", provider, primitives=space, batch=batch)
    step()
    with OpCounter() as counter:
        step()
    counts = counter.counts
    return {"provider": provider, "space": space, "batch": batch, "calls": sum(counts.values()),
            "kernel_calls": sum(n for name, n in counts.items() if name not in VIEW_OPS),
            "host_syncs": sum(counts[name] for name in SYNC_OPS), "top": counts.most_common(12)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.op_calls", description=__doc__.split("\n\n")[0])
    parser.add_argument("--providers", default=",".join(DEFAULT_PROVIDERS),
                        help=f"step providers, comma-separated (of: {', '.join(STEP_PROVIDERS)})")
    parser.add_argument("--spaces", default=",".join(SPACES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", type=Path, help="write the results (with each step's most frequent ops) here")
    args = parser.parse_args(argv)
    results = []
    for space in args.spaces.split(","):
        baseline = kernels = None
        for provider in args.providers.split(","):
            why = skip_reason(provider)
            if why is not None:
                print(f"{space:9s} {provider:22s} skipped: {why}")
                continue
            result = count_step(provider, space, args.batch)
            baseline, kernels = baseline or result["calls"], kernels or result["kernel_calls"]
            results.append(result)
            print(f"{space:9s} {provider:22s} {result['calls']:8d} calls {result['calls'] / baseline:5.2f}x  "
                  f"{result['kernel_calls']:7d} not views {result['kernel_calls'] / kernels:5.2f}x  "
                  f"{result['host_syncs']} host syncs")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
