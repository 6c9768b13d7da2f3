"""Retrain a genotype from scratch: ``python -m fastnas.train --genotype PATH|NAME|STRING``.

DARTS's evaluation protocol: an :class:`~fastnas.evalnet.EvalNet` trained with SGD (cosine learning rate to 0), an
auxiliary loss, drop path rising linearly over the epochs, cutout, gradient clipping, and the test split evaluated
after every epoch. Besides what every run writes (fastnas.runloop), its run folder holds ``metrics.json`` (one record
per epoch and the summary), ``genotype.json`` and the model (``model.safetensors`` with ``model.json``), which
:func:`fastnas.load_model` and ``python -m fastnas.evaluate RUN_DIR`` read. Under torchrun the network is wrapped in
``DistributedDataParallel``, each process trains and tests on its shard and only rank 0 writes (docs/distributed.md).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset

from . import distributed, runloop, runtime
from .config import TRAIN_PRESETS, TrainConfig
from .costmodel import format_cost, network_cost
from .data import EpochShuffle, loader_workers, ordered_loader, seeded_loader, train_test_data
from .errors import CheckpointError, ConfigError
from .evalnet import EvalNet
from .modelfile import save_model
from .genotypes import check_genotype, resolve_genotype  # noqa: F401 (resolve_genotype: this module's API)
from .runloop import RunLoop
from .runtime import log
from .tracking import Tracker


@dataclass
class TrainResult:
    best_test_acc: float
    final_test_acc: float
    param_count: int
    history: list[dict]
    run_dir: Path | None


class Trainer(RunLoop):
    """One retraining run: model, data, optimiser, schedule and the SGD step; resumable from its checkpoint."""

    kind, history_file, metric = "train", "metrics.json", "test_acc"

    def __init__(self, cfg: TrainConfig, run_dir: Path | None = None, progress: bool = True,
                 verify_sync: bool = False) -> None:
        super().__init__(cfg, run_dir, progress, verify_sync)
        self.genotype = resolve_genotype(cfg.genotype)
        check_genotype(self.genotype, cfg.steps)
        cfg.genotype = str(self.genotype)  # the run stores the genotype itself, not where it came from
        if cfg.sync_bn and self.device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA devices: PyTorch's SyncBatchNorm does not run on the CPU")
        rank, world = distributed.rank(), distributed.world_size()
        workers, pin = loader_workers(cfg.dataset, cfg.workers), self.device.type == "cuda"
        train_data, test_data, self.info = train_test_data(cfg.dataset, cfg.data_dir, cfg.download, cfg.cutout,
                                                           cfg.limit, cfg.image_size, cfg.skip_bad_images, workers)
        self.train_loader = seeded_loader(train_data, cfg.batch_size,
                                          EpochShuffle(range(len(train_data)), cfg.seed, rank, world), workers, pin)
        test_share = test_data if world == 1 else Subset(test_data, range(rank, len(test_data), world))
        self.test_loader = ordered_loader(test_share, cfg.eval_batch_size or cfg.batch_size, workers, pin)
        counts = torch.bincount(test_data.labels, minlength=self.info.num_classes)
        self.majority_baseline = 100.0 * float(counts.max()) / max(len(test_data), 1)  # always the commonest class
        self.model = self.build_model().to(self.device, memory_format=self.memory_format)
        # the training loss: label smoothing as DARTS on ImageNet (main and auxiliary; the test loss is plain)
        self.train_criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.forward = self.make_forward(self.model, "the network")  # testing, and training in a single process
        self.train_forward = self.forward
        if distributed.active():
            if cfg.sync_bn:
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
                self.forward = self.make_forward(self.model, "the network")
            # DDP starts from rank 0's weights and averages the gradients in backward; batch-norm statistics are
            # averaged at the end of each epoch instead of being broadcast at each step
            ddp = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False, find_unused_parameters=cfg.auxiliary and cfg.auxiliary_weight == 0)
            self.train_forward = self.make_forward(ddp, "the network")
        self.weight_optimizer(self.model.parameters(), cfg.lr_schedule)
        self.best_test_acc = 0.0

    # -- construction -----------------------------------------------------------------------------------------------
    def build_model(self) -> EvalNet:
        cfg, info = self.cfg, self.info
        return EvalNet(self.genotype, cfg.C, cfg.layers, info.num_classes, auxiliary=cfg.auxiliary,
                       drop_path_prob=0.0, in_channels=info.in_channels, input_size=info.image_size,
                       stem_multiplier=cfg.stem_multiplier, steps=cfg.steps, network=cfg.network)

    @property
    def param_count(self) -> int:
        """DARTS's count: every parameter but the auxiliary head's."""
        return self.model.param_count(auxiliary=False)

    # -- state ------------------------------------------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {"best_test_acc": self.best_test_acc}

    def load_extra_state(self, state: dict) -> None:
        if state["config"].get("dataset") != self.cfg.dataset:
            raise CheckpointError(f"the checkpoint was trained on {state['config'].get('dataset')!r}, "
                                  f"not {self.cfg.dataset!r}")
        self.best_test_acc = float(state["best_test_acc"])

    def history_record(self) -> dict:
        return {**self.summary(), "epochs": self.history}

    def save_checkpoint(self) -> None:
        """The epoch's checkpoint and ``metrics.json``, then the model derived from them as ``fastnas.load_model``
        reads it (a resume rewrites it)."""
        super().save_checkpoint()
        if self.run_dir is not None:
            self.genotype.to_json(self.run_dir / "genotype.json")
            save_model(self.model, self.run_dir, {"dataset": self.cfg.dataset, **self.summary()})

    # -- loop -------------------------------------------------------------------------------------------------------
    def compute_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step on loss = CE(logits) + auxiliary_weight · CE(aux logits); returns (loss, logits), detached."""
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        out = self.train_forward(x)
        logits, aux = out if isinstance(out, tuple) else (out, None)
        loss = self.train_criterion(logits.float(), y)
        if aux is not None and cfg.auxiliary_weight > 0:
            loss = loss + cfg.auxiliary_weight * self.train_criterion(aux.float(), y)
        self.scaler.scale(loss).backward()
        if cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach(), logits.detach()

    def begin_epoch(self) -> None:
        self.model.drop_path_prob = self.cfg.drop_path_prob * self.epoch / self.cfg.epochs

    def evaluate_epoch(self) -> runtime.Meter:
        distributed.sync_buffers(self.model)  # batch-norm statistics: the mean over ranks
        self.model.eval()
        return self.held_out(self.test_loader)  # every rank tests its share: the whole test split

    def describe(self) -> None:
        cfg = self.cfg
        self.describe_run(f"C={cfg.C}, {cfg.layers} cells, auxiliary {cfg.auxiliary}",
                          ", SyncBatchNorm" if cfg.sync_bn else "")
        log.info(f"genotype: {self.genotype}")
        log.info(f"param size = {self.param_count / 1e6:.6f}MB (millions of parameters without the auxiliary head, "
                 f"as DARTS counts them; {self.model.param_count(auxiliary=True):,} with it)")
        log.info(f"cost of the deployed network: {format_cost(network_cost(self.model))}")

    def record(self, train: runtime.Meter, test: runtime.Meter, lr: float, seconds: float) -> None:
        self.best_test_acc = max(self.best_test_acc, test.accuracy)
        self.history.append({
            "epoch": self.epoch, "lr": lr, "drop_path_prob": self.model.drop_path_prob,
            "train_loss": train.avg_loss, "train_acc": train.accuracy, "train_img_s": train.throughput,
            "test_loss": test.avg_loss, "test_acc": test.accuracy, "best_test_acc": self.best_test_acc,
            "seconds": seconds,
        })
        log.info(f"epoch {self.epoch}/{self.cfg.epochs}: lr {lr:.6f} drop path {self.model.drop_path_prob:.3f} | "
                 f"train loss {train.avg_loss:.4f} acc {train.accuracy:.2f}% | test loss {test.avg_loss:.4f} "
                 f"acc {test.accuracy:.2f}% (best {self.best_test_acc:.2f}%) | {train.throughput:.0f} img/s | "
                 f"{seconds:.1f}s")

    def track(self, tracker: Tracker) -> None:
        """The genotype as text and its cells as pictures, once a tracker (they do not change)."""
        if getattr(self, "_tracked_by", None) is not tracker:
            self._tracked_by = tracker
            self.track_genotype(tracker, self.genotype)

    def finish(self) -> TrainResult:
        final = self.history[-1]["test_acc"] if self.history else float("nan")
        if self.epoch == self.cfg.epochs:
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


# -- command line ---------------------------------------------------------------------------------------------------
COMMAND = runloop.Command(
    Trainer, TrainConfig, TRAIN_PRESETS,
    description="Retrain a genotype from scratch with DARTS's evaluation protocol (auxiliary head, drop path, "
                "cutout, cosine lr). Without --preset: the 'quick' preset on the embedded digits dataset.",
    preset_help="base settings: 'darts' (DARTS's CIFAR-10 evaluation: 600 epochs, batch 96), 'at-darts' (Shin and "
                "Bae: 600 epochs, batch 128), 'imagenet' (DARTS's ImageNet evaluation: ImageNet network, 250 "
                "epochs, step decay, label smoothing), 'quick' (embedded digits, minutes on a CPU); options below "
                "override it",
    hint=lambda cfg: f"fastnas.train: running the 'quick' preset on {cfg.genotype} (the embedded digits dataset).\n"
    "  Retrain a search's result: python -m fastnas.train --genotype RUN_DIR (or a genotype file, a name, a "
    "Genotype(...) string);\n  DARTS's CIFAR-10 evaluation: --preset darts --data-dir DIR. See --help for every "
    "option.",
    report=lambda r: f"test accuracy: final {r.final_test_acc:.2f}%, best {r.best_test_acc:.2f}%; param size = "
                     f"{r.param_count / 1e6:.6f}MB",
    extra=lambda args, cfg: {"genotype_source": cfg.genotype})
build_parser = COMMAND.build_parser
config_from_args = COMMAND.config_from_args
main = COMMAND.main


if __name__ == "__main__":
    sys.exit(main())
