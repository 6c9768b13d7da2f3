"""Run configurations and their presets, shared by search and retraining."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .errors import ConfigError


def _to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# Rules shared by every configuration class: a field that a class has is checked by its rule (option name,
# predicate, what is expected). Numbers must be finite: a NaN or infinite learning rate would run and write a
# meaningless result.
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "epochs": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "batch_size": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "eval_batch_size": (lambda v: v is None or (_integer(v) and v >= 1), "an integer >= 1"),
    "C": (lambda v: _integer(v) and v >= 2 and v % 2 == 0, "an even integer >= 2"),
    "layers": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "steps": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "stem_multiplier": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "limit": (lambda v: v is None or (_integer(v) and v >= 1), "an integer >= 1"),
    "max_steps": (lambda v: v is None or (_integer(v) and v >= 1), "an integer >= 1"),
    "workers": (lambda v: v is None or (_integer(v) and v >= 0), "an integer >= 0"),
    "threads": (lambda v: v is None or (_integer(v) and v >= 1), "an integer >= 1"),
    "dataset": (lambda v: v in ("digits", "cifar10", "cifar100", "folder"), "digits, cifar10, cifar100 or folder"),
    "image_size": (lambda v: v is None or (_integer(v) and v >= 1), "an integer >= 1"),
    "skip_bad_images": (lambda v: isinstance(v, bool), "true or false"),
    "seed": (lambda v: _integer(v) and 0 <= v < 2 ** 63, "an integer in [0, 2^63)"),
    "lr": (lambda v: _number(v) and v > 0, "a finite number > 0"),
    "lr_min": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    "momentum": (lambda v: _number(v) and 0 <= v < 1, "a finite number in [0, 1)"),
    "weight_decay": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    "grad_clip": (lambda v: _number(v) and v >= 0, "a finite number >= 0 (0: no clipping)"),
    "arch_lr": (lambda v: _number(v) and v > 0, "a finite number > 0"),
    "arch_weight_decay": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    "arch_betas": (lambda v: len(v) == 2 and all(_number(b) and 0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "warmup_epochs": (lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    "partial_channels": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "auxiliary_weight": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    "drop_path_prob": (lambda v: _number(v) and 0 <= v < 1, "a finite number in [0, 1)"),
    "cutout": (lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    "amp": (lambda v: v in ("off", "bf16", "fp16"), "off, bf16 or fp16"),
    "network": (lambda v: v in ("auto", "cifar", "imagenet"), "auto, cifar or imagenet"),
    "label_smoothing": (lambda v: _number(v) and 0 <= v < 1, "a finite number in [0, 1)"),
    "lr_schedule": (lambda v: v in ("cosine", "step"), "cosine or step"),
    "lr_gamma": (lambda v: _number(v) and 0 < v <= 1, "a finite number in (0, 1]"),
    "lr_step": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "device": (lambda v: device_ok(v), "auto, cpu, cuda or cuda:N"),
    # collapse controls and indicators (fastnas.robust, fastnas.indicators)
    "skip_limit": (lambda v: v is None or (_integer(v) and v >= 0), "an integer >= 0"),
    "beta_decay": (lambda v: _number(v) and v >= 0, "a finite number >= 0 (0: off)"),
    "alpha_noise": (lambda v: _number(v) and 0 <= v <= 1, "a finite number in [0, 1] (0: off)"),
    "early_stop_patience": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "hessian_every": (lambda v: _integer(v) and v >= 0, "an integer >= 0 (0: off)"),
    # search within a budget (fastnas.budget)
    "budget_penalty": (lambda v: v in ("mul#log", "add#linear"), "mul#log or add#linear"),
    "budget_alpha": (lambda v: _number(v) and v > 0, "a finite number > 0"),
    "budget_beta": (lambda v: _number(v) and v > 0, "a finite number > 0"),
    "budget_lambda": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    "deploy_C": (lambda v: v is None or (_integer(v) and v >= 2 and v % 2 == 0), "an even integer >= 2"),
    "deploy_layers": (lambda v: v is None or (_integer(v) and v >= 1), "an integer >= 1"),
    "deploy_network": (lambda v: v in (None, "auto", "cifar", "imagenet"), "auto, cifar or imagenet"),
}


def device_ok(name: Any) -> bool:
    """Whether ``name`` names a device: ``auto`` or what ``torch.device`` accepts of cpu and cuda."""
    if name == "auto":
        return True
    try:
        return torch.device(name).type in ("cpu", "cuda")
    except (RuntimeError, TypeError, ValueError):
        return False


def check_fields(cfg: Any) -> None:
    """Apply :data:`_RULES` to the fields ``cfg`` has; a ConfigError names the first bad option."""
    names = {f.name for f in dataclasses.fields(cfg)}
    for name, (ok, expected) in _RULES.items():
        if name in names and not ok(getattr(cfg, name)):
            raise ConfigError(f"--{name.replace('_', '-')} must be {expected}, got {getattr(cfg, name)!r}")


def _check_keys(cls: type, d: dict[str, Any]) -> None:
    """Refuse configuration keys that ``cls`` does not have (a config file from another version, a typo)."""
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"unknown configuration keys: {', '.join(sorted(unknown))}")


@dataclass
class SearchConfig:
    """Every knob of a search. Defaults are DARTS's (Liu et al., 2018) where it has one."""

    dataset: str = "cifar10"
    data_dir: str | None = None
    download: bool = False
    limit: int | None = None  # keep only the first N training images (smoke tests)
    image_size: int | None = None  # --dataset folder: the network's input side (default 32)
    skip_bad_images: bool = False  # --dataset folder: leave unreadable image files out instead of refusing
    primitives: str = "at-darts"
    C: int = 16
    layers: int = 8
    steps: int = 4
    multiplier: int = 4
    stem_multiplier: int = 3
    epochs: int = 50
    batch_size: int = 64
    lr: float = 0.025
    lr_min: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    arch_lr: float = 3e-4
    arch_betas: tuple[float, float] = (0.5, 0.999)
    arch_weight_decay: float = 1e-3
    train_portion: float = 0.5
    order: int = 1
    warmup_epochs: int = 0  # epochs of weight steps only, before the architecture starts to move
    seed: int = 2
    workers: int | None = None  # None: 0 for in-memory datasets, a few for folders (data.loader_workers)
    threads: int | None = None  # CPU threads of PyTorch's kernels; a run records the count it used (it changes bits)
    device: str = "auto"
    backend: str = "auto"
    amp: str = "off"
    channels_last: bool | None = None  # None: auto (channels_last on the CPU, where it is about 1.4-1.8x faster)
    compile: bool = False
    compile_scope: str = "regions"  # regions: each edge compiled as one region (fastnas.compilation); model: whole
    partial_channels: int = 1
    memory_efficient: bool = True  # fastnas's memory plan; False stores every activation as DARTS does
    max_steps: int | None = None  # stop each epoch after this many steps (smoke tests)
    # collapse controls (fastnas.robust), all off by default
    skip_limit: int | None = None  # P-DARTS: at most N skip_connect edges in the derived normal cell
    aux_skip: bool = False  # DARTS-: auxiliary skip on every edge, its coefficient decaying 1 -> 0
    beta_decay: float = 0.0  # beta-DARTS: Beta-Decay regularisation of the logits, coefficient ramped 0 -> this
    alpha_noise: float = 0.0  # SDARTS-RS: U(-e, e) on the softmax weights in the weight step, e: 0.03 -> this
    early_stop: bool = False  # DARTS+: stop at two skip connections in the normal cell or a stable ranking
    early_stop_patience: int = 10  # DARTS+: epochs without a change of the ranking of the alphas
    # collapse indicators (fastnas.indicators)
    hessian_every: int = 0  # dominant eigenvalue of the validation loss's Hessian w.r.t. alpha every k epochs
    # search within a budget (fastnas.budget): the cost is of the retraining preset's network (deploy)
    budget: str | None = None  # e.g. "params=3.0M,madds=500M,latency=8ms"
    budget_penalty: str = "mul#log"  # ProxylessNAS's forms: mul#log or add#linear
    budget_alpha: float = 0.2  # mul#log: CE * alpha * (log E[c] / log T)^beta (ProxylessNAS's defaults)
    budget_beta: float = 0.3
    budget_lambda: float = 0.1  # add#linear: CE + lambda * max(0, E[c] / T - 1)
    deploy: str | None = None  # retraining preset costed (default: quick for digits, else darts)
    deploy_C: int | None = None
    deploy_layers: int | None = None
    deploy_network: str | None = None
    latency_table: str | None = None  # a latency_table.json to cost latency with

    to_dict = _to_dict

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SearchConfig":
        _check_keys(cls, d)
        d = dict(d)
        if "arch_betas" in d:
            d["arch_betas"] = tuple(d["arch_betas"])
        return cls(**d)

    def validate(self) -> None:
        check_fields(self)
        checks = [
            (self.order in (1, 2), f"--order must be 1 or 2, got {self.order}"),
            (_number(self.train_portion) and 0.0 < self.train_portion < 1.0,
             f"--train-portion must be in (0, 1), got {self.train_portion}"),
            (1 <= self.multiplier <= self.steps,
             f"--multiplier must be between 1 and --steps ({self.steps}), got {self.multiplier}"),
            (self.compile_scope in ("regions", "model"),
             f"--compile-scope must be regions or model, got {self.compile_scope!r}"),
            (not (self.order == 2 and self.amp == "fp16"),
             "--order 2 with --amp fp16 is refused: the finite-difference Hessian-vector product needs more range "
             "than fp16 gives; use --amp bf16 or --order 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


SEARCH_PRESETS: dict[str, dict[str, Any]] = {
    # DARTS (Liu et al., 2018), second order: the setting of its best CIFAR-10 cell
    "darts": dict(dataset="cifar10", primitives="darts", epochs=50, batch_size=64, order=2),
    # Shin and Bae: DARTS + channel/spatial attention, 50 epochs, batch 128, SGD 0.025 / 0.9 / 3e-4
    "at-darts": dict(dataset="cifar10", primitives="at-darts", epochs=50, batch_size=128, lr=0.025,
                     momentum=0.9, weight_decay=3e-4, order=2),
    # a real search on the embedded digits, a few minutes on 2 CPU cores
    "quick": dict(dataset="digits", primitives="at-darts", C=8, layers=5, epochs=10, batch_size=64,
                  arch_lr=3e-3, order=1),
}


def preset(name: str, presets: dict[str, dict[str, Any]] = SEARCH_PRESETS) -> dict[str, Any]:
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    return dict(presets[name])


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated with the overrides that were given (None means not given)."""
    out = dict(base)
    out.update({k: v for k, v in overrides.items() if v is not None})
    return out




@dataclass
class TrainConfig:
    """Every knob of retraining a genotype (``python -m fastnas.train``). Defaults are DARTS's CIFAR-10 evaluation."""

    genotype: str = "DARTS_V2"  # a known name, a Genotype(...) string or the JSON of one (runs store the string)
    dataset: str = "cifar10"
    data_dir: str | None = None
    download: bool = False
    limit: int | None = None  # keep only the first N training images (smoke tests)
    image_size: int | None = None  # --dataset folder: the network's input side (default 32)
    skip_bad_images: bool = False  # --dataset folder: leave unreadable image files out instead of refusing
    network: str = "auto"  # cifar, imagenet, or auto: imagenet for images of 64 pixels and more (fastnas.evalnet)
    C: int = 36
    layers: int = 20
    steps: int = 4  # intermediate nodes per cell the genotype must have
    stem_multiplier: int = 3
    auxiliary: bool = True
    auxiliary_weight: float = 0.4
    drop_path_prob: float = 0.2  # reached at the end; epoch e (from 0) uses drop_path_prob * e / epochs
    cutout: int = 16  # side of the cutout square, 0 for none
    epochs: int = 600
    batch_size: int = 96
    eval_batch_size: int | None = None  # default: batch_size
    lr: float = 0.025
    lr_schedule: str = "cosine"  # cosine: to lr_min at the last epoch; step: times lr_gamma every lr_step epochs
    lr_min: float = 0.0
    lr_gamma: float = 0.97
    lr_step: int = 1
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    label_smoothing: float = 0.0  # of the training loss (main and auxiliary); the test loss is plain
    seed: int = 0
    workers: int | None = None  # None: 0 for in-memory datasets, a few for folders (data.loader_workers)
    threads: int | None = None  # CPU threads of PyTorch's kernels; a run records the count it used (it changes bits)
    device: str = "auto"
    backend: str = "auto"
    amp: str = "off"
    channels_last: bool | None = None  # None: auto (channels_last on the CPU, where it is about 1.4-1.8x faster)
    compile: bool = False
    sync_bn: bool = False  # under torchrun: SyncBatchNorm (CUDA only)
    max_steps: int | None = None  # stop each epoch after this many steps (smoke tests)

    to_dict = _to_dict

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        _check_keys(cls, d)
        return cls(**d)

    def validate(self) -> None:
        check_fields(self)


TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # DARTS's CIFAR-10 evaluation: 20 cells of C=36, 600 epochs, batch 96, cosine from 0.025, cutout 16,
    # drop path 0.2, auxiliary weight 0.4, grad clip 5
    "darts": dict(dataset="cifar10", C=36, layers=20, epochs=600, batch_size=96, lr=0.025, momentum=0.9,
                  weight_decay=3e-4, cutout=16, drop_path_prob=0.2, auxiliary=True, auxiliary_weight=0.4,
                  grad_clip=5.0),
    # Shin and Bae's retraining: DARTS's, with batch 128
    "at-darts": dict(dataset="cifar10", C=36, layers=20, epochs=600, batch_size=128, lr=0.025, momentum=0.9,
                     weight_decay=3e-4, cutout=16, drop_path_prob=0.2, auxiliary=True, auxiliary_weight=0.4,
                     grad_clip=5.0),
    # the embedded digits, a few minutes on 2 CPU cores
    "quick": dict(dataset="digits", C=16, layers=8, epochs=30, batch_size=64, lr=0.05, cutout=0,
                  drop_path_prob=0.1, auxiliary=True, auxiliary_weight=0.4),
    # DARTS's ImageNet evaluation (train_imagenet.py) on an image folder: the ImageNet network of 14 cells of C=48,
    # 250 epochs, batch 128, SGD 0.1 / 0.9 / 3e-5 decayed by 0.97 every epoch, label smoothing 0.1, auxiliary
    # weight 0.4, grad clip 5, no drop path, no cutout
    "imagenet": dict(dataset="folder", network="imagenet", image_size=224, C=48, layers=14, epochs=250, batch_size=128, lr=0.1,
                     lr_schedule="step", lr_gamma=0.97, lr_step=1, momentum=0.9, weight_decay=3e-5,
                     label_smoothing=0.1, auxiliary=True, auxiliary_weight=0.4, grad_clip=5.0, drop_path_prob=0.0,
                     cutout=0),
}
