"""The cost of the network you deploy: parameters, multiply-adds and measured latency of a genotype's EvalNet.

A genotype's retrained network (:class:`fastnas.EvalNet`) is fixed parts (stems, each cell's preprocessing, the
classifier, the optional auxiliary head) plus one op per genotype edge in every cell. With the concatenated nodes
fixed, every cost below is additive over the edges, so a :class:`CostModel` holds, for each cell type, a table
``[edge row, op]`` (the row of the architecture weights an edge belongs to: node i's input j) of the op's cost summed
over every cell of that type at its channels, stride and resolution, and the cost of the fixed parts:

* ``params``: the number of parameters, as DARTS counts them (no auxiliary head unless the deployment has it);
* ``madds``: multiply-adds of the convolutions and linear layers (``torch.utils.flop_counter``'s FLOPs / 2, for one
  image); batch norm, pooling, activations and the node sums are not counted, as in DARTS-family papers;
* ``latency``: milliseconds from a :class:`fastnas.latency.LatencyTable` (optional).

:func:`cost` gives all of them for a genotype; :meth:`CostModel.expected` the differentiable expectation over α.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import ConfigError
from .evalnet import EvalNet, resolve_network
from .genotype import Genotype, gene_rows
from .space import make_op
from .supernet import reduction_layers

METRICS = ("params", "madds", "latency")
DATASET_SHAPES = {"digits": (10, 1, 8), "cifar10": (10, 3, 32), "cifar100": (100, 3, 32)}
"""(classes, channels, image side) of the built-in datasets."""
FIXED_OP = "max_pool_3x3"  # no parameters, no multiply-adds: a network of it alone costs its fixed parts


@dataclass(frozen=True)
class Deployment:
    """The retrained network whose cost counts: :class:`fastnas.EvalNet`'s arguments, less the genotype."""

    C: int = 36
    layers: int = 20
    num_classes: int = 10
    in_channels: int = 3
    input_size: int = 32
    network: str = "auto"
    stem_multiplier: int = 3
    auxiliary: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "network", resolve_network(self.network, self.input_size))

    @classmethod
    def from_preset(cls, preset: str, num_classes: int | None = None, in_channels: int | None = None,
                    input_size: int | None = None, **overrides) -> "Deployment":
        """The network of the retraining preset ``preset`` (``python -m fastnas.train --preset``), for data of
        ``num_classes``, ``in_channels`` and ``input_size`` (default: the preset's dataset); ``overrides`` (C,
        layers, network, ...) given as None are ignored."""
        from .config import TRAIN_PRESETS, TrainConfig, preset as get_preset

        p = {**TrainConfig().to_dict(), **get_preset(preset, TRAIN_PRESETS)}
        classes, channels, side = DATASET_SHAPES.get(p["dataset"], (None, 3, p.get("image_size") or 32))
        fields = dict(C=p["C"], layers=p["layers"], network=p["network"], stem_multiplier=p["stem_multiplier"],
                      num_classes=num_classes or classes or 10, in_channels=in_channels or channels,
                      input_size=input_size or side)
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def default_preset(dataset: str) -> str:
    """The retraining preset that matches a search on ``dataset``: ``quick`` for the digits, else ``darts`` (whose
    network the ``at-darts`` preset shares)."""
    return "quick" if dataset == "digits" else "darts"


@dataclass(frozen=True)
class CellSite:
    """One cell of the network: its type, channels C, and the resolution its ops read (inputs; intermediate nodes)."""

    reduction: bool
    C: int
    input_size: int
    node_size: int


def cell_sites(dep: Deployment) -> list[CellSite]:
    """The cells of ``dep``'s network, as :class:`fastnas.EvalNet` builds them."""
    if dep.network == "imagenet":
        c, size = dep.C, math.ceil(math.ceil(math.ceil(dep.input_size / 2) / 2) / 2)
    else:
        c, size = dep.C, dep.input_size
    reductions, sites = reduction_layers(dep.layers), []
    for i in range(dep.layers):
        reduction = i in reductions
        before = size
        if reduction:
            c, size = 2 * c, math.ceil(size / 2)
        sites.append(CellSite(reduction, c, before, size))
    return sites


def edge_rows(steps: int) -> list[tuple[int, int]]:
    """(node, input) of each row of the architecture weights: node i has the rows of its inputs 0 .. i + 1."""
    return [(i, j) for i in range(steps) for j in range(2 + i)]


def private_rng():
    """A block whose random draws (initialising the modules it builds) leave torch's CPU generator as it was: costing
    a network must not change a search's random stream."""
    return torch.random.fork_rng(devices=[])


@functools.lru_cache(maxsize=None)
def op_params(name: str, C: int, stride: int) -> int:
    """Parameters of op ``name`` on C channels at ``stride``, as the retrained network builds it (affine)."""
    with private_rng():
        return sum(p.numel() for p in make_op(name, C, stride, True).parameters())


@functools.lru_cache(maxsize=None)
def op_madds(name: str, C: int, stride: int, size: int) -> int:
    """Multiply-adds of op ``name`` on one C×size×size input (flop_counter's FLOPs / 2, plain-PyTorch backend)."""
    if name == "none":
        return 0
    with private_rng():
        return count_madds(make_op(name, C, stride, True).eval(), torch.zeros(1, C, size, size))


def count_madds(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of ``module(x)``: ``torch.utils.flop_counter``'s count / 2, on the plain-PyTorch backend (whose
    convolutions and matrix products it sees; the fused kernels are opaque to it)."""
    from torch.utils.flop_counter import FlopCounterMode

    from . import ops

    with ops.backend("reference"), FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    return counter.get_total_flops() // 2


class CostModel:
    """Per-edge cost tables and fixed parts of ``deployment``'s network for the ops ``primitives`` (see the module
    docstring); ``latency``, a :class:`fastnas.latency.LatencyTable`, adds the ``latency`` metric."""

    def __init__(self, deployment: Deployment, primitives: Sequence[str], steps: int = 4, multiplier: int = 4,
                 latency=None) -> None:
        self.deployment, self.primitives = deployment, tuple(primitives)
        self.steps, self.multiplier, self.latency = steps, multiplier, latency
        self.sites = cell_sites(deployment)
        self.metrics = METRICS if latency is not None else METRICS[:2]
        self._tables: dict[tuple[str, str], torch.Tensor] = {}
        self._fixed: dict[tuple, dict[str, float]] = {}

    @property
    def concat(self) -> list[int]:
        return list(range(2 + self.steps - self.multiplier, self.steps + 2))

    # -- tables -----------------------------------------------------------------------------------------------------
    def op_cost(self, metric: str, name: str, site: CellSite, j: int) -> float:
        """``metric`` of op ``name`` on input ``j`` of a node of the cell at ``site``."""
        stride = 2 if site.reduction and j < 2 else 1
        size = site.input_size if stride == 2 else site.node_size
        if metric == "params":
            return op_params(name, site.C, stride)
        if metric == "madds":
            return op_madds(name, site.C, stride, size)
        if metric == "latency":
            return 0.0 if name == "none" else self.latency.op(name, site.C, stride, size)
        raise ConfigError(f"unknown cost metric {metric!r}; use one of {', '.join(self.metrics)}")

    def table(self, metric: str, kind: str) -> torch.Tensor:
        """[edge rows, ops] (float64): each op's ``metric`` on each edge, summed over the cells of type ``kind``."""
        key = (metric, kind)
        if key not in self._tables:
            sites = [s for s in self.sites if s.reduction == (kind == "reduce")]
            self._tables[key] = torch.tensor(
                [[sum(self.op_cost(metric, op, s, j) for s in sites) for op in self.primitives]
                 for _, j in edge_rows(self.steps)], dtype=torch.float64)
        return self._tables[key]

    def fixed(self, metric: str, normal_concat: Sequence[int] | None = None,
              reduce_concat: Sequence[int] | None = None) -> float:
        """``metric`` of everything but the genotype's ops (stems, preprocessing, classifier, head)."""
        key = (tuple(normal_concat or self.concat), tuple(reduce_concat or self.concat))
        if key not in self._fixed:
            net = self.skeleton(*key)
            x = torch.zeros(1, self.deployment.in_channels, self.deployment.input_size, self.deployment.input_size)
            self._fixed[key] = {"params": net.param_count(auxiliary=self.deployment.auxiliary),
                                "madds": count_madds(net, x)}
            if self.latency is not None:
                self._fixed[key]["latency"] = self.latency.fixed(self, net, key)
        return self._fixed[key][metric]

    def skeleton(self, normal_concat: Sequence[int], reduce_concat: Sequence[int]) -> EvalNet:
        """The network with :data:`FIXED_OP` on every edge: its cost is the fixed parts' (the op has none)."""
        edges = [(FIXED_OP, j) for i in range(self.steps) for j in (0, 1)]
        g = Genotype(edges, list(normal_concat), edges, list(reduce_concat))
        with private_rng():
            return build(g, self.deployment).eval()

    # -- a genotype -------------------------------------------------------------------------------------------------
    def cost(self, genotype: Genotype) -> dict[str, float]:
        """Every metric of ``genotype``'s network: exact for params and madds, the table's sum for latency."""
        genotype.validate(known_ops=self.primitives, steps=self.steps)
        out = {}
        for metric in self.metrics:
            total = self.fixed(metric, genotype.normal_concat, genotype.reduce_concat)
            for kind, edges in (("normal", genotype.normal), ("reduce", genotype.reduce)):
                t = self.table(metric, kind)
                total += sum(float(t[r, self.primitives.index(op)]) for r, (op, _) in
                             zip(gene_rows(edges), edges))
            out[metric] = int(total) if metric != "latency" else total
        return out

    # -- the expectation over alpha ---------------------------------------------------------------------------------
    def expected(self, metric: str, weights: Sequence[torch.Tensor],
                 edge_weights: Sequence[torch.Tensor | None] = (None, None)) -> torch.Tensor:
        """Differentiable expected ``metric`` of the derived network from softmax ``weights`` (normal, reduce),
        each [edges, ops]; ``edge_weights``: PC-DARTS's edge normalisation, as the derivation ranks edges.

        Each kept edge's op is drawn in proportion to its weight among the ops the derivation may pick (all but
        ``none``), as FBNet and ProxylessNAS take the expectation over one choice; a node keeps two of its incoming
        edges, drawn without replacement in proportion to their strength (the largest such weight, what DARTS ranks
        them by), so edge r is kept with probability q_r + Σ_{j≠r} q_j q_r / (1 − q_j), q = strength / Σ strength
        (a sum of 2 over the node; 1 for both edges of a node with two inputs). When each kept edge's weight is on
        one op and every other edge's on ``none``, E[c] is the derived network's exact cost."""
        keep = [k for k, p in enumerate(self.primitives) if p != "none"]
        total = weights[0].new_tensor(self.fixed(metric))
        for kind, w, e in zip(("normal", "reduce"), weights, edge_weights):
            c = self.table(metric, kind).to(w)[:, keep]
            p = w[:, keep]
            op_cost = (p * c).sum(-1) / p.sum(-1)
            strength = p.max(-1).values * (e if e is not None else 1.0)
            start = 0
            for i in range(self.steps):
                n = 2 + i
                q = strength[start:start + n] / strength[start:start + n].sum()
                r = q / (1 - q)
                keep_prob = q * (1 + r.sum() - r)
                total = total + (keep_prob * op_cost[start:start + n]).sum()
                start += n
        return total


def build(genotype: Genotype, dep: Deployment) -> EvalNet:
    """``genotype``'s retrained network for ``dep``."""
    return EvalNet(genotype, dep.C, dep.layers, dep.num_classes, auxiliary=dep.auxiliary,
                   in_channels=dep.in_channels, input_size=dep.input_size, stem_multiplier=dep.stem_multiplier,
                   steps=genotype.steps, network=dep.network)


def cost(genotype: Genotype | str, deployment: Deployment | str = "darts", latency=None, **data) -> dict[str, float]:
    """Parameters, multiply-adds (and latency in ms, given a :class:`fastnas.latency.LatencyTable`) of
    ``genotype``'s retrained network: ``deployment`` is a :class:`Deployment` or a retraining preset name (with
    ``data``: num_classes, in_channels, input_size, C, layers, network, ...).

    >>> fastnas.cost(fastnas.genotypes.DARTS_V2)["params"]     # C=36, 20 cells, CIFAR-10: DARTS's 3.349342M
    3349342
    """
    if isinstance(genotype, str):
        genotype = Genotype.parse(genotype)
    dep = deployment if isinstance(deployment, Deployment) else Deployment.from_preset(deployment, **data)
    ops = tuple(sorted(genotype.ops()))
    return CostModel(dep, ops, genotype.steps, len(genotype.normal_concat), latency).cost(genotype)


def network_cost(net: EvalNet, latency=None) -> dict[str, float]:
    """:func:`cost` of a built network (without its auxiliary head, as deployed)."""
    dep = Deployment(net.C, net.layers, net.num_classes, net.in_channels, net.input_size, net.network,
                     net.stem_multiplier)
    return cost(net.genotype, dep, latency)


def format_cost(c: dict[str, float]) -> str:
    """``params 245,242 | madds 12.3M | latency 1.84 ms``."""
    parts = []
    if "params" in c:
        parts.append(f"params {int(c['params']):,}")
    if "madds" in c:
        parts.append(f"madds {c['madds'] / 1e6:.2f}M")
    if "latency" in c:
        parts.append(f"latency {c['latency']:.3f} ms")
    return " | ".join(parts)
