"""Collapse study: vanilla DARTS against each collapse control on the embedded digits, retrained, with a random
baseline.

    python -m benchmarks.collapse_study search  [--epochs 50] [--seeds 3] [--hessian-every 5] [--jobs 2]
    python -m benchmarks.collapse_study retrain [--samples 8] [--jobs 2]
    python -m benchmarks.collapse_study report  [--figure benchmarks/results/collapse-study.png]

``search`` runs ``python -m fastnas.search --preset quick`` for vanilla DARTS and the three controls that change
training (``--aux-skip``, ``--beta-decay 25``, ``--alpha-noise 0.3``), one run per seed, ``--jobs`` at a time with
one thread each. The other two controls only read what vanilla training produces, so they are applied to the vanilla
runs with the library's own functions: ``--skip-limit 2`` derives the normal cell from the last epoch's α with
:func:`fastnas.robust.limit_skips`, and ``--early-stop`` takes the genotype of the first epoch where
:func:`fastnas.robust.early_stop_reason` fires (the same α: a CPU search is bitwise deterministic for a seed and
thread count). ``retrain`` retrains every distinct derived genotype with ``python -m fastnas.train --preset quick
--seed 0`` and runs ``python -m fastnas.random_baseline`` (N random genotypes of the same space, same preset) on
vanilla seed 0. ``report`` prints the tables for ``benchmarks/RESULTS.md`` and plots the indicators per epoch.
Every step skips the runs it finds finished under ``--out``, so an interrupted study resumes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from fastnas.config import SearchConfig
from fastnas.genotype import Genotype
from fastnas.indicators import cell_counts
from fastnas.random_baseline import rank_of
from fastnas.robust import early_stop_reason, limit_skips
from fastnas.space import resolve_primitives

SEARCHES = {"vanilla": [], "aux-skip": ["--aux-skip"], "beta-decay": ["--beta-decay", "25"],
            "alpha-noise": ["--alpha-noise", "0.3"]}
DERIVED = ("skip-limit", "early-stop")  # applied to the vanilla runs
LABELS = {"vanilla": "vanilla", "skip-limit": "`--skip-limit 2`", "aux-skip": "`--aux-skip`",
          "beta-decay": "`--beta-decay 25`", "alpha-noise": "`--alpha-noise 0.3`", "early-stop": "`--early-stop`"}
ORDER = ["vanilla", "skip-limit", "aux-skip", "beta-decay", "alpha-noise", "early-stop"]


def run_all(commands: list[tuple[list[str], Path]], jobs: int) -> None:
    """Run the commands ``jobs`` at a time, each one's output to its log file; stop on the first failure."""
    def one(item):
        cmd, logfile = item
        print("$", " ".join(cmd), flush=True)
        with open(logfile, "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
        if rc:
            raise SystemExit(f"failed (exit {rc}): {' '.join(cmd)}; see {logfile}")
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, commands))


def search_dir(out: Path, name: str, seed: int) -> Path:
    return out / f"search-{name}-s{seed}"


def search(args: argparse.Namespace) -> None:
    commands = []
    for name, flags in SEARCHES.items():
        for seed in range(args.seeds):
            run = search_dir(args.out, name, seed)
            if (run / "genotype.json").exists():
                continue
            cmd = [sys.executable, "-m", "fastnas.search", "--preset", "quick", "--epochs", str(args.epochs),
                   "--seed", str(seed), "--hessian-every", str(args.hessian_every), "--threads", "1",
                   "--no-progress", "--run-dir", str(run), *flags]
            if args.arch_lr is not None:
                cmd += ["--arch-lr", str(args.arch_lr)]
            if run.exists():
                cmd += ["--overwrite"]
            commands.append((cmd, args.out / f"{run.name}.out"))
    args.out.mkdir(parents=True, exist_ok=True)
    run_all(commands, args.jobs)


def load_search(run: Path) -> dict:
    config = json.loads((run / "config.json").read_text())
    config.pop("preset", None)  # the run's preset name, not a SearchConfig field
    return {"config": SearchConfig.from_dict(config),
            "history": json.loads((run / "alphas.json").read_text())["epochs"],
            "genotype": Genotype.from_json(run / "genotype.json")}


def derived_genotype(name: str, run: dict) -> tuple[Genotype, int]:
    """The genotype a vanilla run would have given under a derivation-only control, and the epoch it stops at."""
    cfg, history = run["config"], run["history"]
    primitives = resolve_primitives(cfg.primitives)
    if name == "skip-limit":
        normal, _ = limit_skips(torch.tensor(history[-1]["normal"]), primitives, cfg.steps, 2)
        return run["genotype"]._replace(normal=normal), len(history)
    for i in range(len(history)):
        if early_stop_reason(history[:i + 1], primitives, cfg.early_stop_patience, cfg.warmup_epochs):
            return Genotype.parse(history[i]["genotype"]), i + 1
    return run["genotype"], len(history)


def genotypes(args: argparse.Namespace) -> list[dict]:
    """Every (config, seed) of the study whose search has finished, with its run, genotype and stopping epoch."""
    rows = []
    for seed in range(args.seeds):
        for name in ORDER:
            source = "vanilla" if name in DERIVED else name
            if not (search_dir(args.out, source, seed) / "genotype.json").exists():
                continue
            run = load_search(search_dir(args.out, source, seed))
            if name in DERIVED:
                genotype, epochs = derived_genotype(name, run)
            else:
                genotype, epochs = run["genotype"], len(run["history"])
            rows.append({"config": name, "seed": seed, "run": run, "genotype": genotype, "epochs": epochs})
    return rows


def train_dir(out: Path, genotype: Genotype, seed: int) -> Path:
    return out / f"train-{hashlib.sha256(str(genotype).encode()).hexdigest()[:10]}-s{seed}"


def retrain(args: argparse.Namespace) -> None:
    commands, seen = [], set()
    for seed in range(args.retrain_seeds):
        for row in genotypes(args):
            run = train_dir(args.out, row["genotype"], seed)
            if run in seen or retrained(args.out, row["genotype"], seed) is not None:
                continue
            seen.add(run)
            cmd = [sys.executable, "-m", "fastnas.train", "--preset", "quick", "--genotype", str(row["genotype"]),
                   "--seed", str(seed), "--threads", "1", "--no-progress", "--run-dir", str(run)]
            if run.exists():
                cmd += ["--overwrite"]
            commands.append((cmd, args.out / f"{run.name}.out"))
    baseline = args.out / "baseline"
    if args.samples and not (baseline / "baseline.json").exists():
        cmd = [sys.executable, "-m", "fastnas.random_baseline", "--preset", "quick",
               "--genotype", str(search_dir(args.out, "vanilla", 0)), "--samples", str(args.samples), "--seed", "0",
               "--threads", "1", "--no-progress", "--run-dir", str(baseline)]
        if baseline.exists():
            cmd += ["--overwrite"]
        commands.insert(0, (cmd, args.out / "baseline.out"))  # the longest job first
    run_all(commands, args.jobs)


def retrained(out: Path, genotype: Genotype, seed: int) -> float | None:
    """The final test accuracy of the genotype's retraining with ``seed``, None while it has not finished."""
    path = train_dir(out, genotype, seed) / "metrics.json"
    metrics = json.loads(path.read_text()) if path.exists() else {}
    return metrics["final_test_acc"] if metrics.get("finished") else None


def report(args: argparse.Namespace) -> None:
    rows = genotypes(args)
    for row in rows:
        accs = [retrained(args.out, row["genotype"], seed) for seed in range(args.retrain_seeds)]
        row["retrain"] = statistics.mean(accs) if None not in accs else None
        row["retrains"] = accs
        row["counts"] = cell_counts(row["genotype"])
        history = row["run"]["history"][:row["epochs"]]
        row["hessian"] = [(h["epoch"], h["indicators"]["hessian_eigenvalue"]) for h in history
                          if h["indicators"].get("hessian_eigenvalue") is not None]
        row["supernet_valid"] = history[-1]["valid_acc"]
    baseline_file = args.out / "baseline" / "baseline.json"
    baseline = json.loads(baseline_file.read_text()) if baseline_file.exists() else None
    randoms = [r["final_test_acc"] for r in baseline["random"]] if baseline else []
    mean = statistics.mean
    slash = lambda values: "/".join(str(v) for v in values)  # noqa: E731
    print("Per seed (0/1/2): pf = parameter-free edges, att = attention edges of the derived cell; Hessian = dominant "
          "eigenvalue at epoch 10 and at the last epoch searched (mean of the seeds).\n")
    averaged = " (mean of the retrain seeds)" if args.retrain_seeds > 1 else ""
    print("| config | pf normal | pf reduce | skips normal | att normal | att reduce | Hessian 10 → last "
          f"| epochs | supernet valid % | retrained test %{averaged} | mean | random beaten (seed 0) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in ORDER:
        group = [r for r in rows if r["config"] == name]
        if not group:
            continue
        h10 = [dict(r["hessian"]).get(10) for r in group]
        h_last = [r["hessian"][-1][1] for r in group if r["hessian"]]
        acc = [r["retrain"] for r in group]
        done = [a for a in acc if a is not None]
        # against the random genotypes, which were retrained with seed 0 only: the seed-0 retraining
        beats = [rank_of(r["retrains"][0], randoms)["beats"] if randoms and r["retrains"][0] is not None else "–"
                 for r in group]
        print(f"| {LABELS[name]} | {slash(r['counts']['normal']['parameter_free'] for r in group)} "
              f"| {slash(r['counts']['reduce']['parameter_free'] for r in group)} "
              f"| {slash(sum(op == 'skip_connect' for op, _ in r['genotype'].normal) for r in group)} "
              f"| {slash(r['counts']['normal']['attention'] for r in group)} "
              f"| {slash(r['counts']['reduce']['attention'] for r in group)} "
              f"| {f'{mean(h10):.3f}' if None not in h10 else '–'} → {f'{mean(h_last):.3f}' if h_last else '–'} "
              f"| {slash(r['epochs'] for r in group)} | {mean(r['supernet_valid'] for r in group):.1f} "
              f"| {' / '.join(f'{a:.2f}' if a is not None else '–' for a in acc)} "
              f"| {f'{mean(done):.2f}' if done else '–'} | {slash(beats)} |")
    epochs = sorted({e for r in rows for e, _ in r["hessian"]})
    print("\nDominant Hessian eigenvalue by epoch (mean of the seeds):\n")
    print("| config | " + " | ".join(map(str, epochs)) + " |")
    print("|---|" + "---|" * len(epochs))
    for name in SEARCHES:
        group = [r for r in rows if r["config"] == name]
        if group:
            print(f"| {LABELS[name]} | " + " | ".join(
                f"{mean_at(group, e):.3f}" if all(e in dict(r['hessian']) for r in group) else "–" for e in epochs)
                + " |")
    pairs = {str(r["genotype"]): r["retrains"] for r in rows if None not in r["retrains"]}
    if args.retrain_seeds > 1 and pairs:
        spread = [max(a) - min(a) for a in pairs.values()]
        print(f"\nRetraining noise: over {len(pairs)} genotypes, each retrained with seeds "
              f"0..{args.retrain_seeds - 1}, "
              f"the seeds' accuracies differ by {statistics.mean(spread):.2f} points on average (at most "
              f"{max(spread):.2f}).")
    if baseline:
        print(f"\nRandom baseline ({len(randoms)} genotypes, same preset and seed): "
              + ", ".join(f"{a:.2f}" for a in sorted(randoms)) + f"% (mean {mean(randoms):.2f}); vanilla seed 0 "
              f"retrained inside it: {baseline['searched']['final_test_acc']:.2f}%")
    if args.figure:
        plot(rows, args.figure)


def plot(rows: list[dict], path: Path) -> None:
    """Per config (mean over the seeds): the Hessian eigenvalue and the normal cell's parameter-free edges."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in SEARCHES:
        group = [r for r in rows if r["config"] == name]
        epochs = [e for e, _ in group[0]["hessian"]]
        ax1.plot(epochs, [mean_at(group, e) for e in epochs], marker="o", label=name)
        history = [r["run"]["history"] for r in group]
        ax2.plot(range(1, len(history[0]) + 1),
                 [statistics.mean(h[i]["indicators"]["parameter_free"]["normal"] for h in history)
                  for i in range(len(history[0]))], label=name)
    ax1.set(xlabel="epoch", ylabel="dominant eigenvalue of ∇²_α L_val", title="Hessian (mean of seeds)")
    ax2.set(xlabel="epoch", ylabel="edges", title="parameter-free edges, derived normal cell (mean of seeds)")
    ax1.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"figure: {path}")


def mean_at(group: list[dict], epoch: int) -> float:
    return statistics.mean(dict(r["hessian"])[epoch] for r in group)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["search", "retrain", "report"])
    p.add_argument("--out", type=Path, default=Path("runs/collapse"), help="folder of the study's runs")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--hessian-every", type=int, default=5)
    p.add_argument("--arch-lr", type=float, default=None, help="search: the architecture step's learning rate "
                   "(default: the quick preset's)")
    p.add_argument("--samples", type=int, default=8, help="random genotypes of the baseline (0: none)")
    p.add_argument("--retrain-seeds", type=int, default=1, help="retrainings of each derived genotype (seeds 0..)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    p.add_argument("--figure", type=Path, default=None, help="report: where to save the indicators' plot")
    args = p.parse_args()
    {"search": search, "retrain": retrain, "report": report}[args.step](args)


if __name__ == "__main__":
    main()
