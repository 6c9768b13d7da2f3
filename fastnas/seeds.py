"""Several searches of one configuration with different seeds, and what their genotypes share.

``python -m fastnas.search --seeds N`` runs N searches one after another (seeds S, S+1, ..., S+N−1, each in its
own ``seed-S`` folder of the run folder) and writes ``seeds.json`` and ``seeds.txt`` (each genotype, how often each
edge and each op was chosen per cell type, the attention analysis over all of them) and ``seeds.png`` (the cells of
every seed side by side).

What is and is not reproducible: on the CPU, one seed, backend and thread count give a bitwise identical α history
and genotype. Different seeds differ in the initial α and weights and in the order of the batches, and DARTS's
derivation amplifies small differences (the weights of an edge's ops stay close for many epochs), so two seeds can
give different cells: the counts below show which choices are stable.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from . import cli, distributed, runtime
from .analysis import PAPER_FINDING, attention_edges, input_name
from .genotype import Genotype
from .indicators import is_attention_op, is_parameter_free_op
from .errors import ConfigError
from .runtime import log
from .viz import plot_cells_side_by_side

KINDS = ("normal", "reduce")


def summarize(results: Sequence[tuple[int, Genotype]]) -> dict:
    """Per cell type, over the genotypes of (seed, genotype): how often each edge (node, input) and each op was
    chosen, and how often each op was chosen on each edge; the attention edges of every genotype."""
    summary: dict = {"seeds": [s for s, _ in results], "genotypes": {str(s): str(g) for s, g in results}}
    for kind in KINDS:
        edges, ops, edge_ops = Counter(), Counter(), Counter()
        for _, g in results:
            for k, (op, src) in enumerate(getattr(g, kind)):
                edge = f"node {k // 2} <- {input_name(src)}"
                edges[edge] += 1
                ops[op] += 1
                edge_ops[f"{edge}: {op}"] += 1
        summary[kind] = {"edges": dict(edges.most_common()), "ops": dict(ops.most_common()),
                         "edge_ops": dict(edge_ops.most_common())}
    attention = {kind: Counter() for kind in KINDS}
    for _, g in results:
        for kind, found in attention_edges(g).items():
            for op, node, src in found:
                attention[kind][f"node {node} <- {src}: {op}"] += 1
    summary["attention"] = {kind: dict(attention[kind].most_common()) for kind in KINDS}
    summary["parameter_free"] = {str(s): {kind: sum(is_parameter_free_op(op) for op, _ in getattr(g, kind))
                                          for kind in KINDS} for s, g in results}
    summary["attention_count"] = {str(s): {kind: sum(is_attention_op(op) for op, _ in getattr(g, kind))
                                           for kind in KINDS} for s, g in results}
    return summary


def report(summary: dict) -> str:
    """The summary as text."""
    n = len(summary["seeds"])
    lines = [f"{n} searches, seeds {', '.join(map(str, summary['seeds']))}", ""]
    for s in summary["seeds"]:
        pf, at = summary["parameter_free"][str(s)], summary["attention_count"][str(s)]
        lines.append(f"seed {s}: {summary['genotypes'][str(s)]}")
        lines.append(f"  parameter-free edges: normal {pf['normal']}, reduce {pf['reduce']}; attention edges: "
                     f"normal {at['normal']}, reduce {at['reduce']}")
    for kind in KINDS:
        lines += ["", f"{kind} cell, chosen in how many of the {n} genotypes:"]
        lines.append("  ops: " + ", ".join(f"{op} {c}" for op, c in summary[kind]["ops"].items()))
        lines.append("  edges: " + ", ".join(f"{e} {c}/{n}" for e, c in summary[kind]["edges"].items()))
        lines.append("  edge and op: " + ", ".join(f"{e} {c}/{n}" for e, c in summary[kind]["edge_ops"].items()))
    lines += ["", "attention over all genotypes:"]
    for kind in KINDS:
        found = summary["attention"][kind]
        lines.append(f"  {kind} cell: " + (", ".join(f"{e} {c}/{n}" for e, c in found.items()) if found
                                           else "no attention in any genotype"))
    lines.append(PAPER_FINDING)
    return "\n".join(lines)


def write_summary(run_dir: Path, results: Sequence[tuple[int, Genotype]], folders: Sequence[Path]) -> dict:
    """``seeds.json``, ``seeds.txt`` and ``seeds.png`` (each seed's normal.png and reduce.png) in ``run_dir``."""
    from .runtime import write_json

    summary = summarize(results)
    write_json(summary, run_dir / "seeds.json")
    (run_dir / "seeds.txt").write_text(report(summary) + "\n")
    plot_cells_side_by_side([(f"seed {s}", [folder / "normal.png", folder / "reduce.png"])
                             for (s, _), folder in zip(results, folders)], run_dir / "seeds.png")
    return summary


def run(args: argparse.Namespace, cfg: Any, search_class: type) -> int:
    """``--seeds N``: N searches of ``cfg`` (a ``search_class`` each), one after another, and their summary."""
    if not isinstance(args.seeds, int) or args.seeds < 1:
        raise ConfigError(f"--seeds must be an integer >= 1, got {args.seeds}")
    main_process = runtime.setup_processes(cfg.device, args.dist_timeout, None)
    run_dir, results, folders = None, [], []
    for i in range(args.seeds):
        one = dataclasses.replace(cfg, seed=cfg.seed + i)
        one.validate()
        search = search_class(one, None, progress=main_process and not args.no_progress, verify_sync=args.verify_sync)
        search.tensorboard = args.tensorboard
        handler = None
        if main_process:
            if run_dir is None:
                run_dir = cli.claim_run_dir(args, f"search-{args.preset}")
                runtime.setup_logging(run_dir)
                runtime.write_json({"preset": args.preset, "seeds": args.seeds, **cfg.to_dict()},
                                   run_dir / "config.json")
            folder = run_dir / f"seed-{one.seed}"
            folder.mkdir()
            runtime.write_json({"preset": args.preset, **one.to_dict()}, folder / "config.json")
            handler = logging.FileHandler(folder / "log.txt")  # each seed's own log too
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
            log.addHandler(handler)
            search.run_dir = folder
            folders.append(folder)
        log.info(f"seeds: search {i + 1} of {args.seeds}, seed {one.seed}")
        try:
            result = search.run()
        finally:
            if handler is not None:
                log.removeHandler(handler)
                handler.close()
        results.append((one.seed, result.genotype))
    distributed.barrier()
    if main_process:
        summary = write_summary(run_dir, results, folders)
        log.info(f"seeds: summary of {args.seeds} searches in {run_dir}\n" + report(summary))
        for seed, genotype in results:
            print(f"seed {seed}: {genotype}")
    return 0
