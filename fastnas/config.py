"""Run configurations and their presets, shared by search and retraining.

Each option is one field here (:mod:`fastnas.options`): its default, help, rule and command-line form. Adding an
option is adding its field; an option both commands have is declared once as an :class:`~fastnas.options.Option`
below and given each command's default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError
from .options import Option, Rule, boolean, check_fields, integer, number, one_of, opt, options_of, text

SEARCH_PRESETS: dict[str, dict[str, Any]] = {
    # DARTS (Liu et al., 2018), second order: the setting of its best CIFAR-10 cell
    "darts": dict(dataset="cifar10", primitives="darts", epochs=50, batch_size=64, order=2),
    # Shin and Bae: DARTS with channel and spatial attention
    "at-darts": dict(dataset="cifar10", primitives="at-darts", epochs=50, batch_size=128, lr=0.025,
                     momentum=0.9, weight_decay=3e-4, order=2),
    # a real search on the embedded digits, a few minutes on 2 CPU cores
    "quick": dict(dataset="digits", primitives="at-darts", C=8, layers=5, epochs=10, batch_size=64,
                  arch_lr=3e-3, order=1),
}

# DARTS's CIFAR-10 evaluation: 20 cells of C=36, cosine learning rate, auxiliary head, drop path, cutout
_DARTS_EVAL = dict(dataset="cifar10", C=36, layers=20, epochs=600, batch_size=96, lr=0.025, momentum=0.9,
                   weight_decay=3e-4, cutout=16, drop_path_prob=0.2, auxiliary=True, auxiliary_weight=0.4,
                   grad_clip=5.0)
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "darts": _DARTS_EVAL,
    # Shin and Bae's retraining: DARTS's, with batch 128
    "at-darts": {**_DARTS_EVAL, "batch_size": 128},
    # the embedded digits, a few minutes on 2 CPU cores
    "quick": dict(dataset="digits", C=16, layers=8, epochs=30, batch_size=64, lr=0.05, cutout=0,
                  drop_path_prob=0.1, auxiliary=True, auxiliary_weight=0.4),
    # DARTS's ImageNet evaluation (train_imagenet.py) on an image folder: the ImageNet network, step decay
    "imagenet": dict(dataset="folder", network="imagenet", image_size=224, C=48, layers=14, epochs=250,
                     batch_size=128, lr=0.1, lr_schedule="step", lr_gamma=0.97, lr_step=1, momentum=0.9,
                     weight_decay=3e-5, label_smoothing=0.1, auxiliary=True, auxiliary_weight=0.4, grad_clip=5.0,
                     drop_path_prob=0.0, cutout=0),
}


def device_ok(name: Any) -> bool:
    """Whether ``name`` names a device: ``auto`` or what ``torch.device`` accepts of cpu and cuda."""
    if name == "auto":
        return True
    try:
        return torch.device(name).type in ("cpu", "cuda")
    except (RuntimeError, TypeError, ValueError):
        return False


# -- the options both commands have: one declaration each, each command's default where the field is ---------------
DATASET = Option("dataset (digits ships with the package; folder: your images under --data-dir)",
                 one_of("digits", "cifar10", "cifar100", "folder"), "data")
DATA_DIR = Option("folder holding cifar-10-batches-py / cifar-100-python, or with --dataset folder the images: "
                  "DIR/<class>/<image>, or DIR/train/ and DIR/val/", text(none=True), "data")
DOWNLOAD = Option("download CIFAR into --data-dir", boolean(), "data", action="flag")
LIMIT = Option("use only the first N training images (smoke tests)", integer(1, none=True), "data")
IMAGE_SIZE = Option("--dataset folder: network input side; images are resized (short side) and cropped to it "
                    "(default 32)", integer(1, none=True), "data")
SKIP_BAD = Option("--dataset folder: leave unreadable image files out (counted) instead of stopping", boolean(),
                  "data", action="flag")
WORKERS = Option("data loader worker processes (default: 0 for in-memory datasets, up to 4 for folders)",
                 integer(0, none=True), "data")
CHANNELS = Option("initial channels", integer(2, even=True), "network", flags=("--C", "--init-channels"))
LAYERS = Option("number of cells", integer(1), "network")
STEPS = Option("intermediate nodes per cell (a retrained genotype must have as many)", integer(1), "network")
STEM = Option("stem width as a multiple of C", integer(1), "network")
EPOCHS = Option("epochs", integer(1), "optimisation")
BATCH = Option("batch size (per process under torchrun)", integer(1), "optimisation")
LR = Option("weight SGD learning rate", number("> 0"), "optimisation")
LR_MIN = Option("final learning rate of the cosine schedule", number(">= 0"), "optimisation")
MOMENTUM = Option("SGD momentum", number("[0, 1)"), "optimisation")
WEIGHT_DECAY = Option("SGD weight decay", number(">= 0"), "optimisation")
GRAD_CLIP = Option("weight gradient norm clip", number(">= 0", " (0: no clipping)"), "optimisation")
MAX_STEPS = Option("stop each epoch after N steps (smoke tests)", integer(1, none=True), "optimisation")
SEED = Option("random seed", Rule(lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2 ** 63,
                                  "an integer in [0, 2^63)"), "optimisation")
THREADS = Option("CPU threads for PyTorch's kernels (default: PyTorch's choice; fewer than the cores helps when "
                 "other jobs share the machine); a run records the count it used (it changes bits)",
                 integer(1, none=True), "engine")
DEVICE = Option("auto, cpu, cuda or cuda:N", Rule(device_ok, "auto, cpu, cuda or cuda:N"), "engine")
BACKEND = Option("fused-op backend", one_of("auto", "reference", "cpu", "cuda", "triton"), "engine")
AMP = Option("mixed precision (fp16 uses loss scaling)", one_of("off", "bf16", "fp16"), "engine")
CHANNELS_LAST = Option("NHWC memory layout (default: on for the CPU, where it is about 1.4-1.8x faster; off on "
                       "GPUs)", boolean(none=True), "engine", action="toggle")
COMPILE = Option("torch.compile the network", boolean(), "engine", action="flag")
CUDA_GRAPHS = Option("capture the whole training step as a CUDA graph and replay it (GPUs: the step's thousands of "
                     "small kernels launched at once; fastnas/cudagraph.py)", boolean(), "engine", action="flag")
NETWORKS = ("auto", "cifar", "imagenet")
COLLAPSE = "collapse controls"  # against DARTS's collapse into parameter-free cells; all off by default
BUDGET = "budget"  # search for a network of bounded cost (fastnas.budget; docs/budgets.md)


@dataclass
class _Config:
    """The options both configurations have with the same default (data and engine), and what both do: to and from
    the dict of ``config.json``, and the rules of their fields."""

    dataset: str = DATASET("cifar10")
    data_dir: str | None = DATA_DIR(None)
    download: bool = DOWNLOAD(False)
    limit: int | None = LIMIT(None)
    image_size: int | None = IMAGE_SIZE(None)
    skip_bad_images: bool = SKIP_BAD(False)
    workers: int | None = WORKERS(None)
    threads: int | None = THREADS(None)
    device: str = DEVICE("auto")
    backend: str = BACKEND("auto")
    amp: str = AMP("off")
    channels_last: bool | None = CHANNELS_LAST(None)
    compile: bool = COMPILE(False)
    cuda_graphs: bool = CUDA_GRAPHS(False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        unknown = set(d) - set(options_of(cls))
        if unknown:
            raise ConfigError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def validate(self) -> None:
        check_fields(self)


@dataclass
class SearchConfig(_Config):
    """Every knob of a search. Defaults are DARTS's (Liu et al., 2018) where it has one."""

    primitives: str = opt("at-darts", "space name (darts, at-darts) or comma-separated op names", text(), "network")
    C: int = CHANNELS(16)
    layers: int = LAYERS(8)
    steps: int = STEPS(4)
    multiplier: int = opt(4, "nodes concatenated into the cell output", integer(1), "network")
    stem_multiplier: int = STEM(3)
    epochs: int = EPOCHS(50)
    batch_size: int = BATCH(64)
    lr: float = LR(0.025)
    lr_min: float = LR_MIN(0.001)
    momentum: float = MOMENTUM(0.9)
    weight_decay: float = WEIGHT_DECAY(3e-4)
    grad_clip: float = GRAD_CLIP(5.0)
    arch_lr: float = opt(3e-4, "architecture Adam learning rate", number("> 0"), "optimisation")
    arch_betas: tuple[float, float] = opt(
        (0.5, 0.999), "architecture Adam betas",
        Rule(lambda v: isinstance(v, tuple) and len(v) == 2 and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in v),
            "two numbers in [0, 1)"), "optimisation", metavar="BETA")
    arch_weight_decay: float = opt(1e-3, "architecture Adam weight decay", number(">= 0"), "optimisation")
    train_portion: float = opt(0.5, "fraction of the training set for the weights (rest: alphas)",
                               number("(0, 1)"), "data")
    order: int = opt(1, "first- or second-order architecture gradient", one_of(1, 2), "optimisation")
    warmup_epochs: int = opt(0, "epochs of weight-only steps before alphas move", integer(0), "optimisation")
    seed: int = SEED(2)
    compile_scope: str = opt(
        "regions", "with --compile: regions (default) compiles the candidates of each edge as one region, so that "
        "repeated edges share compiled code (under 1.5 min cold for the full supernet on 2 CPU cores); model "
        "compiles the whole supernet as one program (about half an hour there)", one_of("regions", "model"),
        "engine")
    partial_channels: int = opt(1, "PC-DARTS: sample 1/K of the channels on each edge", integer(1), "engine")
    memory_efficient: bool = opt(
        True, "store every activation as the DARTS formulation does (no recomputation, no shared ReLU); for "
        "comparison", boolean(), "engine", flags=("--darts-memory",), action="off")
    plan: str | None = opt(
        None, "how the cells' node sums run (docs/architecture.md): plain, memory, fused_norms or batched (each "
        "state's outgoing candidates as a few stacked calls); default: the fastest that runs here, named in the log",
        one_of("plain", "memory", "fused_norms", "batched", none=True), "engine")
    max_steps: int | None = MAX_STEPS(None)
    skip_limit: int | None = opt(
        None, "P-DARTS: the derived normal cell keeps at most N skip_connect edges (the weakest replaced by the "
        "next-best choice)", integer(0, none=True), COLLAPSE, metavar="N")
    aux_skip: bool = opt(False, "DARTS-: an auxiliary skip on every edge (a factorized reduction at stride 2), "
                         "coefficient decaying linearly 1 -> 0", boolean(), COLLAPSE, action="flag")
    beta_decay: float = opt(0.0, "beta-DARTS: Beta-Decay regularisation of the logits, coefficient rising linearly "
                            "0 -> LAMBDA", number(">= 0", " (0: off)"), COLLAPSE, metavar="LAMBDA")
    alpha_noise: float = opt(0.0, "SDARTS-RS: U(-e, e) on the softmax weights in the weight step, e rising "
                             "linearly 0.03 -> EPS over the search (SDARTS's code: 0.3)",
                             number("[0, 1]", " (0: off)"), COLLAPSE, metavar="EPS")
    early_stop: bool = opt(False, "DARTS+: stop at two skip connections in the normal cell or a ranking of the "
                           "alphas unchanged for --early-stop-patience epochs", boolean(), COLLAPSE, action="flag")
    early_stop_patience: int = opt(10, "DARTS+'s epochs of unchanged ranking", integer(1), COLLAPSE, metavar="K")
    hessian_every: int = opt(0, "every K epochs, the dominant eigenvalue of the validation loss's Hessian w.r.t. "
                             "alpha (RobustDARTS's indicator; 0: off)", integer(0, note=" (0: off)"), COLLAPSE,
                             metavar="K")
    budget: str | None = opt(
        None, "params=3.0M, madds=500M or latency=8ms (repeat or comma-separate for several): a penalty in the "
        "architecture loss, and the derived genotype is the best-scoring one that fits", text(none=True), BUDGET,
        action="append", metavar="METRIC=VALUE")
    budget_penalty: str = opt("mul#log", "ProxylessNAS's forms: CE*alpha*(log E[c]/log T)^beta, or "
                              "CE + lambda*max(0, E[c]/T - 1)", one_of("mul#log", "add#linear"), BUDGET)
    budget_alpha: float = opt(0.2, "mul#log's alpha (ProxylessNAS: 0.2)", number("> 0"), BUDGET)
    budget_beta: float = opt(0.3, "mul#log's beta (ProxylessNAS: 0.3)", number("> 0"), BUDGET)
    budget_lambda: float = opt(0.1, "add#linear's lambda (ProxylessNAS: 0.1)", number(">= 0"), BUDGET)
    deploy: str | None = opt(None, "retraining preset whose network is costed (default: quick for digits, else "
                             "darts)", one_of(*sorted(TRAIN_PRESETS), none=True), BUDGET)
    deploy_C: int | None = opt(None, "the costed network's C", integer(2, none=True, even=True), BUDGET,
                               flags=("--deploy-C",))
    deploy_layers: int | None = opt(None, "the costed network's number of cells", integer(1, none=True), BUDGET)
    deploy_network: str | None = opt(None, "the costed network's kind", one_of(*NETWORKS, none=True), BUDGET)
    latency_table: str | None = opt(None, "a latency_table.json to cost latency with", text(none=True), BUDGET,
                                    metavar="FILE")

    def validate(self) -> None:
        check_fields(self)
        if self.multiplier > self.steps:
            raise ConfigError(f"--multiplier must be between 1 and --steps ({self.steps}), got {self.multiplier}")
        if self.order == 2 and self.amp == "fp16":
            raise ConfigError("--order 2 with --amp fp16 is refused: the finite-difference Hessian-vector product "
                              "needs more range than fp16 gives; use --amp bf16 or --order 1")


@dataclass
class TrainConfig(_Config):
    """Every knob of retraining a genotype (``python -m fastnas.train``). Defaults are DARTS's CIFAR-10 evaluation."""

    genotype: str = opt("DARTS_V2", "a genotype.json or genotype.txt file, a search run folder, a known name "
                        "(DARTS_V1, DARTS_V2, ...) or a 'Genotype(normal=[...], ...)' string (runs store the string)",
                        text(), "genotype")
    network: str = opt("auto", "DARTS's CIFAR or ImageNet network (auto: ImageNet for images of 64 pixels and more)",
                       one_of(*NETWORKS), "network")
    C: int = CHANNELS(36)
    layers: int = LAYERS(20)
    steps: int = STEPS(4)
    stem_multiplier: int = STEM(3)
    auxiliary: bool = opt(True, "auxiliary classifier at 2/3 depth", boolean(), "network", action="toggle")
    auxiliary_weight: float = opt(0.4, "weight of the auxiliary loss", number(">= 0"), "network")
    drop_path_prob: float = opt(0.2, "drop path probability reached at the last epoch (epoch e from 0 uses "
                                "drop_path_prob * e / epochs)", number("[0, 1)"), "network")
    cutout: int = opt(16, "cutout square side (0: none)", integer(0), "data")
    epochs: int = EPOCHS(600)
    batch_size: int = BATCH(96)
    eval_batch_size: int | None = opt(None, "test batch size (default: --batch-size)", integer(1, none=True),
                                      "optimisation")
    lr: float = LR(0.025)
    lr_schedule: str = opt("cosine", "cosine to --lr-min at the last epoch, or step: times --lr-gamma every "
                           "--lr-step epochs", one_of("cosine", "step"), "optimisation")
    lr_min: float = LR_MIN(0.0)
    lr_gamma: float = opt(0.97, "step decay factor (step)", number("(0, 1]"), "optimisation")
    lr_step: int = opt(1, "epochs between decays (step)", integer(1), "optimisation")
    momentum: float = MOMENTUM(0.9)
    weight_decay: float = WEIGHT_DECAY(3e-4)
    grad_clip: float = GRAD_CLIP(5.0)
    label_smoothing: float = opt(0.0, "label smoothing of the training loss (main and auxiliary; the test loss is "
                                 "plain)", number("[0, 1)"), "optimisation")
    seed: int = SEED(0)
    sync_bn: bool = opt(False, "under torchrun: batch-norm statistics over all processes (SyncBatchNorm; needs "
                        "CUDA)", boolean(), "engine", action="flag")
    max_steps: int | None = MAX_STEPS(None)


def preset(name: str, presets: dict[str, dict[str, Any]] = SEARCH_PRESETS) -> dict[str, Any]:
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    return dict(presets[name])


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated with the overrides that were given (None means not given)."""
    return {**base, **{k: v for k, v in overrides.items() if v is not None}}
