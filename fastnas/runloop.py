"""The epoch loop that search and retraining share, and their command line's main.

A :class:`RunLoop` holds what both runs do the same way: device, fused-op backend, memory layout, autocast and
``--compile``; the weight optimiser and its schedule; the checkpoint with exact resume (models, optimisers, schedule,
loss scalers, random streams, history), committed with the epoch's history file; the progress bar, the stop on a
diverged loss, ``--verify-sync`` and TensorBoard. Every run folder holds ``config.json``, ``data.json``, ``log.txt``,
``checkpoint.pt`` and TensorBoard's event files. A run says what is its own through a few methods
(:meth:`RunLoop.step`, :meth:`RunLoop.evaluate_epoch`, :meth:`RunLoop.record`, :meth:`RunLoop.finish`).

The loop is written here rather than taken from Lightning Fabric or Accelerate: the bilevel step runs two optimisers
on two data streams with a finite-difference Hessian-vector product, exact resume needs every random stream and the
samplers' epoch in the checkpoint, and the fused CPU kernels need nothing of a device abstraction; what such a
library would add (device placement, AMP, DDP) is a few lines here.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from . import checkpoint, cli, compilation, cudagraph, distributed, options, rundir, runtime, tracking
from .data import check_image_size, check_resumed_data, set_epoch
from .errors import CheckpointError, ConfigError
from .runtime import log
from .tracking import Tracker
from .viz import cell_figure
from .watch import FiniteWatch

CHECKPOINT_FORMAT = 1


class RunLoop:
    """One run (a search or a retraining): set up, the epochs, the checkpoint; resumable from it."""

    kind = ""  # "search" or "train": the checkpoint's kind, the progress bar's label
    history_file = ""  # the JSON file committed with each epoch's checkpoint
    sync_what = "weights"  # what --verify-sync compares across processes
    metric = ""  # the history's held-out accuracy, TensorBoard's hyper-parameter metric

    def __init__(self, cfg: Any, run_dir: Path | None, progress: bool, verify_sync: bool) -> None:
        cfg.validate()
        self.cfg, self.run_dir, self.progress = cfg, run_dir, progress
        self.verify_sync = verify_sync  # under torchrun: check after each epoch that all ranks hold the same state
        self.device = runtime.pick_device(cfg.device)
        self.backend = runtime.select_backend(cfg.backend, self.device)
        if cfg.amp == "bf16" and self.device.type == "cpu" and cfg.backend == "triton":
            raise ConfigError("--amp bf16 with the triton backend needs a GPU")
        self.channels_last = runtime.use_channels_last(cfg.channels_last, self.device)
        self.memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        self.criterion = nn.CrossEntropyLoss()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.tensorboard: bool | None = None  # None: when tensorboard is installed (fastnas.tracking)
        self.tracker: Tracker | None = None
        self.epoch = 0
        self.history: list[dict] = []
        self.watch = FiniteWatch()  # the step's finiteness checks, read without making a step wait
        # the step's device work: replayed as a CUDA graph with --cuda-graphs, else run as it is
        self.run_compute: Callable[..., tuple[torch.Tensor, torch.Tensor]] = self.compute_step
        if cfg.cuda_graphs:
            refused = cudagraph.check_supported(self.device, cfg, distributed.active())
            if refused:
                raise ConfigError(refused)
            self.run_compute = cudagraph.GraphedStep(self.compute_step)
        runtime.seed_everything(cfg.seed)
        check_image_size(cfg.dataset, cfg.image_size, cfg.layers)  # before any image is read

    # -- what a run defines -----------------------------------------------------------------------------------------
    def step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step on a batch; returns (loss, logits), detached. Its device work goes through
        :attr:`run_compute` (by default all of it)."""
        return self.run_compute(x, y)

    def compute_step(self, *batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's device work on its tensors alone, no host reads (what ``--cuda-graphs`` captures)."""
        raise NotImplementedError

    def evaluate_epoch(self) -> runtime.Meter:
        """The held-out split's loss and accuracy after an epoch (reduced over the processes)."""
        raise NotImplementedError

    def record(self, train: runtime.Meter, held_out: runtime.Meter, lr: float, seconds: float) -> None:
        """Append the epoch to :attr:`history` and log it."""
        raise NotImplementedError

    def finish(self) -> Any:
        """After the last epoch (or a stop): the final outputs and the run's result."""
        raise NotImplementedError

    def describe(self) -> None:
        """Log what is about to run."""

    def begin_epoch(self) -> None:
        """Set what the epoch changes (drop path, collapse controls), its samplers and random streams set."""

    def epoch_loaders(self) -> list:
        return [self.train_loader]

    def stop_reason(self) -> str | None:
        """Why the run stops before its last epoch, if it does."""
        return None

    def extra_state(self) -> dict[str, Any]:
        """The run's own entries of its checkpoint."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def history_record(self) -> dict[str, Any]:
        """The content of :attr:`history_file`."""
        raise NotImplementedError

    def track(self, tracker: Tracker) -> None:
        """What the run shows in TensorBoard after an epoch beside its history's numbers."""

    # -- shared -----------------------------------------------------------------------------------------------------
    def make_forward(self, module: Callable[[torch.Tensor], Any], label: str | None = None) -> Callable:
        """``module`` run under the configured autocast; with ``--compile`` and a ``label``, compiled whole."""
        if label is not None and self.cfg.compile:
            module = compilation.CompiledOrEager(module, label)
        amp, device, cache = self.cfg.amp, self.device, not self.cfg.cuda_graphs

        def forward(x: torch.Tensor) -> Any:
            with runtime.autocast(amp, device, cache):
                return module(x)
        return forward

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.criterion(logits.float(), y)

    def weight_optimizer(self, params: Any, schedule: str = "cosine") -> None:
        """SGD on ``params`` with the cosine schedule to ``lr_min``, or ``step``: DARTS's ImageNet schedule (epoch e
        trains at lr * gamma^(e // lr_step))."""
        cfg = self.cfg
        self.optimizer = torch.optim.SGD(params, cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                         fused=True)
        if schedule == "step":
            self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, cfg.lr_step, gamma=cfg.lr_gamma)
        else:
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, cfg.epochs,
                                                                        eta_min=cfg.lr_min)

    def held_out(self, loader: Any) -> runtime.Meter:
        """The loss and accuracy of :attr:`forward` on ``loader``, reduced over the processes."""
        meter = runtime.evaluate(self.forward, loader, self._loss, self.device, self.cfg.amp, self.channels_last)
        distributed.reduce_meter(meter)
        return meter

    def describe_run(self, settings: str, processes: str = "") -> None:
        """The first lines of :meth:`describe`: the run's own ``settings``, then what every run shares; under
        torchrun the processes (``processes`` ends that line)."""
        cfg = self.cfg
        log.info(f"{self.kind}: {cfg.dataset}, {settings}, {cfg.epochs} epochs, batch {cfg.batch_size}, "
                 f"device {self.device}, backend {self.backend}, amp {cfg.amp}, "
                 f"{'channels_last' if self.channels_last else 'contiguous'} layout"
                 f"{', the step replayed as a CUDA graph' if cfg.cuda_graphs else ''}")
        if distributed.active():
            log.info(f"torchrun: {distributed.world_size()} processes ({torch.distributed.get_backend()}), "
                     f"batch {cfg.batch_size} per process, {cfg.batch_size * distributed.world_size()} in all"
                     f"{processes}")

    def track_genotype(self, tracker: Tracker, genotype: Any) -> None:
        """The genotype as text and its cells as pictures."""
        tracker.text("genotype", str(genotype), self.epoch)
        for kind, title in (("normal", "normal cell"), ("reduce", "reduction cell")):
            cell = cell_figure(getattr(genotype, kind), getattr(genotype, f"{kind}_concat"), title)
            tracker.figure(f"cells/{kind}", cell, self.epoch)

    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "kind": self.kind, "config": self.cfg.to_dict(), "epoch": self.epoch,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "rng": checkpoint.rng_state(), "history": self.history, **self.extra_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise CheckpointError(f"this is a {state.get('kind')!r} checkpoint, not a {self.kind} checkpoint")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if isinstance(self.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
                self.scheduler.T_max = self.cfg.epochs  # a resume may extend the run: the cosine spans the new total
            self.scaler.load_state_dict(state["scaler"])
            self.load_extra_state(state)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint does not fit this configuration: {str(exc).splitlines()[0]}") from None
        self.epoch, self.history = int(state["epoch"]), list(state["history"])
        checkpoint.set_rng_state(state["rng"])

    def save_checkpoint(self) -> None:
        """Commit the epoch: the checkpoint and the history file together (see :func:`checkpoint.write_together`)."""
        if self.run_dir is None:
            return
        cli.commit_epoch(self.run_dir, self.epoch, {
            self.run_dir / "checkpoint.pt": checkpoint.torch_bytes(self.state_dict()),
            self.run_dir / self.history_file: runtime.json_text(self.history_record()).encode()})

    def diverged(self, what: str, step: int, option: str) -> Exception:
        return runtime.diverged(what, "search" if self.kind == "search" else "training", self.epoch, step,
                                self.run_dir, option)

    def check_finite(self) -> None:
        """Stop the run if a value of a step so far became NaN or infinite (:class:`~fastnas.watch.FiniteWatch`)."""
        failure = self.watch.first_failure()
        if failure is not None:
            raise self.diverged(*failure)

    def train_epoch(self) -> runtime.Meter:
        cfg = self.cfg
        self.model.train()
        if distributed.active():  # each rank's draws depend on (seed, epoch, rank) alone: resume stays exact
            runtime.seed_epoch(cfg.seed, self.epoch)
        for loader in self.epoch_loaders():
            set_epoch(loader, self.epoch)
        self.begin_epoch()
        if isinstance(self.run_compute, cudagraph.GraphedStep):
            self.run_compute.recapture()  # the epoch's learning rate and schedules are numbers fixed in a graph
        compiling = cfg.compile and self.epoch == 0  # the first step compiles: say how long it took
        if compiling:
            start, cache_before = time.perf_counter(), runtime.inductor_cache_counts()
        meter = runtime.Meter()
        total = len(self.train_loader) if cfg.max_steps is None else min(cfg.max_steps, len(self.train_loader))
        bar = tqdm(self.train_loader, total=total, desc=f"{self.kind} {self.epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not self.progress, dynamic_ncols=True)
        for step, (x, y) in enumerate(bar):
            if step >= total:
                break
            x, y = runtime.to_device(x, y, self.device, self.channels_last)
            loss, logits = self.step(step, x, y)
            if compiling and step == 0:
                self._report_compilation(time.perf_counter() - start, cache_before)
            self.watch.expect(step, "the training loss", f"--lr (now {cfg.lr})", loss)
            meter.update(loss, logits, y)
            if self.watch.due():  # the only reads of the device's values during the epoch
                self.check_finite()
                bar.set_postfix(loss=f"{meter.avg_loss:.3f}", acc=f"{meter.accuracy:.1f}",
                                img_s=f"{meter.throughput:.0f}")
        bar.close()
        self.check_finite()
        distributed.reduce_meter(meter)
        return meter

    def _report_compilation(self, seconds: float, cache_before: tuple[int, int]) -> None:
        """After the first (compiling) step: how long it took and whether Inductor's on-disk cache was warm."""
        hits, misses = (a - b for a, b in zip(runtime.inductor_cache_counts(), cache_before))
        state = "warm" if misses == 0 and hits > 0 else ("cold" if hits == 0 else "partly warm")
        log.info(f"torch.compile: first {self.kind} step (compiling) took {seconds:.1f}s; "
                 f"Inductor cache {state} ({hits} hits, {misses} misses)")

    def run(self, until_epoch: int | None = None) -> Any:
        """Run until ``cfg.epochs`` (or stop after ``until_epoch``, as an interrupted run would)."""
        cfg = self.cfg
        stop = cfg.epochs if until_epoch is None else min(until_epoch, cfg.epochs)
        self.describe()
        if self.run_dir is not None and self.tracker is None:
            self.tracker = Tracker.open(self.run_dir, self.tensorboard, self.kind, cfg.to_dict(), self.metric)
        try:
            while self.epoch < stop and not self.stop_reason():
                lr = self.scheduler.get_last_lr()[0]
                with runtime.timed() as t:
                    train = self.train_epoch()
                    self.scheduler.step()
                    held_out = self.evaluate_epoch()
                self.epoch += 1
                self.record(train, held_out, lr, t["seconds"])
                if self.verify_sync:
                    digest = distributed.verify_sync(self.model, self.sync_what)
                    log.info(f"verify-sync: epoch {self.epoch}: {self.sync_what} identical on all "
                             f"{distributed.world_size()} processes (sha256 {digest})")
                self.save_checkpoint()
                if self.tracker is not None:
                    self.tracker.epoch(self.epoch, self.history[-1], {"lr": lr, "img_s": train.throughput})
                    self.track(self.tracker)
            return self.finish()
        finally:
            if self.tracker is not None:
                self.tracker.close()
                self.tracker = None


# -- the command line both share ------------------------------------------------------------------------------------
def resume(args: argparse.Namespace, argv: list[str], run_class: type, config_class: type) -> tuple[Any, bool]:
    """The run loop of ``--resume RUN_DIR`` at its last checkpoint, with the run's own configuration; returns it
    and whether this is the main process (which holds the run folder again)."""
    run_dir, state, cfg, main_process = cli.resume(args, argv, config_class, run_class.kind)
    loop = run_class(cfg, run_dir if main_process else None, progress=main_process and not args.no_progress,
                     verify_sync=args.verify_sync)
    loop.tensorboard = args.tensorboard
    loop.load_state_dict(state)
    if main_process:
        rundir.claim(run_dir, resume=True)
        check_resumed_data(run_dir, loop.info)
    log.info(f"resumed {run_dir} after epoch {loop.epoch}")
    return loop, main_process


def start(args: argparse.Namespace, argv: list[str], run_class: type, cfg: Any, extra: dict[str, Any],
          hint: str) -> tuple[Any, bool]:
    """A new run of ``cfg``: the processes, the run loop, and on the main process the run folder with
    ``config.json`` (``extra`` and the configuration) and ``data.json``. Returns the loop and whether this is the
    main process. ``hint`` is printed when no option was given."""
    main_process = runtime.setup_processes(cfg.device, args.dist_timeout, None)
    if main_process and not cli.explicit_options(argv):
        print(hint, file=sys.stderr)
    # refuses bad input (data, sizes, backend) before any folder exists
    loop = run_class(cfg, None, progress=main_process and not args.no_progress, verify_sync=args.verify_sync)
    loop.tensorboard = args.tensorboard
    if main_process:  # only rank 0 makes and writes the run folder
        loop.run_dir = cli.claim_run_dir(args, f"{run_class.kind}-{args.preset}")
        runtime.setup_logging(loop.run_dir)
        cli.write_run_start(loop.run_dir, {"preset": args.preset, **extra, **cfg.to_dict()}, loop.info)
    return loop, main_process


@dataclass(frozen=True)
class Command:
    """What ``python -m fastnas.search`` and ``python -m fastnas.train`` share: the parser (every option of the
    configuration, :mod:`fastnas.options`), the configuration of preset, file and options, ``--print-config``, a new
    run or ``--resume``, and the report printed at the end. ``extra`` adds to ``config.json``; ``instead`` may run
    something else on the resolved configuration (``--seeds``) and return its exit code."""

    run_class: type
    config_class: type
    presets: dict[str, dict[str, Any]]
    description: str
    preset_help: str
    hint: Callable[[Any], str]  # printed when no option is given
    report: Callable[[Any], str]  # the run's result, printed on stdout
    extra: Callable[[argparse.Namespace, Any], dict[str, Any]] = lambda args, cfg: {}
    instead: Callable[[argparse.Namespace, Any], int | None] = lambda args, cfg: None
    more_options: Callable[[argparse.ArgumentParser], None] = lambda parser: None

    def build_parser(self) -> argparse.ArgumentParser:
        kind = self.run_class.kind
        p = cli.new_parser(f"python -m fastnas.{kind}", self.description, self.presets, self.preset_help, kind,
                           self.config_class)
        self.more_options(p)
        distributed.add_cli_options(p)
        return p

    def main(self, argv: Sequence[str] | None = None) -> int:
        return cli.main(f"fastnas.{self.run_class.kind}", self.build_parser, self.run, argv)

    def config_from_args(self, args: argparse.Namespace) -> Any:
        return cli.config_from_args(args, self.config_class, self.presets)

    def run(self, args: argparse.Namespace, argv: list[str]) -> int:
        if args.tensorboard and not tracking.available():
            raise ConfigError("--tensorboard needs the tensorboard package: pip install 'fastnas[tensorboard]'")
        if args.resume:
            loop, main_process = resume(args, argv, self.run_class, self.config_class)
        else:
            cfg = self.config_from_args(args)
            extra = self.extra(args, cfg)
            if args.print_config:
                print(options.config_text({"preset": args.preset, **extra, **cfg.to_dict()}), end="")
                return 0
            code = self.instead(args, cfg)
            if code is not None:
                return code
            loop, main_process = start(args, argv, self.run_class, cfg, extra, self.hint(cfg))
        result = loop.run()
        distributed.barrier()  # the job ends when every process has finished
        if main_process:
            print(self.report(result))
        return 0
