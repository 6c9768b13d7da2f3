"""Architecture search: ``python -m fastnas.search``.

DARTS's bilevel search (first or second order) over the attention-augmented space. Besides what every run writes
(fastnas.runloop), its run folder holds ``alphas.json`` (softmax weights per epoch), the derived genotype
(``genotype.json`` / ``genotype.txt``, ``normal.png`` / ``reduce.png``), ``alphas.png`` (how the weights moved) and
``analysis.txt`` (which edges chose attention). Under torchrun each process searches on its shard of both splits, the
gradients are averaged across processes and only rank 0 writes (docs/distributed.md).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from . import checkpoint, cli, distributed, indicators, runloop, runtime, seeds
from .analysis import attention_report
from .architect import Architect, weight_step
from .budget import SearchBudget
from .config import SEARCH_PRESETS, SearchConfig
from .costmodel import format_cost
from .data import search_loaders, set_epoch
from .genotype import Genotype
from .nn.plans import Execution
from .nn.plans.regions import regions_of
from .robust import Controls
from .runloop import RunLoop
from .runtime import log
from .supernet import SuperNet
from .tracking import Tracker
from .viz import alpha_heatmap, plot_alpha_history, plot_cell, plot_collapse


@dataclass
class SearchResult:
    genotype: Genotype
    history: list[dict]
    run_dir: Path | None
    valid_accuracy: float


class Search(RunLoop):
    """One search run: model, data, both optimisers and the bilevel step; resumable from its checkpoint."""

    kind, history_file, sync_what, metric = "search", "alphas.json", "alphas and weights", "valid_acc"

    def __init__(self, cfg: SearchConfig, run_dir: Path | None = None, progress: bool = True,
                 verify_sync: bool = False) -> None:
        super().__init__(cfg, run_dir, progress, verify_sync)
        self.train_loader, self.valid_loader, self.info = search_loaders(
            cfg.dataset, cfg.batch_size, cfg.train_portion, cfg.data_dir, cfg.download, cfg.seed, cfg.workers,
            cfg.limit, distributed.rank(), distributed.world_size(), cfg.image_size, cfg.skip_bad_images,
            pin_memory=self.device.type == "cuda")
        self.model = self.build_model().to(self.device, memory_format=self.memory_format)
        distributed.broadcast_module(self.model)  # every rank starts from rank 0's weights and alphas
        if cfg.compile and cfg.compile_scope == "regions":  # the plan compiles them (fastnas.nn.plans.regions)
            log.info(f"torch.compile: {regions_of(self.model.plan).regions} regions (edges and preprocessing ops), "
                     "compiled on first use")
        self.forward = self.make_forward(self.model, "the supernet" if cfg.compile_scope == "model" else None)
        self.weight_optimizer(self.model.weight_parameters())
        self.arch_scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.controls = Controls(cfg, self.model)  # collapse controls (fastnas.robust)
        self.budget = SearchBudget(cfg, self.info, self.model, self.device)  # costs, --budget (fastnas.budget)
        self.architect = Architect(self.model, self._loss, cfg.arch_lr, cfg.arch_betas, cfg.arch_weight_decay,
                                   cfg.order, cfg.momentum, cfg.weight_decay, forward=self.forward,
                                   scaler=self.arch_scaler, terms=self.controls.arch_terms,
                                   penalty=self.budget.penalty, capturable=cfg.cuda_graphs)

    # -- construction -----------------------------------------------------------------------------------------------
    def build_model(self) -> SuperNet:
        """The supernet, its plan built for the setting it runs in."""
        cfg = self.cfg
        execution = Execution(self.device.type, self.backend, self.channels_last, cfg.amp,
                              compile=cfg.compile_scope if cfg.compile else None)
        return SuperNet(cfg.C, cfg.layers, self.info.num_classes, cfg.primitives, cfg.steps, cfg.multiplier,
                        cfg.stem_multiplier, in_channels=self.info.in_channels, partial_channels=cfg.partial_channels,
                        memory_efficient=cfg.memory_efficient, plan=cfg.plan, aux_skip=cfg.aux_skip,
                        execution=execution)

    # -- state ------------------------------------------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {"arch_optimizer": self.architect.optimizer.state_dict(), "arch_scaler": self.arch_scaler.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.architect.optimizer.load_state_dict(state["arch_optimizer"])
        self.arch_scaler.load_state_dict(state["arch_scaler"])

    def history_record(self) -> dict:
        return {"primitives": list(self.model.primitives), "edges": self.model.edge_names(), "epochs": self.history}

    # -- loop -------------------------------------------------------------------------------------------------------
    def begin_epoch(self) -> None:
        self.controls.start_epoch(self.epoch)
        self._valid_iter = iter(self.valid_loader)

    def epoch_loaders(self) -> list:
        return [self.train_loader, self.valid_loader]

    def _next_valid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next validation batch, the split cycled through as often as the training split needs."""
        batch = next(self._valid_iter, None)
        if batch is None:
            self._valid_iter = iter(self.valid_loader)
            batch = next(self._valid_iter)
        return batch

    def step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The architecture step on a validation batch (after the warm-up), then the weight step on ``x``."""
        cfg = self.cfg
        architecture = self.epoch >= cfg.warmup_epochs
        xv, yv = runtime.to_device(*self._next_valid(), self.device, self.channels_last) if architecture else (x, y)
        loss, logits = self.run_compute(x, y, xv, yv)
        if architecture:
            self.watch.expect(step, "the architecture weights (alphas)", f"--arch-lr (now {cfg.arch_lr})",
                              *self.model.arch_parameters())
        return loss, logits

    def compute_step(self, x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor,
                     yv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both halves of the bilevel step with their optimiser steps (during the warm-up epochs the weight step
        alone, ``xv``/``yv`` unused)."""
        cfg = self.cfg
        if self.epoch >= cfg.warmup_epochs:
            self.architect.step(x, y, xv, yv, self.scheduler.get_last_lr()[0], self.optimizer)
        with self.controls.weight_step(self.model):
            return weight_step(self.model, self.forward, self._loss, self.optimizer, x, y, cfg.grad_clip,
                               self.model.arch_parameters(), self.scaler)

    def describe(self) -> None:
        cfg = self.cfg
        self.describe_run(f"space {cfg.primitives} ({len(self.model.primitives)} ops), C={cfg.C}, {cfg.layers} cells, "
                          f"order {cfg.order}")
        log.info(f"plan: {self.model.plan.name} ({self.model.plan.reason})")
        log.info(f"weights: {sum(p.numel() for p in self.model.weight_parameters()) / 1e6:.6f}M parameters")
        if self.controls.describe():
            log.info("collapse controls: " + "; ".join(self.controls.describe()))
        log.info(self.budget.describe())

    def evaluate_epoch(self) -> runtime.Meter:
        valid = self.held_out(self.valid_loader)
        distributed.sync_buffers(self.model)  # batch-norm statistics: the mean over ranks
        return valid

    def record(self, train: runtime.Meter, valid: runtime.Meter, lr: float, seconds: float) -> None:
        w_normal, w_reduce = self.model.arch_weights()
        genotype = self.model.genotype()
        self.history.append({
            "epoch": self.epoch, "train_loss": train.avg_loss, "train_acc": train.accuracy,
            "valid_loss": valid.avg_loss, "valid_acc": valid.accuracy, "seconds": seconds,
            "genotype": str(genotype),
            "normal": w_normal.detach().cpu().tolist(), "reduce": w_reduce.detach().cpu().tolist(),
            "indicators": indicators.epoch_indicators(genotype, (w_normal, w_reduce), self._hessian()),
            "expected_cost": self.budget.expected(self.model),
        })
        log.info(f"epoch {self.epoch}/{self.cfg.epochs}: train loss {train.avg_loss:.4f} acc {train.accuracy:.2f}% | "
                 f"valid loss {valid.avg_loss:.4f} acc {valid.accuracy:.2f}% | {train.throughput:.0f} img/s | "
                 f"{seconds:.1f}s")
        log.info(f"epoch {self.epoch} collapse indicators: " + indicators.describe(self.history[-1]["indicators"]))
        if self.history[-1]["expected_cost"]:
            log.info(f"epoch {self.epoch} expected cost: " + format_cost(self.history[-1]["expected_cost"]))
        stopped = self.controls.stop_reason(self.history, self.model.primitives)
        if stopped:
            self.history[-1]["early_stop"] = stopped
            log.info(f"early stop after epoch {self.epoch}: {stopped}")

    def stop_reason(self) -> str | None:
        return self.history[-1].get("early_stop") if self.history else None

    def track(self, tracker: Tracker) -> None:
        """The α of both cell types as heatmaps, the derived cells as pictures, the genotype as text."""
        last, edges = self.history[-1], self.model.edge_names()
        for kind, title in (("normal", "normal cell"), ("reduce", "reduction cell")):
            tracker.figure(f"alphas/{kind}", alpha_heatmap(last[kind], self.model.primitives, edges,
                                                           f"softmax weights, {title}, epoch {self.epoch}"), self.epoch)
        self.track_genotype(tracker, Genotype.parse(last["genotype"]))

    def finish(self) -> SearchResult:
        cfg = self.cfg
        if self.budget.budget:
            genotype = self.budget.derive(self.model)
            log.info(f"budget: the best-scoring genotype that fits: {format_cost(self.budget.model.cost(genotype))}")
        else:
            genotype, notes = self.controls.derive(self.model)
            for note in notes:
                log.info(f"skip limit {cfg.skip_limit} (P-DARTS): {note}")
        if self.epoch == cfg.epochs or self.stop_reason():
            self.write_final_outputs(genotype)
        return SearchResult(genotype, self.history, self.run_dir,
                            self.history[-1]["valid_acc"] if self.history else float("nan"))

    def _hessian(self) -> float | None:
        """Every ``--hessian-every`` epochs: the dominant eigenvalue of the validation loss's Hessian w.r.t. α on
        the epoch's first validation batch (the random streams are left as they were)."""
        k = self.cfg.hessian_every
        if not k or self.epoch % k:
            return None
        state = checkpoint.rng_state()
        try:
            set_epoch(self.valid_loader, self.epoch)
            x, y = runtime.to_device(*next(iter(self.valid_loader)), self.device, self.channels_last)
            return indicators.hessian_eigenvalue(self.model, self.forward, self._loss, x, y, seed=self.epoch)
        finally:
            checkpoint.set_rng_state(state)

    # -- outputs ----------------------------------------------------------------------------------------------------
    def write_final_outputs(self, genotype: Genotype) -> None:
        report = attention_report(genotype)
        log.info(f"genotype: {genotype}")
        log.info("attention analysis:\n" + report)
        if self.run_dir is None:
            return
        runtime.write_json({**genotype.to_dict(), **self.budget.record(genotype)}, self.run_dir / "genotype.json")
        if self.budget.latency is not None:
            self.budget.latency.save(self.run_dir / "latency_table.json")
        (self.run_dir / "genotype.txt").write_text(str(genotype) + "\n")
        (self.run_dir / "analysis.txt").write_text(report + "\n")
        plot_cell(genotype.normal, genotype.normal_concat, self.run_dir / "normal.png", "normal cell")
        plot_cell(genotype.reduce, genotype.reduce_concat, self.run_dir / "reduce.png", "reduction cell")
        plot_alpha_history(self.history, self.model.primitives, self.model.edge_names(), self.run_dir / "alphas.png")
        plot_collapse(self.history, self.run_dir / "collapse.png")
        log.info(f"outputs in {self.run_dir}")


# -- command line ---------------------------------------------------------------------------------------------------
COMMAND = runloop.Command(
    Search, SearchConfig, SEARCH_PRESETS,
    description="Differentiable architecture search (DARTS) over a space with CBAM attention ops. Without "
                "arguments: the 'quick' preset, a real search on the embedded digits dataset.",
    preset_help="base settings: 'darts' (DARTS paper, CIFAR-10, 2nd order), 'at-darts' (Shin and Bae: CIFAR-10, "
                "50 epochs, batch 128), 'quick' (embedded digits, minutes on a CPU); options below override it",
    hint=lambda cfg: "fastnas.search: running the 'quick' preset (a real search on the embedded digits dataset).\n"
    "  The papers' searches on CIFAR-10: python -m fastnas.search --preset at-darts --data-dir DIR\n"
    "  (or --preset darts); add --download to fetch CIFAR-10 there. See --help for every option.",
    report=lambda result: str(result.genotype),
    extra=lambda args, cfg: {} if args.seeds == 1 else {"seeds": args.seeds},
    instead=lambda args, cfg: None if args.seeds == 1 else seeds.run(args, cfg, Search),
    more_options=lambda p: p.add_argument(
        "--seeds", type=int, default=None, metavar="N",
        help="run N searches one after another (seeds SEED..SEED+N-1, each in a seed-S folder) and write what their "
             "genotypes share (seeds.txt, seeds.json, seeds.png) (default: 1)"))
build_parser = COMMAND.build_parser
config_from_args = COMMAND.config_from_args
_main = COMMAND.run  # what main runs once the options are parsed and applied (looked up at each call)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main("fastnas.search", build_parser, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
