"""Retrain a genotype from scratch: ``python -m fastnas.train --genotype PATH|NAME|STRING``.

DARTS's evaluation protocol: an :class:`~fastnas.evalnet.EvalNet` trained with SGD (cosine learning rate to 0),
an auxiliary loss, drop path rising linearly over the epochs, cutout, gradient clipping, and the test split evaluated
after every epoch. The run folder holds ``config.json``, ``log.txt``, ``metrics.json`` (one record per epoch and the
summary), ``checkpoint.pt`` (each epoch, atomic; ``--resume`` continues exactly), ``genotype.json`` and the model:
``model.safetensors`` with ``model.json`` (architecture and dataset), which :func:`fastnas.load_model` and
``python -m fastnas.evaluate RUN_DIR`` read.

Under ``torchrun --nproc_per_node=N -m fastnas.train`` the network is wrapped in ``DistributedDataParallel``; each
process trains on its shard with ``--batch-size`` images a batch (a global batch of N × batch size; the learning rate
is not scaled) and tests on its share of the test split; only rank 0 writes the run folder. ``--sync-bn`` (GPUs)
normalises with statistics over all processes.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset
from tqdm import tqdm

from . import checkpoint, cli, compilation, distributed, genotypes, rundir, runtime
from .config import TRAIN_PRESETS, TrainConfig
from .costmodel import format_cost, network_cost
from .data import (check_image_size, check_resumed_data, loader_workers, ordered_loader, seeded_loader, set_epoch,
                   shard_sampler, train_test_data)
from .errors import CheckpointError, ConfigError
from .evalnet import EvalNet, save_model
from .genotypes import check_genotype, resolve_genotype  # noqa: F401 (resolve_genotype: this module's API)
from .runtime import log

CHECKPOINT_FORMAT = 1


@dataclass
class TrainResult:
    best_test_acc: float
    final_test_acc: float
    param_count: int
    history: list[dict]
    run_dir: Path | None


class Trainer:
    """One retraining run: model, data, optimiser, schedule and the loop; resumable from its checkpoint."""

    def __init__(self, cfg: TrainConfig, run_dir: Path | None = None, progress: bool = True,
                 verify_sync: bool = False) -> None:
        cfg.validate()
        self.verify_sync = verify_sync  # under torchrun: check after each epoch that all ranks hold the same weights
        self.genotype = resolve_genotype(cfg.genotype)
        check_genotype(self.genotype, cfg.steps)
        cfg.genotype = str(self.genotype)  # the run stores the genotype itself, not where it came from
        self.cfg, self.run_dir, self.progress = cfg, run_dir, progress
        self.device = runtime.pick_device(cfg.device)
        self.backend = runtime.select_backend(cfg.backend, self.device)
        if cfg.amp == "bf16" and self.device.type == "cpu" and cfg.backend == "triton":
            raise ConfigError("--amp bf16 with the triton backend needs a GPU")
        if cfg.sync_bn and self.device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA devices: PyTorch's SyncBatchNorm does not run on the CPU")
        runtime.seed_everything(cfg.seed)
        rank, world = distributed.rank(), distributed.world_size()

        check_image_size(cfg.dataset, cfg.image_size, cfg.layers)
        workers, pin = loader_workers(cfg.dataset, cfg.workers), self.device.type == "cuda"
        train_data, test_data, self.info = train_test_data(cfg.dataset, cfg.data_dir, cfg.download, cfg.cutout,
                                                           cfg.limit, cfg.image_size, cfg.skip_bad_images, workers)
        self.train_loader = seeded_loader(train_data, cfg.batch_size,
                                          shard_sampler(range(len(train_data)), cfg.seed, rank, world), workers, pin)
        test_share = test_data if world == 1 else Subset(test_data, range(rank, len(test_data), world))
        self.test_loader = ordered_loader(test_share, cfg.eval_batch_size or cfg.batch_size, workers, pin)
        counts = torch.bincount(test_data.labels, minlength=self.info.num_classes)
        self.majority_baseline = 100.0 * float(counts.max()) / max(len(test_data), 1)  # always the commonest class
        self.model = self.build_model().to(self.device)
        self.channels_last = runtime.use_channels_last(cfg.channels_last, self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.criterion = nn.CrossEntropyLoss()
        self.train_criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.forward = self._make_forward(self.model)  # testing, and training in a single process
        self.train_forward = self.forward
        if distributed.active():
            if cfg.sync_bn:
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
                self.forward = self._make_forward(self.model)
            # DDP starts from rank 0's weights and averages the gradients in backward; batch-norm statistics are
            # averaged at the end of each epoch instead of being broadcast at each step
            ddp = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False, find_unused_parameters=cfg.auxiliary and cfg.auxiliary_weight == 0)
            self.train_forward = self._make_forward(ddp)
        self.optimizer = torch.optim.SGD(self.model.parameters(), cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        if cfg.lr_schedule == "step":  # DARTS's ImageNet schedule: epoch e trains at lr * gamma^(e // lr_step)
            self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, cfg.lr_step, gamma=cfg.lr_gamma)
        else:
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, cfg.epochs,
                                                                        eta_min=cfg.lr_min)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.epoch = 0
        self.history: list[dict] = []
        self.best_test_acc = 0.0

    # -- construction -----------------------------------------------------------------------------------------------
    def build_model(self) -> EvalNet:
        cfg, info = self.cfg, self.info
        return EvalNet(self.genotype, cfg.C, cfg.layers, info.num_classes, auxiliary=cfg.auxiliary,
                       drop_path_prob=0.0, in_channels=info.in_channels, input_size=info.image_size,
                       stem_multiplier=cfg.stem_multiplier, steps=cfg.steps, network=cfg.network)

    def _make_forward(self, model: nn.Module):
        cfg, device = self.cfg, self.device
        run = compilation.CompiledOrEager(model, "the network") if cfg.compile else model

        def forward(x: torch.Tensor):
            with runtime.autocast(cfg.amp, device):
                return run(x)
        return forward

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.criterion(logits.float(), y)

    def _train_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss: cross entropy with ``label_smoothing`` (DARTS smooths on ImageNet)."""
        return self.train_criterion(logits.float(), y)

    @property
    def param_count(self) -> int:
        """DARTS's count: every parameter but the auxiliary head's."""
        return self.model.param_count(auxiliary=False)

    # -- state ------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "kind": "train", "config": self.cfg.to_dict(), "epoch": self.epoch,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "rng": checkpoint.rng_state(), "history": self.history, "best_test_acc": self.best_test_acc,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "train":
            raise CheckpointError(f"this is a {state.get('kind')!r} checkpoint, not a train checkpoint")
        if state["config"].get("dataset") != self.cfg.dataset:
            raise CheckpointError(f"the checkpoint was trained on {state['config'].get('dataset')!r}, "
                                  f"not {self.cfg.dataset!r}")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if isinstance(self.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
                self.scheduler.T_max = self.cfg.epochs  # a resume may extend the run: the cosine spans the new total
            self.scaler.load_state_dict(state["scaler"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint does not fit this configuration: {str(exc).splitlines()[0]}") from None
        self.epoch, self.history = int(state["epoch"]), list(state["history"])
        self.best_test_acc = float(state["best_test_acc"])
        checkpoint.set_rng_state(state["rng"])

    def save_checkpoint(self) -> None:
        """Commit the epoch: the checkpoint and ``metrics.json`` together (see :func:`checkpoint.write_together`)."""
        if self.run_dir is None:
            return
        cli.commit_epoch(self.run_dir, self.epoch, {
            self.run_dir / "checkpoint.pt": checkpoint.torch_bytes(self.state_dict()),
            self.run_dir / "metrics.json": runtime.json_text({**self.summary(), "epochs": self.history}).encode()})

    # -- loop -------------------------------------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step on loss = CE(logits) + auxiliary_weight · CE(aux logits); returns (loss, logits), detached."""
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        out = self.train_forward(x)
        logits, aux = out if isinstance(out, tuple) else (out, None)
        loss = self._train_loss(logits, y)
        if aux is not None and cfg.auxiliary_weight > 0:
            loss = loss + cfg.auxiliary_weight * self._train_loss(aux, y)
        self.scaler.scale(loss).backward()
        if cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach(), logits.detach()

    def train_epoch(self) -> runtime.Meter:
        cfg = self.cfg
        self.model.train()
        self.model.drop_path_prob = cfg.drop_path_prob * self.epoch / cfg.epochs
        if distributed.active():  # each rank's draws depend on (seed, epoch, rank) alone: resume stays exact
            runtime.seed_epoch(cfg.seed, self.epoch)
        set_epoch(self.train_loader, self.epoch)
        meter = runtime.Meter()
        total = len(self.train_loader) if cfg.max_steps is None else min(cfg.max_steps, len(self.train_loader))
        bar = tqdm(self.train_loader, total=total, desc=f"train {self.epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not self.progress, dynamic_ncols=True)
        for step, (x, y) in enumerate(bar):
            if step >= total:
                break
            x, y = runtime.to_device(x, y, self.device, self.channels_last)
            loss, logits = self.train_step(x, y)
            if not math.isfinite(float(loss)):
                raise runtime.diverged("the training loss", "training", self.epoch, step, self.run_dir,
                                       f"--lr (now {cfg.lr})")
            meter.update(loss, logits, y)
            bar.set_postfix(loss=f"{meter.avg_loss:.3f}", acc=f"{meter.accuracy:.1f}",
                            img_s=f"{meter.throughput:.0f}")
        bar.close()
        distributed.reduce_meter(meter)
        distributed.sync_buffers(self.model)  # batch-norm statistics: the mean over ranks
        return meter

    def test(self) -> runtime.Meter:
        self.model.eval()
        meter = runtime.evaluate(self.forward, self.test_loader, self._loss, self.device, self.cfg.amp,
                                 self.channels_last)
        distributed.reduce_meter(meter)  # every rank tested its share: the whole test split
        return meter

    def run(self, until_epoch: int | None = None) -> TrainResult:
        """Train until ``cfg.epochs`` (or stop after ``until_epoch``, as an interrupted run would)."""
        cfg = self.cfg
        stop = cfg.epochs if until_epoch is None else min(until_epoch, cfg.epochs)
        log.info(f"train: {cfg.dataset}, C={cfg.C}, {cfg.layers} cells, auxiliary {cfg.auxiliary}, "
                 f"{cfg.epochs} epochs, batch {cfg.batch_size}, device {self.device}, backend {self.backend}, "
                 f"amp {cfg.amp}, {'channels_last' if self.channels_last else 'contiguous'} layout")
        if distributed.active():
            log.info(f"torchrun: {distributed.world_size()} processes ({torch.distributed.get_backend()}), "
                     f"batch {cfg.batch_size} per process, {cfg.batch_size * distributed.world_size()} in all"
                     f"{', SyncBatchNorm' if cfg.sync_bn else ''}")
        log.info(f"genotype: {self.genotype}")
        log.info(f"param size = {self.param_count / 1e6:.6f}MB (millions of parameters without the auxiliary head, "
                 f"as DARTS counts them; {self.model.param_count(auxiliary=True):,} with it)")
        log.info(f"cost of the deployed network: {format_cost(network_cost(self.model))}")
        while self.epoch < stop:
            lr = self.scheduler.get_last_lr()[0]
            with runtime.timed() as t:
                train = self.train_epoch()
                self.scheduler.step()
                test = self.test()
            self.epoch += 1
            self.best_test_acc = max(self.best_test_acc, test.accuracy)
            self.history.append({
                "epoch": self.epoch, "lr": lr, "drop_path_prob": self.model.drop_path_prob,
                "train_loss": train.avg_loss, "train_acc": train.accuracy, "train_img_s": train.throughput,
                "test_loss": test.avg_loss, "test_acc": test.accuracy, "best_test_acc": self.best_test_acc,
                "seconds": t["seconds"],
            })
            log.info(f"epoch {self.epoch}/{cfg.epochs}: lr {lr:.6f} drop path {self.model.drop_path_prob:.3f} | "
                     f"train loss {train.avg_loss:.4f} acc {train.accuracy:.2f}% | test loss {test.avg_loss:.4f} "
                     f"acc {test.accuracy:.2f}% (best {self.best_test_acc:.2f}%) | {train.throughput:.0f} img/s | "
                     f"{t['seconds']:.1f}s")
            if self.verify_sync:
                digest = distributed.verify_sync(self.model)
                log.info(f"verify-sync: epoch {self.epoch}: weights identical on all {distributed.world_size()} "
                         f"processes (sha256 {digest})")
            self.save_checkpoint()
            self.write_model()
        final = self.history[-1]["test_acc"] if self.history else float("nan")
        if self.epoch == cfg.epochs:
            log.info(f"final test accuracy {final:.2f}%, best {self.best_test_acc:.2f}% (majority-class baseline "
                     f"{self.majority_baseline:.2f}%), param size = {self.param_count / 1e6:.6f}MB")
        return TrainResult(self.best_test_acc, final, self.param_count, self.history, self.run_dir)

    # -- outputs ----------------------------------------------------------------------------------------------------
    def summary(self) -> dict:
        last = self.history[-1] if self.history else {}
        return {"epoch": self.epoch, "epochs": self.cfg.epochs, "finished": self.epoch == self.cfg.epochs,
                "final_test_acc": last.get("test_acc"), "best_test_acc": self.best_test_acc,
                "param_count": self.param_count, "param_size_M": round(self.param_count / 1e6, 6),
                "param_count_with_auxiliary": self.model.param_count(auxiliary=True),
                "majority_baseline_acc": self.majority_baseline}

    def write_model(self) -> None:
        """The trained model as ``fastnas.load_model`` reads it (derived from the checkpoint: a resume rewrites it)."""
        if self.run_dir is None:
            return
        self.genotype.to_json(self.run_dir / "genotype.json")
        save_model(self.model, self.run_dir, {"dataset": self.cfg.dataset, **self.summary()})


# -- command line ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = cli.new_parser(
        "python -m fastnas.train",
        "Retrain a genotype from scratch with DARTS's evaluation protocol (auxiliary head, drop path, "
        "cutout, cosine lr). Without --preset: the 'quick' preset on the embedded digits dataset.",
        TRAIN_PRESETS,
        "base settings: 'darts' (DARTS's CIFAR-10 evaluation: 600 epochs, batch 96), 'at-darts' (Shin and "
        "Bae: 600 epochs, batch 128), 'imagenet' (DARTS's ImageNet evaluation: ImageNet network, 250 epochs, "
        "step decay, label smoothing), 'quick' (embedded digits, minutes on a CPU); options below override it",
        "train")
    p.add_argument("--genotype", default=None,
                   help="a genotype.json or genotype.txt file, a search run folder, a known name "
                        f"({', '.join(genotypes.KNOWN)}) or a 'Genotype(normal=[...], ...)' string (default: DARTS_V2)")
    g = p.add_argument_group("data")
    cli.add_data_options(g)
    g.add_argument("--cutout", type=int, help="cutout square side (0: none)")
    g = p.add_argument_group("network")
    g.add_argument("--network", choices=["auto", "cifar", "imagenet"],
                   help="DARTS's CIFAR or ImageNet network (auto: ImageNet for images of 64 pixels and more)")
    g.add_argument("--C", "--init-channels", dest="C", type=int, help="initial channels")
    g.add_argument("--layers", type=int, help="number of cells")
    g.add_argument("--steps", type=int, help="intermediate nodes per cell (the genotype must have as many)")
    g.add_argument("--stem-multiplier", type=int, help="stem width as a multiple of C")
    g.add_argument("--auxiliary", action=argparse.BooleanOptionalAction, default=None,
                   help="auxiliary classifier at 2/3 depth")
    g.add_argument("--auxiliary-weight", type=float, help="weight of the auxiliary loss")
    g.add_argument("--drop-path-prob", type=float, help="drop path probability reached at the last epoch")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--eval-batch-size", type=int, help="test batch size (default: --batch-size)")
    g.add_argument("--lr", type=float, help="SGD learning rate")
    g.add_argument("--lr-schedule", choices=["cosine", "step"], help="cosine to --lr-min, or step decay")
    g.add_argument("--lr-min", type=float, help="final learning rate (cosine)")
    g.add_argument("--lr-gamma", type=float, help="step decay factor (step)")
    g.add_argument("--lr-step", type=int, help="epochs between decays (step)")
    g.add_argument("--label-smoothing", type=float, help="label smoothing of the training loss")
    g.add_argument("--momentum", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--grad-clip", type=float, help="gradient norm clip (0: none)")
    g.add_argument("--max-steps", type=int, help="stop each epoch after N steps (smoke tests)")
    g.add_argument("--seed", type=int)
    g = p.add_argument_group("engine")
    cli.add_engine_options(g, "network")
    g.add_argument("--sync-bn", action="store_true", default=None,
                   help="under torchrun: batch-norm statistics over all processes (SyncBatchNorm; needs CUDA)")
    distributed.add_cli_options(p)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return cli.config_from_args(args, TrainConfig, TRAIN_PRESETS)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main("fastnas.train", build_parser, _main, argv)


def _main(args: argparse.Namespace, argv: list[str]) -> int:
    if args.resume:
        run_dir, state, cfg, main_process = cli.resume(args, argv, TrainConfig, "train")
        trainer = Trainer(cfg, run_dir if main_process else None, progress=main_process and not args.no_progress,
                          verify_sync=args.verify_sync)
        trainer.load_state_dict(state)
        if main_process:
            rundir.claim(run_dir, resume=True)
            check_resumed_data(run_dir, trainer.info)
        log.info(f"resumed {run_dir} after epoch {trainer.epoch}")
    else:
        cfg = config_from_args(args)
        source = cfg.genotype
        main_process = runtime.setup_processes(cfg.device, args.dist_timeout, None)
        if main_process and not cli.explicit_options(argv):
            print(f"fastnas.train: running the 'quick' preset on {source} (the embedded digits dataset).\n"
                  "  Retrain a search's result: python -m fastnas.train --genotype RUN_DIR (or a genotype file, a "
                  "name, a Genotype(...) string);\n  DARTS's CIFAR-10 evaluation: --preset darts --data-dir DIR. "
                  "See --help for every option.", file=sys.stderr)
        # refuses bad input before any folder exists
        trainer = Trainer(cfg, None, progress=main_process and not args.no_progress, verify_sync=args.verify_sync)
        if main_process:  # only rank 0 makes and writes the run folder
            run_dir = cli.claim_run_dir(args, f"train-{args.preset}")
            trainer.run_dir = run_dir
            runtime.setup_logging(run_dir)
            cli.write_run_start(run_dir, {"preset": args.preset, "genotype_source": source, **cfg.to_dict()},
                                trainer.info)
    result = trainer.run()
    distributed.barrier()  # the job ends when every process has finished
    if main_process:
        print(f"test accuracy: final {result.final_test_acc:.2f}%, best {result.best_test_acc:.2f}%; "
              f"param size = {result.param_count / 1e6:.6f}MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
