"""Budget study: searches within three parameter budgets on the embedded digits, retrained, next to random genotypes
of the same cost.

    python -m benchmarks.budget_study search  [--epochs 10] [--jobs 2]
    python -m benchmarks.budget_study retrain [--samples 3] [--train-epochs 30] [--jobs 2]
    python -m benchmarks.budget_study report  [--figure benchmarks/results/budget-study.png]

``search`` runs ``python -m fastnas.search --preset quick`` without a budget, then with ``--budget params=N`` for
three N between the smallest network of the quick retraining preset and the unconstrained run's network (at 1/4,
1/2 and 3/4 of the way). ``retrain`` retrains each derived genotype with ``python -m fastnas.train --preset quick``
and, per budget, ``--samples`` random genotypes (uniform ops and inputs, DARTS's shape) whose parameters are within
3% of the derived network's. ``report`` prints the table for ``benchmarks/RESULTS.md`` and plots accuracy against
parameters. Every step skips the runs it finds finished under ``--out``, so an interrupted study resumes.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

from benchmarks.collapse_study import retrained, run_all, train_dir
from fastnas.budget import smallest_cost
from fastnas.costmodel import CostModel, Deployment
from fastnas.genotype import Genotype
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
    for i, (row, acc, rand) in enumerate(points):
        if rand:
            ax.scatter(*zip(*rand), marker="x", color="0.5", label="random, same cost" if i == 1 else None)
        if acc is not None:
            ax.scatter([row["cost"]["params"]], [acc], color="tab:red" if row["budget"] else "tab:blue",
                       label="unconstrained search" if not row["budget"] else None, zorder=3)
            ax.annotate("none" if not row["budget"] else f"≤{int(row['budget']):,}",
                        (row["cost"]["params"], acc), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("parameters of the retrained network")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("digits: searched within a budget (red) vs random genotypes of the same cost", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["search", "retrain", "report"])
    p.add_argument("--out", type=Path, default=Path("runs/budget"), help="folder of the study's runs")
    p.add_argument("--epochs", type=int, default=10, help="search epochs (the quick preset's)")
    p.add_argument("--train-epochs", type=int, default=30, help="retraining epochs (the quick preset's)")
    p.add_argument("--samples", type=int, default=3, help="random genotypes per budget")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    p.add_argument("--figure", type=Path, default=None, help="report: where to save the cost-accuracy plot")
    args = p.parse_args()
    {"search": search, "retrain": retrain, "report": report}[args.step](args)


if __name__ == "__main__":
    main()
