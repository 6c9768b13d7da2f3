"""Budget study: searches within three parameter budgets on the embedded digits, retrained, next to random genotypes
of the same cost.

    python -m benchmarks.budget_study search  [--epochs 10] [--jobs 2]
    python -m benchmarks.budget_study retrain [--samples 3] [--train-epochs 30] [--jobs 2]
    python -m benchmarks.budget_study report  [--figure benchmarks/results/budget-study.png]
    python -m benchmarks.budget_study latency [--threads 1] [--table benchmarks/results/latency-table-cpu.json]

``search`` runs ``python -m fastnas.search --preset quick`` without a budget, then with ``--budget params=N`` for
three N between the smallest network of the quick retraining preset and the unconstrained run's network (at 1/4,
1/2 and 3/4 of the way). ``retrain`` retrains each derived genotype with ``python -m fastnas.train --preset quick``
and, per budget, ``--samples`` random genotypes (uniform ops and inputs, DARTS's shape) whose parameters are within
3% of the derived network's. ``report`` prints the table for ``benchmarks/RESULTS.md`` and plots accuracy against
parameters. ``latency`` measures the latency table of the quick retraining network on this CPU (or reads
``--table`` when it exists) and compares its prediction with the measured latency of whole networks: the study's
derived genotypes, DARTS_V2, the cheapest genotype and random ones. Every step skips the runs it finds finished
under ``--out``, so an interrupted study resumes.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

import torch

from benchmarks.collapse_study import retrained, run_all, train_dir
from fastnas.budget import smallest_cost
from fastnas.costmodel import CostModel, Deployment, build
from fastnas.genotype import Genotype
from fastnas.genotypes import DARTS_V2
from fastnas.latency import LatencyTable, fit_correction, measure_space
from fastnas.space import SPACES

FRACTIONS = (0.25, 0.5, 0.75)
TOLERANCE = 0.03  # random genotypes' parameters within 3% of the derived network's


def cost_model() -> CostModel:
    return CostModel(Deployment.from_preset("quick"), SPACES["at-darts"])


def search_cmd(args: argparse.Namespace, run: Path, extra: list[str]) -> tuple[list[str], Path]:
    cmd = [sys.executable, "-m", "fastnas.search", "--preset", "quick", "--epochs", str(args.epochs), "--threads",
           "1", "--no-progress", "--run-dir", str(run), *extra]
    if run.exists():
        cmd += ["--overwrite"]
    return cmd, args.out / f"{run.name}.out"


def budgets(args: argparse.Namespace) -> list[int]:
    """The three parameter budgets, from the unconstrained run's network."""
    model = cost_model()
    free = model.cost(Genotype.from_json(args.out / "search-free" / "genotype.json"))["params"]
    low = smallest_cost(model, "params")
    return [int(low + f * (free - low)) for f in FRACTIONS]


def search(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    free = args.out / "search-free"
    if not (free / "genotype.json").exists():
        run_all([search_cmd(args, free, [])], 1)
    commands = []
    for n in budgets(args):
        run = args.out / f"search-params-{n}"
        if not (run / "genotype.json").exists():
            commands.append(search_cmd(args, run, ["--budget", f"params={n}"]))
    run_all(commands, args.jobs)


def random_genotypes(model: CostModel, target: int, samples: int, seed: int) -> list[Genotype]:
    """``samples`` uniform random genotypes whose parameters are within :data:`TOLERANCE` of ``target``."""
    rng, ops, found = random.Random(seed), [o for o in model.primitives if o != "none"], []
    for _ in range(200_000):
        cells = [[(rng.choice(ops), j) for i in range(model.steps) for j in rng.sample(range(2 + i), 2)]
                 for _ in range(2)]
        g = Genotype(cells[0], model.concat, cells[1], model.concat)
        if abs(model.cost(g)["params"] - target) <= TOLERANCE * target:
            found.append(g)
            if len(found) == samples:
                break
    return found


def rows(args: argparse.Namespace) -> list[dict]:
    """Every finished search: its budget (None: unconstrained), genotype, cost, and its random genotypes."""
    model, out = cost_model(), []
    for run in sorted(args.out.glob("search-*")):
        if not (run / "genotype.json").exists():
            continue
        saved = json.loads((run / "genotype.json").read_text())
        g = Genotype.from_dict(saved)
        budget = saved.get("budget", {}).get("params")
        cost = model.cost(g)
        randoms = random_genotypes(model, cost["params"], args.samples, seed=len(out)) if budget else []
        out.append({"run": run.name, "budget": budget, "genotype": g, "cost": cost, "random": randoms})
    return sorted(out, key=lambda r: r["cost"]["params"])


def train_cmd(args: argparse.Namespace, g: Genotype) -> tuple[list[str], Path]:
    run = train_dir(args.out, g, 0)
    cmd = [sys.executable, "-m", "fastnas.train", "--preset", "quick", "--genotype", str(g), "--seed", "0",
           "--epochs", str(args.train_epochs), "--threads", "1", "--no-progress", "--run-dir", str(run)]
    if run.exists():
        cmd += ["--overwrite"]
    return cmd, args.out / f"{run.name}.out"


def retrain(args: argparse.Namespace) -> None:
    todo = []
    for row in rows(args):
        for g in [row["genotype"], *row["random"]]:
            if retrained(args.out, g, 0) is None and g not in todo:
                todo.append(g)
    run_all([train_cmd(args, g) for g in todo], args.jobs)


def report(args: argparse.Namespace) -> None:
    points = []
    print("| search | budget (params) | params | madds | test acc. | random genotypes of the same cost: acc. "
          "(mean, n) |\n|---|---:|---:|---:|---:|---|")
    for row in rows(args):
        acc = retrained(args.out, row["genotype"], 0)
        rand = [a for a in (retrained(args.out, g, 0) for g in row["random"]) if a is not None]
        c = row["cost"]
        shown = f"{statistics.mean(rand):.2f}% ({', '.join(f'{a:.1f}' for a in rand)}; n={len(rand)})" \
            if rand else "–"
        budget = f"{int(row['budget']):,}" if row["budget"] else "none"
        print(f"| {row['run']} | {budget} | "
              f"{c['params']:,} | {c['madds'] / 1e6:.2f}M | {'–' if acc is None else f'{acc:.2f}%'} | {shown} |")
        points.append((row, acc, [(row["cost"]["params"], a) for a in rand]))
    if args.figure:
        plot(points, args.figure)


def plot(points: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    labelled = set()

    def label(text: str) -> str | None:
        if text in labelled:
            return None
        labelled.add(text)
        return text
    for row, acc, rand in points:
        if rand:
            ax.scatter(*zip(*rand), marker="x", color="0.5", label=label("random genotypes, same cost (±3%)"))
        if acc is not None:
            budgeted = bool(row["budget"])
            ax.scatter([row["cost"]["params"]], [acc], color="tab:red" if budgeted else "tab:blue", zorder=3,
                       label=label("searched within the budget" if budgeted else "unconstrained search"))
            ax.annotate(f"≤{int(row['budget']):,}" if budgeted else "no budget",
                        (row["cost"]["params"], acc), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("parameters of the retrained network")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("digits, quick retraining network: accuracy against parameters", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency(args: argparse.Namespace) -> None:
    table = LatencyTable.load(args.table) if args.table.exists() else \
        LatencyTable.for_target(args.target, args.threads, 1, repeats=args.repeats, clock=args.clock)
    dep, space = Deployment.from_preset("quick"), SPACES["at-darts"]
    model = CostModel(dep, space, latency=table)
    if table.measurable:
        measure_space(model)
    torch.set_num_threads(table.meta["threads"])
    measurer = LatencyTable({**table.meta, "op_scale": 1.0, "offset_ms": 0.0}, measure=True)
    wall = LatencyTable({**measurer.meta, "clock": "wall"}, measure=True)
    # the correction is fitted on random genotypes of its own (over the range of costs) and checked on the others
    fit_on = [g for i, n in enumerate(range(110_000, 250_000, 20_000)) for g in random_genotypes(model, n, 1, seed=i)]
    if "op_scale" not in table.meta:
        fit_correction(measurer, CostModel(dep, space, latency=measurer), fit_on)
        table.meta.update({k: measurer.meta[k] for k in ("op_scale", "offset_ms", "correction_networks")})
        args.table.parent.mkdir(parents=True, exist_ok=True)
        table.save(args.table)
    scaled = CostModel(dep, space, latency=table)
    raw = CostModel(dep, space, latency=LatencyTable({**table.meta, "op_scale": 1.0, "offset_ms": 0.0}, table.ops,
                                                     table.fixed_parts))
    named = [(r["run"], r["genotype"]) for r in rows(args)] + [("DARTS_V2", DARTS_V2)]
    named += [(f"random-{i}", g) for i, g in enumerate(random_genotypes(model, 180_000, 4, seed=7))]
    low = [(op, j) for i in range(4) for op, j in (("skip_connect", 0), ("max_pool_3x3", 1))]
    named.append(("cheapest", Genotype(low, model.concat, low, model.concat)))
    m = table.meta
    print(f"latency table: {m['target']} {m['device']}, {m['threads']} thread(s), batch {m['batch']}, median of "
          f"{m['repeats']}, {m['clock']} clock, torch {m['versions']['torch']}; {len(table.ops)} op entries; "
          f"correction "
          f"b = {m['offset_ms']:.3f} ms, k = {m['op_scale']:.3f}, fitted on {m['correction_networks']} other random "
          f"genotypes")
    print(f"| network | params | predicted: sum (ms) | predicted: fixed + b + k·ops (ms) | "
          f"measured, {m['clock']} clock "
          f"(ms) | error of sum | error of corrected | wall clock (ms) |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    errors = ([], [])
    for name, g in named:
        net = build(g, dep)
        measured, p_raw, p_fit = measurer.network_ms(net), raw.cost(g)["latency"], scaled.cost(g)["latency"]
        for e, p in zip(errors, (p_raw, p_fit)):
            e.append(abs(p - measured) / measured)
        print(f"| {name} | {scaled.cost(g)['params']:,} | {p_raw:.3f} | {p_fit:.3f} | {measured:.3f} | "
              f"{100 * (p_raw / measured - 1):+.0f}% | {100 * (p_fit / measured - 1):+.0f}% | "
              f"{wall.network_ms(net):.3f} |", flush=True)
    print(f"mean |error|: sum {100 * statistics.mean(errors[0]):.0f}%, corrected "
          f"{100 * statistics.mean(errors[1]):.0f}%")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["search", "retrain", "report", "latency"])
    p.add_argument("--out", type=Path, default=Path("runs/budget"), help="folder of the study's runs")
    p.add_argument("--epochs", type=int, default=10, help="search epochs (the quick preset's)")
    p.add_argument("--train-epochs", type=int, default=30, help="retraining epochs (the quick preset's)")
    p.add_argument("--samples", type=int, default=3, help="random genotypes per budget")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    p.add_argument("--figure", type=Path, default=None, help="report: where to save the cost-accuracy plot")
    p.add_argument("--threads", type=int, default=1, help="latency: CPU threads")
    p.add_argument("--repeats", type=int, default=30, help="latency: timed calls per entry (the median is kept)")
    p.add_argument("--target", default="cpu", choices=["cpu", "cuda", "onnxruntime"], help="latency: the target")
    p.add_argument("--clock", default="wall", choices=["wall", "thread"],
                   help="latency: wall time, or the thread's CPU time (one thread; for a shared machine)")
    p.add_argument("--table", type=Path, default=Path("benchmarks/results/latency-table-cpu.json"),
                   help="latency: the table (measured when the file does not exist)")
    args = p.parse_args()
    {"search": search, "retrain": retrain, "report": report, "latency": latency}[args.step](args)


if __name__ == "__main__":
    main()
