"""The DARTS evaluation network: a found genotype stacked into a deep network and trained from scratch.

:class:`EvalNet` is DARTS's ``NetworkCIFAR``: a 3×3 stem of ``stem_multiplier·C`` channels, ``layers`` cells built
from the genotype (reductions at 1/3 and 2/3 of the depth, where the channels double), an auxiliary classifier after
the cell at 2/3 depth (training only), global average pooling and a linear classifier. Every op of the space registry
(:func:`fastnas.space.make_op`) may appear in the genotype, the CBAM attention gates included; those run on the fused
``fastnas.ops`` kernels of the selected backend.

With ``DARTS_V2``, C=36, 20 layers and 10 classes it has exactly the parameters of the original implementation:
3,349,342 without the auxiliary head (DARTS's "param size = 3.349342MB") and 3,825,768 with it.

:func:`load_model` rebuilds a trained network from a ``python -m fastnas.train`` run folder.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .errors import CheckpointError, ConfigError
from .genotype import Edge, Genotype
from .nn.operations import FactorizedReduce, ReLUConvBN
from .space import make_op, registered_ops
from .supernet import check_input_size, reduction_layers


def drop_path(x: torch.Tensor, drop_prob: float | torch.Tensor) -> torch.Tensor:
    """Zero whole samples of ``x`` with probability ``drop_prob`` and scale the kept ones by 1 / (1 − drop_prob)
    (DARTS's per-sample Bernoulli mask; the expected value is unchanged). Returns a new tensor.

    ``drop_prob`` may be a 0-dim tensor, so that a compiled network does not specialise on its value."""
    if not isinstance(drop_prob, torch.Tensor) and drop_prob <= 0.0:
        return x
    keep = 1.0 - drop_prob
    if isinstance(keep, torch.Tensor):
        keep = keep.to(device=x.device, dtype=x.dtype)
    mask = torch.empty(x.shape[0], *([1] * (x.dim() - 1)), dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * (mask / keep)


class EvalCell(nn.Module):
    """A discrete cell: node k = op(h_i) + op(h_j) for the genotype's two edges, output = concat of ``concat``.

    Ops are built with affine batch norms; in a reduction cell the edges that read the cell inputs have stride 2.
    In training, drop path is applied to the output of every op that is not an identity."""

    def __init__(self, edges: Sequence[Edge], concat: Sequence[int], c_prev_prev: int, c_prev: int, C: int,
                 reduction: bool, reduction_prev: bool) -> None:
        super().__init__()
        self.reduction = reduction
        self.preprocess0 = (FactorizedReduce(c_prev_prev, C) if reduction_prev
                            else ReLUConvBN(c_prev_prev, C, 1, 1, 0))
        self.preprocess1 = ReLUConvBN(c_prev, C, 1, 1, 0)
        self.steps = len(edges) // 2
        self.indices = [int(i) for _, i in edges]
        self.concat = [int(c) for c in concat]
        self.multiplier = len(self.concat)
        self.ops = nn.ModuleList(make_op(name, C, 2 if reduction and index < 2 else 1, True)
                                 for name, index in edges)
        self.droppable = [not isinstance(op, nn.Identity) for op in self.ops]

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float | torch.Tensor | None = None
                ) -> torch.Tensor:
        """``drop_prob``: a float, a 0-dim tensor (applied whatever its value) or None (no drop path)."""
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        drop = self.training and drop_prob is not None and (isinstance(drop_prob, torch.Tensor) or drop_prob > 0.0)
        for k in range(self.steps):
            node = None
            for e in (2 * k, 2 * k + 1):
                h = self.ops[e](states[self.indices[e]])
                if drop and self.droppable[e]:
                    h = drop_path(h, drop_prob)
                node = h if node is None else node + h
            states.append(node)
        return torch.cat([states[i] for i in self.concat], dim=1)


def auxiliary_geometry(size: int) -> tuple[int, int, int]:
    """(pool kernel, pool stride, second conv kernel) of the auxiliary head for a ``size``×``size`` input.

    For 8×8 (CIFAR at 2/3 depth) this is DARTS's head exactly: 5×5 average pool with stride 3 to 2×2, then a 2×2
    conv to 1×1. Smaller inputs (the 8×8 digits reach 2×2 there) pool with a kernel of min(5, size), and the second
    conv takes min(2, pooled size), so the head ends at 1×1 without padding; larger inputs end above 1×1 and are
    averaged before the classifier. The parameter count changes only through the second conv's kernel."""
    if size < 1:
        raise ConfigError(f"the auxiliary head needs an input of at least 1x1, got {size}x{size}")
    kernel = min(5, size)
    stride = 3
    pooled = (size - kernel) // stride + 1
    return kernel, stride, min(2, pooled)


class AuxiliaryHead(nn.Module):
    """DARTS's auxiliary classifier for CIFAR, adapted to other input sizes by :func:`auxiliary_geometry`."""

    def __init__(self, C: int, num_classes: int, input_size: int = 8) -> None:
        super().__init__()
        kernel, stride, conv = auxiliary_geometry(input_size)
        self.features = nn.Sequential(
            nn.ReLU(inplace=False),  # DARTS's is in place, which rewrites the cell output the next cells read
            nn.AvgPool2d(kernel, stride=stride, padding=0, count_include_pad=False),
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, conv, bias=False),
            nn.BatchNorm2d(768),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(x.mean(dim=(2, 3)))  # 1×1 at DARTS's shape: the mean is the flatten


class EvalNet(nn.Module):
    """DARTS's CIFAR evaluation network for ``genotype``.

    ``forward`` returns the logits; in training mode with the auxiliary head it returns ``(logits, aux_logits)``
    (as torchvision's Inception does). ``drop_path_prob`` is an attribute: the training loop raises it linearly over
    the epochs. ``input_size`` (the image side) sizes the auxiliary head; ``steps``, when given, is the number of
    intermediate nodes the genotype must have.
    """

    def __init__(self, genotype: Genotype | str | dict, C: int = 36, layers: int = 20, num_classes: int = 10,
                 auxiliary: bool = False, drop_path_prob: float = 0.0, in_channels: int = 3, input_size: int = 32,
                 stem_multiplier: int = 3, steps: int | None = None) -> None:
        super().__init__()
        if isinstance(genotype, str):
            genotype = Genotype.parse(genotype)
        elif isinstance(genotype, dict):
            genotype = Genotype.from_dict(genotype)
        elif not isinstance(genotype, Genotype):
            raise ConfigError(f"EvalNet needs a Genotype, a genotype string or its dict, got "
                              f"{type(genotype).__name__}")
        genotype.validate(known_ops=registered_ops(), steps=steps)
        if C < 2 or C % 2 or layers < 1 or num_classes < 1 or in_channels < 1:
            raise ConfigError(f"EvalNet needs an even C >= 2 and layers, num_classes, in_channels >= 1, got C={C}, "
                              f"layers={layers}, num_classes={num_classes}, in_channels={in_channels}")
        check_input_size(input_size, input_size, layers)
        self.genotype = genotype
        self.C, self.layers, self.num_classes = C, layers, num_classes
        self.in_channels, self.input_size = in_channels, input_size
        # the probability lives in a (non-saved) 0-dim buffer: torch.compile sees a tensor, not a constant that
        # changes every epoch; only whether it is on is a Python value
        self.register_buffer("_drop_prob", torch.zeros(()), persistent=False)
        self.drop_path_prob = drop_path_prob

        c_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c_curr, 3, padding=1, bias=False), nn.BatchNorm2d(c_curr))
        c_prev_prev, c_prev, c_curr = c_curr, c_curr, C
        reductions = reduction_layers(layers)
        self.aux_index = 2 * layers // 3
        self.cells = nn.ModuleList()
        reduction_prev, size, aux_channels, aux_size = False, input_size, c_prev, input_size
        for i in range(layers):
            reduction = i in reductions
            if reduction:
                c_curr *= 2
                size = math.ceil(size / 2)
            edges, concat = ((genotype.reduce, genotype.reduce_concat) if reduction
                             else (genotype.normal, genotype.normal_concat))
            cell = EvalCell(edges, concat, c_prev_prev, c_prev, c_curr, reduction, reduction_prev)
            self.cells.append(cell)
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, cell.multiplier * c_curr
            if i == self.aux_index:
                aux_channels, aux_size = c_prev, size
        self.auxiliary_head = AuxiliaryHead(aux_channels, num_classes, aux_size) if auxiliary else None
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes)

    @property
    def drop_path_prob(self) -> float:
        return self._drop_path_prob

    @drop_path_prob.setter
    def drop_path_prob(self, p: float) -> None:
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"drop_path_prob must be in [0, 1), got {p}")
        self._drop_path_prob, self._drop_on = float(p), p > 0.0
        self._drop_prob.fill_(float(p))

    def forward(self, x: torch.Tensor):
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ConfigError(f"EvalNet expects input [N, {self.in_channels}, H, W], got {list(x.shape)}")
        aux = None
        drop = self._drop_prob if self._drop_on else None
        s0 = s1 = self.stem(x)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, drop)
            if i == self.aux_index and self.auxiliary_head is not None and self.training:
                aux = self.auxiliary_head(s1)
        logits = self.classifier(torch.flatten(self.global_pooling(s1), 1))
        return logits if aux is None else (logits, aux)

    def param_count(self, auxiliary: bool = False) -> int:
        """Number of parameters; without the auxiliary head unless asked (DARTS's count)."""
        return sum(p.numel() for n, p in self.named_parameters() if auxiliary or "auxiliary" not in n)

    def arch_config(self) -> dict[str, Any]:
        """What it takes to rebuild this network (see :func:`build_from_config`)."""
        return {"genotype": self.genotype.to_dict(), "C": self.C, "layers": self.layers,
                "num_classes": self.num_classes, "in_channels": self.in_channels, "input_size": self.input_size,
                "auxiliary": self.auxiliary_head is not None,
                "stem_multiplier": self.stem[0].out_channels // self.C}


def build_from_config(arch: dict[str, Any]) -> EvalNet:
    arch = dict(arch)
    genotype = Genotype.from_dict(arch.pop("genotype"))
    return EvalNet(genotype, **arch)


# -- saved models -----------------------------------------------------------------------------------------------------
MODEL_FILE, MODEL_META = "model.safetensors", "model.json"


def save_model(model: EvalNet, run_dir: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write ``model.safetensors`` (weights and batch-norm statistics) and ``model.json`` (architecture, dataset,
    and whatever ``extra`` holds), each atomically."""
    from safetensors.torch import save_file

    from .checkpoint import write_text_atomic

    run_dir = Path(run_dir)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{MODEL_FILE}.", suffix=".tmp", dir=run_dir)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": "fastnas.EvalNet"})
        os.replace(tmp, run_dir / MODEL_FILE)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    meta = {"arch": model.arch_config(), **(extra or {})}
    write_text_atomic(json.dumps(meta, indent=2) + "\n", run_dir / MODEL_META)


def read_model_meta(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / MODEL_META
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"no run folder at {run_dir}")
    if not path.exists():
        raise CheckpointError(f"no trained model in {run_dir}: {MODEL_META} is missing "
                              f"(written by python -m fastnas.train after its first epoch)")
    try:
        meta = json.loads(path.read_text())
        meta["arch"]["genotype"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is corrupt ({type(exc).__name__})") from None
    return meta


def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> EvalNet:
    """The trained network of a ``python -m fastnas.train`` run folder, in eval mode on ``device``.

    The folder's ``model.json`` is attached as ``model.meta`` (dataset, epoch, accuracies)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = read_model_meta(run_dir)
    model = build_from_config(meta["arch"])
    try:
        state = load_file(str(Path(run_dir) / MODEL_FILE), device="cpu")
    except (FileNotFoundError, SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {Path(run_dir) / MODEL_FILE}: {exc}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{MODEL_FILE} does not fit {MODEL_META}: {str(exc).splitlines()[0]}") from None
    model.meta = meta
    return model.to(device).eval()
