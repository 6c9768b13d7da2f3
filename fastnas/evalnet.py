"""The DARTS evaluation network: a found genotype stacked into a deep network and trained from scratch.

:class:`EvalNet` is DARTS's ``NetworkCIFAR``: a 3×3 stem of ``stem_multiplier·C`` channels, ``layers`` cells built
from the genotype (reductions at 1/3 and 2/3 of the depth, where the channels double), an auxiliary classifier after
the cell at 2/3 depth (training only), global average pooling and a linear classifier. Every op of the space registry
(:func:`fastnas.space.make_op`) may appear in the genotype, the CBAM attention gates included; those run on the fused
``fastnas.ops`` kernels of the selected backend.

With ``network="imagenet"`` it is DARTS's ``NetworkImageNet`` instead: two stride-2 stems that reduce the image by 8
before the cells (the first cell's earlier input is then reduced once more), and the ImageNet auxiliary head.
``network="auto"`` (the default) picks the ImageNet network for images of at least :data:`IMAGENET_MIN_SIZE` (64)
pixels and the CIFAR network below that.

With ``DARTS_V2``, C=36, 20 layers and 10 classes it has exactly the parameters of the original implementation:
3,349,342 without the auxiliary head (DARTS's "param size = 3.349342MB") and 3,825,768 with it; the ImageNet
network with C=48, 14 layers and 1000 classes has 4,718,752 without its head and 5,979,528 with it.

:func:`load_model` rebuilds a trained network from a ``python -m fastnas.train`` run folder (its files:
:mod:`fastnas.modelfile`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .errors import ConfigError
from .genotype import Edge, Genotype
from .modelfile import attach_data, load_weights, read_model_meta, save_model  # noqa: F401 (save_model: API)
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


def imagenet_auxiliary_geometry(size: int) -> tuple[int, int, int]:
    """(pool kernel, pool stride, second conv kernel) of the ImageNet auxiliary head for a ``size``×``size`` input.

    For 7×7 (a 224×224 image at 2/3 depth) this is DARTS's head exactly: 5×5 average pool with stride 2 to 2×2, then
    a 2×2 conv to 1×1; other sizes adapt as :func:`auxiliary_geometry` does."""
    if size < 1:
        raise ConfigError(f"the auxiliary head needs an input of at least 1x1, got {size}x{size}")
    kernel = min(5, size)
    pooled = (size - kernel) // 2 + 1
    return kernel, 2, min(2, pooled)


class AuxiliaryHead(nn.Module):
    """DARTS's auxiliary classifier for CIFAR, adapted to other input sizes by :func:`auxiliary_geometry`; with
    ``imagenet=True`` DARTS's ImageNet head (pool stride 2, no batch norm after the second conv, as in the original),
    adapted by :func:`imagenet_auxiliary_geometry`."""

    def __init__(self, C: int, num_classes: int, input_size: int = 8, imagenet: bool = False) -> None:
        super().__init__()
        kernel, stride, conv = (imagenet_auxiliary_geometry if imagenet else auxiliary_geometry)(input_size)
        self.features = nn.Sequential(
            nn.ReLU(inplace=False),  # DARTS's is in place, which rewrites the cell output the next cells read
            nn.AvgPool2d(kernel, stride=stride, padding=0, count_include_pad=False),
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, conv, bias=False),
            *([] if imagenet else [nn.BatchNorm2d(768)]),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(x.mean(dim=(2, 3)))  # 1×1 at DARTS's shape: the mean is the flatten


NETWORKS = ("auto", "cifar", "imagenet")
IMAGENET_MIN_SIZE = 64
"""``network="auto"`` builds the ImageNet network for images of this side and larger, the CIFAR network below."""


def resolve_network(network: str, input_size: int) -> str:
    """``cifar`` or ``imagenet``: ``network`` itself, or for ``auto`` the one that fits ``input_size``."""
    if network not in NETWORKS:
        raise ConfigError(f"network must be one of {', '.join(NETWORKS)}, got {network!r}")
    if network == "auto":
        return "imagenet" if input_size >= IMAGENET_MIN_SIZE else "cifar"
    return network


def check_imagenet_input_size(input_size: int, layers: int) -> None:
    """Refuse an image the ImageNet network cannot take: its stems reduce it by 8, each reduction cell by 2."""
    n = len(reduction_layers(layers))
    need = 8 * 2 ** n
    if input_size < need:
        raise ConfigError(f"input of {input_size}x{input_size} is too small for the ImageNet network: its stem "
                          f"reduces the image by 8 and each of its {n} reduction cells ({layers} layers) by 2, so it "
                          f"needs at least {need}x{need} (the CIFAR network takes smaller images)")


class EvalNet(nn.Module):
    """DARTS's evaluation network for ``genotype``: ``NetworkCIFAR`` or ``NetworkImageNet`` (``network``; ``auto``
    picks by ``input_size``, see :func:`resolve_network`).

    ``forward`` returns the logits; in training mode with the auxiliary head it returns ``(logits, aux_logits)``
    (as torchvision's Inception does). ``drop_path_prob`` is an attribute: the training loop raises it linearly over
    the epochs. ``input_size`` (the image side; by default the network's own: 224 for ``network="imagenet"``, else
    32) sizes the auxiliary head; ``steps``, when given, is the number of intermediate nodes the genotype must have.
    ``stem_multiplier`` applies to the CIFAR stem only (the ImageNet stems have C channels).
    """

    def __init__(self, genotype: Genotype | str | dict, C: int = 36, layers: int = 20, num_classes: int = 10,
                 auxiliary: bool = False, drop_path_prob: float = 0.0, in_channels: int = 3,
                 input_size: int | None = None, stem_multiplier: int = 3, steps: int | None = None,
                 network: str = "auto") -> None:
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
        if input_size is None:
            input_size = 224 if network == "imagenet" else 32
        network = resolve_network(network, input_size)
        if network == "imagenet":
            check_imagenet_input_size(input_size, layers)
        else:
            check_input_size(input_size, input_size, layers)
        self.network, self.stem_multiplier = network, stem_multiplier
        self.genotype = genotype
        self.C, self.layers, self.num_classes = C, layers, num_classes
        self.in_channels, self.input_size = in_channels, input_size
        # the probability lives in a (non-saved) 0-dim buffer: torch.compile sees a tensor, not a constant that
        # changes every epoch; only whether it is on is a Python value
        self.register_buffer("_drop_prob", torch.zeros(()), persistent=False)
        self.drop_path_prob = drop_path_prob

        if network == "imagenet":
            self.stem0 = nn.Sequential(
                nn.Conv2d(in_channels, C // 2, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(C // 2),
                nn.ReLU(inplace=True),
                nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(C),
            )
            self.stem1 = nn.Sequential(
                nn.ReLU(inplace=False),  # DARTS's is in place on stem0's output, which the first cell reads too
                nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(C),
            )
            # the first cell reads stem0's output (a quarter of the image) through FactorizedReduce
            c_prev_prev, c_prev, c_curr = C, C, C
            reduction_prev, size = True, math.ceil(math.ceil(math.ceil(input_size / 2) / 2) / 2)
        else:
            c_curr = stem_multiplier * C
            self.stem = nn.Sequential(nn.Conv2d(in_channels, c_curr, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(c_curr))
            c_prev_prev, c_prev, c_curr = c_curr, c_curr, C
            reduction_prev, size = False, input_size
        reductions = reduction_layers(layers)
        self.aux_index = 2 * layers // 3
        self.cells = nn.ModuleList()
        aux_channels, aux_size = c_prev, size
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
        self.auxiliary_head = (AuxiliaryHead(aux_channels, num_classes, aux_size, imagenet=network == "imagenet")
                               if auxiliary else None)
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
        if self.network == "imagenet":
            s0 = self.stem0(x)
            s1 = self.stem1(s0)
        else:
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
                "stem_multiplier": self.stem_multiplier, "network": self.network}


def build_from_config(arch: dict[str, Any]) -> EvalNet:
    arch = dict(arch)
    arch.setdefault("network", "cifar")  # saved before the ImageNet network existed: all were CIFAR networks
    genotype = Genotype.from_dict(arch.pop("genotype"))
    return EvalNet(genotype, **arch)


# -- saved models (the files themselves: fastnas.modelfile) -----------------------------------------------------------
def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> EvalNet:
    """The trained network of a ``python -m fastnas.train`` run folder, in eval mode on ``device``.

    The folder's ``model.json`` is attached as ``model.meta`` (dataset, epoch, accuracies); what its ``data.json``
    says as ``model.data_info``, ``model.classes`` (the class of each output) and ``model.transform`` (a PIL image
    to the tensor the model takes: ``model(model.transform(image)[None])``), or None for all three when the folder
    does not say what its data are. A ``data.json`` whose classes or channels do not fit the model is refused."""
    meta = read_model_meta(run_dir)
    model = build_from_config(meta["arch"])
    load_weights(model, run_dir)
    model.meta = meta
    attach_data(model, Path(run_dir))
    return model.to(device).eval()
