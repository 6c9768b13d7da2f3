"""A small collapse study: vanilla DARTS against each collapse control on the embedded digits.

``python -m benchmarks.collapse_study [--epochs E] [--seeds N] [--limit L] [--max-steps S] [--threads T]``

Every configuration runs the ``quick`` search preset (digits, at-darts, C=8, 5 cells, first order) with the same
shortened budget and seeds, and the script prints, per configuration, the parameter-free edges of each derived cell
(mean over the seeds, and each seed's), the attention edges, and the dominant eigenvalue of the validation loss's
Hessian w.r.t. α after the last epoch (RobustDARTS's indicator). It is a budgeted smoke-scale study, not the papers'
50-epoch CIFAR-10 protocol: its numbers say how the controls behave on this tiny problem, nothing more.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from fastnas import runtime
from fastnas.config import SEARCH_PRESETS, SearchConfig
from fastnas.indicators import cell_counts
from fastnas.search import Search

CONFIGS = {
    "vanilla": {},
    "skip-limit 2": {"skip_limit": 2},
    "aux-skip": {"aux_skip": True},
    "beta-decay 25": {"beta_decay": 25.0},
    "alpha-noise 0.03": {"alpha_noise": 0.03},
    "early-stop": {"early_stop": True},
}


def run(name: str, overrides: dict, seed: int, args: argparse.Namespace) -> dict:
    base = {**SearchConfig().to_dict(), **SEARCH_PRESETS["quick"]}
    cfg = SearchConfig.from_dict({**base, "epochs": args.epochs, "limit": args.limit, "max_steps": args.max_steps,
                                  "seed": seed, "device": "cpu", "hessian_every": args.epochs})
    cfg = dataclasses.replace(cfg, **overrides)
    t = time.perf_counter()
    search = Search(cfg, None, progress=False)
    result = search.run()
    if search.history[-1]["indicators"]["hessian_eigenvalue"] is None:  # stopped early: the eigenvalue there
        search.epoch = args.epochs
        hessian = search._hessian()
    else:
        hessian = search.history[-1]["indicators"]["hessian_eigenvalue"]
    counts = cell_counts(result.genotype)
    return {"config": name, "seed": seed, "epochs": len(result.history), "counts": counts, "hessian": hessian,
            "valid_acc": result.valid_accuracy, "seconds": time.perf_counter() - t}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--limit", type=int, default=None, help="training images used (default: all)")
    p.add_argument("--max-steps", type=int, default=None, help="steps per epoch (default: all)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names of " + ", ".join(CONFIGS))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runtime.setup_logging(None, verbose=False)
    names = [n.strip() for n in args.configs.split(",")]
    print(f"collapse study: quick preset, {args.epochs} epochs (not 50), limit {args.limit}, max steps "
          f"{args.max_steps}, seeds 0..{args.seeds - 1}, {torch.get_num_threads()} threads")
    print(f"{'config':18} {'pf normal':>10} {'pf reduce':>10} {'att normal':>10} {'att reduce':>10} "
          f"{'Hessian':>9} {'valid':>6} {'epochs':>6}  per seed: pf normal/reduce, Hessian")
    for name in names:
        rows = [run(name, CONFIGS[name], seed, args) for seed in range(args.seeds)]
        mean = lambda f: statistics.mean(f(r) for r in rows)  # noqa: E731
        per_seed = "; ".join(f"{r['counts']['normal']['parameter_free']}/{r['counts']['reduce']['parameter_free']}, "
                             f"{r['hessian']:.3g}" for r in rows)
        print(f"{name:18} {mean(lambda r: r['counts']['normal']['parameter_free']):10.2f} "
              f"{mean(lambda r: r['counts']['reduce']['parameter_free']):10.2f} "
              f"{mean(lambda r: r['counts']['normal']['attention']):10.2f} "
              f"{mean(lambda r: r['counts']['reduce']['attention']):10.2f} {mean(lambda r: r['hessian']):9.4g} "
              f"{mean(lambda r: r['valid_acc']):6.1f} {mean(lambda r: r['epochs']):6.1f}  {per_seed} "
              f"({sum(r['seconds'] for r in rows):.0f}s)", flush=True)


if __name__ == "__main__":
    main()
