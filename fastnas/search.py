"""Architecture search: ``python -m fastnas.search``.

Runs DARTS's bilevel search over the attention-augmented space (first or second order) and writes a run folder:
``config.json``, ``log.txt``, ``alphas.json`` (softmax weights per epoch), ``checkpoint.pt`` (each epoch, atomic),
``genotype.json`` / ``genotype.txt``, ``normal.png`` / ``reduce.png`` (the derived cells), ``alphas.png`` (how the
weights moved) and ``analysis.txt`` (which edges chose attention).

Under ``torchrun --nproc_per_node=N -m fastnas.search`` each process searches on its shard of both splits with
``--batch-size`` images a batch (a global batch of N × batch size; learning rates are not scaled); the weight and
architecture gradients are averaged across processes, and only rank 0 writes the run folder.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from tqdm import tqdm

from . import checkpoint, cli, compilation, distributed, indicators, rundir, runtime, seeds
from .analysis import attention_report
from .architect import Architect, weight_step
from .budget import SearchBudget
from .config import SEARCH_PRESETS, TRAIN_PRESETS, SearchConfig
from .data import check_image_size, check_resumed_data, search_loaders, set_epoch
from .errors import CheckpointError, ConfigError
from .costmodel import format_cost
from .genotype import Genotype
from .robust import Controls
from .runtime import log
from .nn.plans import Execution
from .nn.plans.regions import regions_of
from .supernet import SuperNet, check_input_size
from .viz import plot_alpha_history, plot_cell, plot_collapse

CHECKPOINT_FORMAT = 1


@dataclass
class SearchResult:
    genotype: Genotype
    history: list[dict]
    run_dir: Path | None
    valid_accuracy: float


class Search:
    """One search run: model, data, both optimisers and the loop; resumable from its checkpoint."""

    def __init__(self, cfg: SearchConfig, run_dir: Path | None = None, progress: bool = True,
                 verify_sync: bool = False) -> None:
        cfg.validate()
        self.cfg, self.run_dir, self.progress = cfg, run_dir, progress
        self.verify_sync = verify_sync  # under torchrun: check after each epoch that all ranks hold the same state
        self.device = runtime.pick_device(cfg.device)
        self.backend = runtime.select_backend(cfg.backend, self.device)
        if cfg.amp == "bf16" and self.device.type == "cpu" and cfg.backend == "triton":
            raise ConfigError("--amp bf16 with the triton backend needs a GPU")
        runtime.seed_everything(cfg.seed)

        check_image_size(cfg.dataset, cfg.image_size, cfg.layers)
        self.train_loader, self.valid_loader, self.info = search_loaders(
            cfg.dataset, cfg.batch_size, cfg.train_portion, cfg.data_dir, cfg.download, cfg.seed, cfg.workers,
            cfg.limit, distributed.rank(), distributed.world_size(), cfg.image_size, cfg.skip_bad_images,
            pin_memory=self.device.type == "cuda")
        check_input_size(self.info.image_size, self.info.image_size, cfg.layers)
        self.channels_last = runtime.use_channels_last(cfg.channels_last, self.device)
        self.model = self.build_model().to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        distributed.broadcast_module(self.model)  # every rank starts from rank 0's weights and alphas
        self.criterion = nn.CrossEntropyLoss()
        self.forward = self._make_forward()
        self.optimizer = torch.optim.SGD(self.model.weight_parameters(), cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay, fused=True)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, cfg.epochs, eta_min=cfg.lr_min)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.arch_scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.controls = Controls(cfg, self.model)  # collapse controls (fastnas.robust)
        self.budget = SearchBudget(cfg, self.info, self.model, self.device)  # costs, --budget (fastnas.budget)
        self.architect = Architect(self.model, self._loss, cfg.arch_lr, cfg.arch_betas, cfg.arch_weight_decay,
                                   cfg.order, cfg.momentum, cfg.weight_decay, forward=self.forward,
                                   scaler=self.arch_scaler, terms=self.controls.arch_terms,
                                   penalty=self.budget.penalty)
        self.epoch = 0
        self.history: list[dict] = []

    # -- construction -----------------------------------------------------------------------------------------------
    def execution(self) -> Execution:
        """The setting the supernet runs in, from which its plan is built."""
        cfg = self.cfg
        return Execution(self.device.type, self.backend, self.channels_last, cfg.amp,
                         compile=cfg.compile_scope if cfg.compile else None)

    def build_model(self) -> SuperNet:
        cfg = self.cfg
        model = SuperNet(cfg.C, cfg.layers, self.info.num_classes, cfg.primitives, cfg.steps, cfg.multiplier,
                         cfg.stem_multiplier, in_channels=self.info.in_channels,
                         partial_channels=cfg.partial_channels, memory_efficient=cfg.memory_efficient,
                         aux_skip=cfg.aux_skip, execution=self.execution())
        return model

    def _make_forward(self):
        cfg, device = self.cfg, self.device
        run = self.model
        if cfg.compile and cfg.compile_scope == "model":
            run = compilation.CompiledOrEager(self.model, "the supernet")
        elif cfg.compile:
            log.info(f"torch.compile: {regions_of(self.model.plan).regions} regions (edges and preprocessing ops), "
                     "compiled on first use")

        def forward(x: torch.Tensor) -> torch.Tensor:
            with runtime.autocast(cfg.amp, device):
                return run(x)
        return forward

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.criterion(logits.float(), y)

    # -- state ------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "kind": "search", "config": self.cfg.to_dict(), "epoch": self.epoch,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "arch_optimizer": self.architect.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "arch_scaler": self.arch_scaler.state_dict(),
            "rng": checkpoint.rng_state(), "history": self.history,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "search":
            raise CheckpointError(f"this is a {state.get('kind')!r} checkpoint, not a search checkpoint")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.architect.optimizer.load_state_dict(state["arch_optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scheduler.T_max = self.cfg.epochs  # a resume may extend the run: the cosine spans the new total
            self.scaler.load_state_dict(state["scaler"])
            self.arch_scaler.load_state_dict(state["arch_scaler"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint does not fit this configuration: {str(exc).splitlines()[0]}") from None
        self.epoch, self.history = int(state["epoch"]), list(state["history"])
        checkpoint.set_rng_state(state["rng"])

    def save_checkpoint(self) -> None:
        """Commit the epoch: the checkpoint and ``alphas.json`` together (see :func:`checkpoint.write_together`)."""
        if self.run_dir is None:
            return
        alphas = {"primitives": list(self.model.primitives), "edges": self.model.edge_names(),
                  "epochs": self.history}
        cli.commit_epoch(self.run_dir, self.epoch, {
            self.run_dir / "checkpoint.pt": checkpoint.torch_bytes(self.state_dict()),
            self.run_dir / "alphas.json": runtime.json_text(alphas).encode()})

    # -- loop -------------------------------------------------------------------------------------------------------
    def train_epoch(self) -> runtime.Meter:
        cfg = self.cfg
        self.model.train()
        self.controls.start_epoch(self.epoch)
        if distributed.active():  # each rank's draws depend on (seed, epoch, rank) alone: resume stays exact
            runtime.seed_epoch(cfg.seed, self.epoch)
        set_epoch(self.train_loader, self.epoch)
        set_epoch(self.valid_loader, self.epoch)
        valid_iter = iter(self.valid_loader)
        lr = self.scheduler.get_last_lr()[0]
        meter = runtime.Meter()
        total = len(self.train_loader) if cfg.max_steps is None else min(cfg.max_steps, len(self.train_loader))
        bar = tqdm(self.train_loader, total=total, desc=f"search {self.epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not self.progress, dynamic_ncols=True)
        self._step_start = time.perf_counter()
        self._cache_before = runtime.inductor_cache_counts()
        for step, (x, y) in enumerate(bar):
            if step >= total:
                break
            x, y = runtime.to_device(x, y, self.device, self.channels_last)
            if self.epoch >= cfg.warmup_epochs:
                try:
                    xv, yv = next(valid_iter)
                except StopIteration:
                    valid_iter = iter(self.valid_loader)
                    xv, yv = next(valid_iter)
                xv, yv = runtime.to_device(xv, yv, self.device, self.channels_last)
                self.architect.step(x, y, xv, yv, lr, self.optimizer)
                if not all(bool(torch.isfinite(a).all()) for a in self.model.arch_parameters()):
                    raise runtime.diverged("the architecture weights (alphas)", "search", self.epoch, step,
                                           self.run_dir, f"--arch-lr (now {cfg.arch_lr})")
            with self.controls.weight_step(self.model):
                loss, logits = weight_step(self.model, self.forward, self._loss, self.optimizer, x, y,
                                           cfg.grad_clip, self.model.arch_parameters(), self.scaler)
            if not math.isfinite(float(loss)):
                raise runtime.diverged("the training loss", "search", self.epoch, step, self.run_dir,
                                       f"--lr (now {cfg.lr})")
            if cfg.compile and self.epoch == 0 and step == 0:
                self._report_compilation()
            meter.update(loss, logits, y)
            bar.set_postfix(loss=f"{meter.avg_loss:.3f}", acc=f"{meter.accuracy:.1f}",
                            img_s=f"{meter.throughput:.0f}")
        bar.close()
        self.scheduler.step()
        distributed.reduce_meter(meter)
        return meter

    def _report_compilation(self) -> None:
        """After the first (compiling) step: how long it took and whether Inductor's on-disk cache was warm."""
        hits, misses = (a - b for a, b in zip(runtime.inductor_cache_counts(), self._cache_before))
        state = "warm" if misses == 0 and hits > 0 else ("cold" if hits == 0 else "partly warm")
        log.info(f"torch.compile: first search step (compiling) took {time.perf_counter() - self._step_start:.1f}s; "
                 f"Inductor cache {state} ({hits} hits, {misses} misses)")

    def run(self, until_epoch: int | None = None) -> SearchResult:
        """Search until ``cfg.epochs`` (or stop after ``until_epoch``, as an interrupted run would)."""
        cfg = self.cfg
        stop = cfg.epochs if until_epoch is None else min(until_epoch, cfg.epochs)
        log.info(f"search: {cfg.dataset}, space {cfg.primitives} ({len(self.model.primitives)} ops), C={cfg.C}, "
                 f"{cfg.layers} cells, order {cfg.order}, {cfg.epochs} epochs, batch {cfg.batch_size}, "
                 f"device {self.device}, backend {self.backend}, amp {cfg.amp}, "
                 f"{'channels_last' if self.channels_last else 'contiguous'} layout")
        if distributed.active():
            log.info(f"torchrun: {distributed.world_size()} processes ({torch.distributed.get_backend()}), "
                     f"batch {cfg.batch_size} per process, {cfg.batch_size * distributed.world_size()} in all")
        log.info(f"plan: {self.model.plan.name} ({self.model.plan.reason})")
        log.info(f"weights: {sum(p.numel() for p in self.model.weight_parameters()) / 1e6:.6f}M parameters")
        if self.controls.describe():
            log.info("collapse controls: " + "; ".join(self.controls.describe()))
        log.info(self.budget.describe())
        valid = None
        stopped = self.history[-1].get("early_stop") if self.history else None
        while self.epoch < stop and not stopped:
            with runtime.timed() as t:
                train = self.train_epoch()
                valid = runtime.evaluate(self.forward, self.valid_loader, self._loss, self.device, cfg.amp,
                                         self.channels_last)
                distributed.reduce_meter(valid)
                distributed.sync_buffers(self.model)  # batch-norm statistics: the mean over ranks
            self.epoch += 1
            w_normal, w_reduce = self.model.arch_weights()
            genotype = self.model.genotype()
            self.history.append({
                "epoch": self.epoch, "train_loss": train.avg_loss, "train_acc": train.accuracy,
                "valid_loss": valid.avg_loss, "valid_acc": valid.accuracy, "seconds": t["seconds"],
                "genotype": str(genotype),
                "normal": w_normal.detach().cpu().tolist(), "reduce": w_reduce.detach().cpu().tolist(),
                "indicators": indicators.epoch_indicators(genotype, (w_normal, w_reduce), self._hessian()),
                "expected_cost": self.budget.expected(self.model),
            })
            log.info(f"epoch {self.epoch}/{cfg.epochs}: train loss {train.avg_loss:.4f} acc {train.accuracy:.2f}% | "
                     f"valid loss {valid.avg_loss:.4f} acc {valid.accuracy:.2f}% | {train.throughput:.0f} img/s | "
                     f"{t['seconds']:.1f}s")
            log.info(f"epoch {self.epoch} collapse indicators: "
                     + indicators.describe(self.history[-1]["indicators"]))
            if self.history[-1]["expected_cost"]:
                log.info(f"epoch {self.epoch} expected cost: " + format_cost(self.history[-1]["expected_cost"]))
            stopped = self.controls.stop_reason(self.history, self.model.primitives)
            if stopped:
                self.history[-1]["early_stop"] = stopped
                log.info(f"early stop after epoch {self.epoch}: {stopped}")
            if self.verify_sync:
                digest = distributed.verify_sync(self.model, "alphas and weights")
                log.info(f"verify-sync: epoch {self.epoch}: alphas and weights identical on all "
                         f"{distributed.world_size()} processes (sha256 {digest})")
            self.save_checkpoint()
        if self.budget.budget:
            genotype = self.budget.derive(self.model)
            log.info(f"budget: the best-scoring genotype that fits: {format_cost(self.budget.model.cost(genotype))}")
        else:
            genotype, notes = self.controls.derive(self.model)
            for note in notes:
                log.info(f"skip limit {cfg.skip_limit} (P-DARTS): {note}")
        if self.epoch == cfg.epochs or stopped:
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
def build_parser() -> argparse.ArgumentParser:
    p = cli.new_parser(
        "python -m fastnas.search",
        "Differentiable architecture search (DARTS) over a space with CBAM attention ops. "
        "Without arguments: the 'quick' preset, a real search on the embedded digits dataset.",
        SEARCH_PRESETS,
        "base settings: 'darts' (DARTS paper, CIFAR-10, 2nd order), 'at-darts' (Shin and Bae: CIFAR-10, 50 "
        "epochs, batch 128), 'quick' (embedded digits, minutes on a CPU); options below override it",
        "search")
    g = p.add_argument_group("data")
    cli.add_data_options(g)
    g.add_argument("--train-portion", type=float, help="fraction of the training set for the weights (rest: alphas)")
    g = p.add_argument_group("search space and network")
    g.add_argument("--primitives", help="space name (darts, at-darts) or comma-separated op names")
    g.add_argument("--C", "--init-channels", dest="C", type=int, help="initial channels")
    g.add_argument("--layers", type=int, help="number of cells")
    g.add_argument("--steps", type=int, help="intermediate nodes per cell")
    g.add_argument("--multiplier", type=int, help="nodes concatenated into the cell output")
    g.add_argument("--stem-multiplier", type=int, help="stem width as a multiple of C")
    g = p.add_argument_group("optimisation")
    g.add_argument("--order", type=int, choices=[1, 2], help="first- or second-order architecture gradient")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float, help="weight SGD learning rate (cosine-annealed)")
    g.add_argument("--lr-min", type=float, help="final weight learning rate")
    g.add_argument("--momentum", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--grad-clip", type=float, help="weight gradient norm clip")
    g.add_argument("--arch-lr", type=float, help="architecture Adam learning rate")
    g.add_argument("--arch-weight-decay", type=float)
    g.add_argument("--warmup-epochs", type=int, help="epochs of weight-only steps before alphas move")
    g.add_argument("--max-steps", type=int, help="stop each epoch after N steps (smoke tests)")
    g.add_argument("--seed", type=int)
    g = p.add_argument_group("engine")
    cli.add_engine_options(g, "supernet")
    g.add_argument("--partial-channels", type=int, help="PC-DARTS: sample 1/K of the channels on each edge")
    g.add_argument("--compile-scope", choices=["regions", "model"],
                   help="with --compile: regions (default) compiles the candidates of each edge as one region, "
                        "so that repeated edges share compiled code (under 1.5 min cold for the full supernet on 2 "
                        "CPU cores); model compiles the whole supernet as one program (about half an hour there)")
    g.add_argument("--darts-memory", dest="memory_efficient", action="store_false", default=None,
                   help="store every activation as the DARTS formulation does (no recomputation, no shared ReLU); "
                        "for comparison")
    g = p.add_argument_group("collapse controls", "against DARTS's collapse into parameter-free cells; all off by "
                             "default (fastnas.robust, docs in the README)")
    g.add_argument("--skip-limit", type=int, metavar="N",
                   help="P-DARTS: the derived normal cell keeps at most N skip_connect edges (the weakest replaced by "
                        "the next-best choice)")
    g.add_argument("--aux-skip", action="store_true", default=None,
                   help="DARTS-: an auxiliary skip on every edge (a factorized reduction at stride 2), "
                        "coefficient decaying linearly 1 -> 0")
    g.add_argument("--beta-decay", type=float, metavar="LAMBDA",
                   help="beta-DARTS: Beta-Decay regularisation of the logits, coefficient rising linearly 0 -> LAMBDA")
    g.add_argument("--alpha-noise", type=float, metavar="EPS",
                   help="SDARTS-RS: U(-e, e) on the softmax weights in the weight step, e rising linearly "
                        "0.03 -> EPS over the search (SDARTS's code: 0.3)")
    g.add_argument("--early-stop", action="store_true", default=None,
                   help="DARTS+: stop at two skip connections in the normal cell or a ranking of the alphas "
                        "unchanged for --early-stop-patience epochs")
    g.add_argument("--early-stop-patience", type=int, metavar="K", help="DARTS+'s epochs of unchanged ranking")
    g.add_argument("--hessian-every", type=int, metavar="K",
                   help="every K epochs, the dominant eigenvalue of the validation loss's Hessian w.r.t. alpha "
                        "(RobustDARTS's indicator; 0: off)")
    g.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="run N searches one after another (seeds SEED..SEED+N-1, each in a seed-S folder) and write "
                        "what their genotypes share (seeds.txt, seeds.json, seeds.png)")
    g = p.add_argument_group("budget", "search for a network of bounded cost (fastnas.budget; docs/budgets.md)")
    g.add_argument("--budget", action="append", metavar="METRIC=VALUE",
                   help="params=3.0M, madds=500M or latency=8ms (repeat or comma-separate for several): a penalty in "
                        "the architecture loss, and the derived genotype is the best-scoring one that fits")
    g.add_argument("--budget-penalty", choices=["mul#log", "add#linear"],
                   help="ProxylessNAS's forms: CE*alpha*(log E[c]/log T)^beta, or CE + lambda*max(0, E[c]/T - 1)")
    g.add_argument("--budget-alpha", type=float, help="mul#log's alpha (ProxylessNAS: 0.2)")
    g.add_argument("--budget-beta", type=float, help="mul#log's beta (ProxylessNAS: 0.3)")
    g.add_argument("--budget-lambda", type=float, help="add#linear's lambda (ProxylessNAS: 0.1)")
    g.add_argument("--deploy", choices=sorted(TRAIN_PRESETS),
                   help="retraining preset whose network is costed (default: quick for digits, else darts)")
    g.add_argument("--deploy-C", dest="deploy_C", type=int, help="the costed network's C")
    g.add_argument("--deploy-layers", type=int, help="the costed network's number of cells")
    g.add_argument("--deploy-network", choices=["auto", "cifar", "imagenet"], help="the costed network's kind")
    g.add_argument("--latency-table", metavar="FILE", help="a latency_table.json to cost latency with")
    distributed.add_cli_options(p)
    return p


def config_from_args(args: argparse.Namespace) -> SearchConfig:
    if isinstance(args.budget, list):  # --budget given several times
        args.budget = ",".join(args.budget)
    return cli.config_from_args(args, SearchConfig, SEARCH_PRESETS)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main("fastnas.search", build_parser, _main, argv)


def _main(args: argparse.Namespace, argv: list[str]) -> int:
    if args.seeds != 1 and not args.resume:
        return _main_seeds(args)
    if args.resume:
        run_dir, state, cfg, main_process = cli.resume(args, argv, SearchConfig, "search")
        search = Search(cfg, run_dir if main_process else None, progress=main_process and not args.no_progress,
                        verify_sync=args.verify_sync)
        search.load_state_dict(state)
        if main_process:
            rundir.claim(run_dir, resume=True)
            check_resumed_data(run_dir, search.info)
        log.info(f"resumed {run_dir} after epoch {search.epoch}")
    else:
        cfg = config_from_args(args)
        cfg.validate()
        main_process = runtime.setup_processes(cfg.device, args.dist_timeout, None)
        if main_process and not cli.explicit_options(argv):
            print("fastnas.search: running the 'quick' preset (a real search on the embedded digits dataset).\n"
                  "  The papers' searches on CIFAR-10: python -m fastnas.search --preset at-darts --data-dir DIR\n"
                  "  (or --preset darts); add --download to fetch CIFAR-10 there. See --help for every option.",
                  file=sys.stderr)
        # refuses bad input (data, sizes, backend) before any folder exists
        search = Search(cfg, None, progress=main_process and not args.no_progress, verify_sync=args.verify_sync)
        if main_process:  # only rank 0 makes and writes the run folder
            search.run_dir = cli.claim_run_dir(args, f"search-{args.preset}")
            runtime.setup_logging(search.run_dir)
            cli.write_run_start(search.run_dir, {"preset": args.preset, **cfg.to_dict()}, search.info)
    result = search.run()
    distributed.barrier()  # the job ends when every process has finished
    if main_process:
        print(str(result.genotype))
    return 0


def _main_seeds(args: argparse.Namespace) -> int:
    """``--seeds N``: N searches of one configuration, one after another, and their summary (:mod:`fastnas.seeds`)."""
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be an integer >= 1, got {args.seeds}")
    cfg = config_from_args(args)
    cfg.validate()
    main_process = runtime.setup_processes(cfg.device, args.dist_timeout, None)
    run_dir, results, folders = None, [], []
    for i in range(args.seeds):
        one = dataclasses.replace(cfg, seed=cfg.seed + i)
        one.validate()
        search = Search(one, None, progress=main_process and not args.no_progress, verify_sync=args.verify_sync)
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
        summary = seeds.write_summary(run_dir, results, folders)
        log.info(f"seeds: summary of {args.seeds} searches in {run_dir}\n" + seeds.report(summary))
        for seed, genotype in results:
            print(f"seed {seed}: {genotype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
