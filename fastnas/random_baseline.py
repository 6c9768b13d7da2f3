"""Does the search beat random sampling? ``python -m fastnas.random_baseline --genotype RUN_DIR --samples N``.

Li and Talwalkar (2019) found that random architectures of DARTS's space, retrained the same way, come close to
DARTS's. This samples N genotypes uniformly from the same space under DARTS's derivation rules (each node takes
two distinct predecessors, each with one op other than ``none``, uniformly; reduction and normal cells
independently), retrains each and the searched genotype with the same :mod:`fastnas.train` preset and overrides
(:class:`fastnas.train.Trainer`), and reports where the searched genotype's final test accuracy falls among the
random ones. The run folder holds one ``train`` run folder per genotype (``searched``, ``random-1`` ...),
``baseline.json`` and ``baseline.txt``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import sys
from pathlib import Path
from typing import Sequence

from . import cli, config as cfgmod, options, runtime
from .config import TRAIN_PRESETS, TrainConfig
from .errors import ConfigError
from .genotype import Edge, Genotype
from .runtime import log
from .space import resolve_primitives
from .genotypes import resolve_genotype
from .train import Trainer


def sample_cell(ops: Sequence[str], steps: int, rng: random.Random) -> list[Edge]:
    """One cell: node i (inputs 0 .. i+1) takes two distinct inputs, each with an op drawn from ``ops``."""
    gene = []
    for i in range(steps):
        for src in sorted(rng.sample(range(i + 2), 2)):
            gene.append((rng.choice(list(ops)), src))
    return gene


def sample_genotype(primitives: str | Sequence[str], steps: int = 4, multiplier: int = 4,
                    rng: random.Random | None = None) -> Genotype:
    """A genotype drawn uniformly under DARTS's derivation rules from the space ``primitives``."""
    rng = rng or random.Random()
    ops = [p for p in resolve_primitives(primitives) if p != "none"]
    concat = list(range(2 + steps - multiplier, steps + 2))
    return Genotype(sample_cell(ops, steps, rng), concat, sample_cell(ops, steps, rng), concat)


def rank_of(searched: float, random_accuracies: Sequence[float]) -> dict:
    """Where ``searched`` falls: how many random genotypes it beats, ties and trails, and its percentile (the share
    of random accuracies below it, ties counted half)."""
    below = sum(a < searched for a in random_accuracies)
    ties = sum(a == searched for a in random_accuracies)
    n = len(random_accuracies)
    return {"beats": below, "ties": ties, "trails": n - below - ties,
            "percentile": 100.0 * (below + 0.5 * ties) / n if n else float("nan")}


def run_baseline(searched: str | Genotype, samples: int, train_cfg: TrainConfig, primitives: str | Sequence[str],
                 seed: int = 0, run_dir: Path | None = None, progress: bool = False,
                 first: Trainer | None = None) -> dict:
    """Retrain ``searched`` and ``samples`` random genotypes with ``train_cfg`` (its genotype replaced); returns the
    report (also written to ``run_dir`` when given). ``first``: the searched genotype's trainer, already built
    (the command builds it before it creates the run folder, so that bad data or a bad genotype leave nothing)."""
    rng = random.Random(seed)
    genotypes = [("searched", resolve_genotype(searched))]
    genotypes += [(f"random-{i + 1}", sample_genotype(primitives, train_cfg.steps, len(genotypes[0][1].normal_concat),
                                                      rng)) for i in range(samples)]
    results = []
    for name, genotype in genotypes:
        cfg = dataclasses.replace(train_cfg, genotype=str(genotype))
        trainer = first if name == "searched" and first is not None else Trainer(cfg, None, progress=progress)
        if run_dir is not None:  # each retraining's folder once its data and genotype are checked
            trainer.run_dir = run_dir / name
            trainer.run_dir.mkdir()
            runtime.write_json(trainer.cfg.to_dict(), trainer.run_dir / "config.json")
        log.info(f"random baseline: retraining {name}: {genotype}")
        result = trainer.run()
        results.append({"name": name, "genotype": str(genotype), "final_test_acc": result.final_test_acc,
                        "best_test_acc": result.best_test_acc, "param_count": result.param_count})
    searched_acc = results[0]["final_test_acc"]
    report = {"searched": results[0], "random": results[1:],
              "rank": rank_of(searched_acc, [r["final_test_acc"] for r in results[1:]]),
              "train_config": {k: v for k, v in train_cfg.to_dict().items() if k != "genotype"},
              "primitives": list(resolve_primitives(primitives)), "seed": seed}
    text = describe(report)
    log.info("random baseline:\n" + text)
    if run_dir is not None:
        runtime.write_json(report, run_dir / "baseline.json")
        (run_dir / "baseline.txt").write_text(text + "\n")
    return report


def describe(report: dict) -> str:
    accs = sorted(r["final_test_acc"] for r in report["random"])
    r = report["rank"]
    lines = [f"searched genotype: final test accuracy {report['searched']['final_test_acc']:.2f}%",
             f"{len(accs)} random genotypes: " + ", ".join(f"{a:.2f}" for a in accs) + "%",
             f"the searched genotype beats {r['beats']}, ties {r['ties']} and trails {r['trails']} of them "
             f"(percentile {r['percentile']:.0f})"]
    return "\n".join(lines)


# the fastnas.train options a baseline passes on to every retraining
RETRAINING_OPTIONS = ["dataset", "data_dir", "download", "image_size", "skip_bad_images", "limit", "workers", "C",
                      "layers", "steps", "auxiliary", "epochs", "batch_size", "lr", "cutout", "drop_path_prob",
                      "max_steps", "seed", "device", "backend", "amp", "channels_last", "compile", "threads"]


def build_parser() -> argparse.ArgumentParser:
    p = cli.new_parser("python -m fastnas.random_baseline",
                       "Retrain a searched genotype and N genotypes sampled uniformly from the same space under "
                       "DARTS's rules, with the same fastnas.train preset, and report where the searched one falls "
                       "(Li and Talwalkar, 2019).", TRAIN_PRESETS,
                       "fastnas.train preset used for every retraining; options below override it", "baseline")
    p.add_argument("--genotype", required=True,
                   help="the searched genotype: a search run folder, a genotype file, a name or a string")
    p.add_argument("--samples", type=int, default=8, help="number of random genotypes")
    p.add_argument("--space", dest="space", default=None,
                   help="space to sample from (default: the search run's --primitives, else at-darts)")
    options.add_options(p, TrainConfig, RETRAINING_OPTIONS)
    return p


def _space(genotype_spec: str, given: str | None) -> str:
    if given:
        return given
    config = Path(genotype_spec).expanduser() / "config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("primitives", "at-darts")
    return "at-darts"


def _remove_outputs(run_dir: Path) -> None:
    """What an earlier baseline left in ``run_dir`` (its report and retraining folders), for ``--overwrite``."""
    for name in ("baseline.json", "baseline.txt"):
        (run_dir / name).unlink(missing_ok=True)
    for folder in [run_dir / "searched", *run_dir.glob("random-*")]:
        if folder.is_dir():
            shutil.rmtree(folder)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main("fastnas.random_baseline", build_parser, _main, argv)


def _main(args: argparse.Namespace, argv: list[str]) -> int:
    if args.resume:
        raise ConfigError("--resume: resume each retraining in its own folder with python -m fastnas.train --resume")
    if args.samples < 1:
        raise ConfigError(f"--samples must be an integer >= 1, got {args.samples}")
    base = cfgmod.merge(TrainConfig().to_dict(), cfgmod.preset(args.preset, TRAIN_PRESETS))
    overrides = {k: getattr(args, k) for k in TrainConfig.__dataclass_fields__ if hasattr(args, k) and k != "genotype"}
    train_cfg = TrainConfig.from_dict(cfgmod.merge(base, overrides))
    train_cfg.validate()
    space = _space(args.genotype, args.space)
    resolve_primitives(space)
    searched = resolve_genotype(args.genotype)
    # the genotype and the data are checked (the searched genotype's trainer built) before anything is written
    first = Trainer(dataclasses.replace(train_cfg, genotype=str(searched)), None, progress=not args.no_progress)
    run_dir = cli.claim_run_dir(args, f"baseline-{args.preset}", resumable=False)
    if args.overwrite:
        _remove_outputs(run_dir)
    runtime.setup_logging(run_dir)
    report = run_baseline(searched, args.samples, train_cfg, space, train_cfg.seed, run_dir,
                          progress=not args.no_progress, first=first)
    print(describe(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
