"""Search within a budget: ``--budget params=3.0M,madds=500M,latency=8ms``.

Three parts, on a :class:`fastnas.costmodel.CostModel` of the network to deploy:

* the penalty of the architecture loss on the expected cost E[c] (:meth:`fastnas.costmodel.CostModel.expected`), in
  ProxylessNAS's two forms (Cai et al., 2019, and its ``imagenet_arch_search.py``, whose defaults are these):
  ``mul#log``: CE · α · Π_c (log E[c] / log T_c)^β, α = 0.2, β = 0.3;
  ``add#linear``: CE + λ · Σ_c max(0, E[c] / T_c − 1), λ = 0.1 (the code's form is λ (E − T) / T; the hinge leaves
  a network under its budget unpenalised). Latency enters the logarithm in microseconds, so targets under 1 ms keep
  a positive log;
* the derivation that guarantees the budget (:func:`constrained_derive`): of the genotypes DARTS's rule may derive
  (two incoming edges per node, any op but ``none`` on each), the one with the highest score (the sum of the chosen
  ops' softmax weights, which DARTS's own choice maximises) whose exact cost fits every budget, found exactly;
* :func:`check_feasible`, which refuses an impossible budget naming the smallest achievable cost.
"""
from __future__ import annotations

import itertools
import math
import re
from typing import Sequence

import torch

from .costmodel import CostModel, edge_rows
from .errors import ConfigError
from .genotype import Edge, Genotype

PENALTIES = ("mul#log", "add#linear")
DEFAULTS = {"alpha": 0.2, "beta": 0.3, "lambda": 0.1}  # ProxylessNAS's imagenet_arch_search.py
_SCALE = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9}
_TIME = {"ms": 1.0, "us": 1e-3, "s": 1e3}
_LOG_UNIT = {"params": 1.0, "madds": 1.0, "latency": 1e3}  # latency in the log: microseconds


def parse_budget(text: str) -> dict[str, float]:
    """``params=3.0M,madds=500M,latency=8ms`` → {metric: target} (counts; latency in ms)."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in str(text).split(",")):
        m = re.fullmatch(r"(params|madds|latency)\s*=\s*([0-9.]+(?:e[-+]?\d+)?)\s*([a-zA-Z]*)", part)
        unit = m.group(3) if m else ""
        units = _TIME if m and m.group(1) == "latency" else _SCALE
        if m is None or unit not in units or not _finite(m.group(2)):
            raise ConfigError(f"--budget takes metric=value items, comma-separated: params=3.0M, madds=500M, "
                              f"latency=8ms; got {part!r}")
        if m.group(1) in out:
            raise ConfigError(f"--budget names {m.group(1)} twice")
        value = float(m.group(2)) * units[unit]
        if not value > 0:
            raise ConfigError(f"--budget {m.group(1)} must be > 0, got {part!r}")
        out[m.group(1)] = value
    return out


def _finite(s: str) -> bool:
    try:
        return math.isfinite(float(s))
    except ValueError:
        return False


def format_budget(budget: dict[str, float]) -> str:
    return ", ".join(f"{k} {v / 1e6:g}M" if k != "latency" else f"{k} {v:g} ms" for k, v in budget.items())


# -- the penalty ----------------------------------------------------------------------------------------------------
def penalised(loss: torch.Tensor, expected: dict[str, torch.Tensor], budget: dict[str, float], form: str,
              alpha: float = DEFAULTS["alpha"], beta: float = DEFAULTS["beta"],
              lam: float = DEFAULTS["lambda"]) -> torch.Tensor:
    """The architecture loss with the budget penalty of ``form`` (see the module docstring)."""
    if form == "mul#log":
        factor = loss.new_tensor(alpha)
        for metric, target in budget.items():
            u = _LOG_UNIT[metric]
            # the log of a cost under 2 units (a latency of a few µs) is kept at log 2, so the factor stays finite
            e = torch.clamp(expected[metric] * u, min=2.0)
            factor = factor * (torch.log(e) / math.log(max(target * u, 2.0))) ** beta
        return loss * factor
    if form == "add#linear":
        return loss + lam * sum(torch.clamp(expected[m] / t - 1, min=0) for m, t in budget.items())
    raise ConfigError(f"--budget-penalty must be one of {', '.join(PENALTIES)}, got {form!r}")


class BudgetPenalty:
    """The penalty of a search's architecture step: ``self(loss, model)`` is the penalised loss; the expected
    costs of the last call are kept for the log."""

    def __init__(self, cost_model: CostModel, budget: dict[str, float], form: str, alpha: float, beta: float,
                 lam: float) -> None:
        self.cost_model, self.budget, self.form = cost_model, budget, form
        self.alpha, self.beta, self.lam = alpha, beta, lam

    def expected(self, model, metrics: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        weights, edges = model.arch_weights(), model.edge_weights()
        return {m: self.cost_model.expected(m, [w.double() for w in weights],
                                            [None if e is None else e.double() for e in edges])
                for m in (metrics or self.budget)}

    def __call__(self, loss: torch.Tensor, model) -> torch.Tensor:
        e = self.expected(model)
        return penalised(loss.double(), e, self.budget, self.form, self.alpha, self.beta, self.lam).to(loss.dtype)


# -- the constrained derivation -------------------------------------------------------------------------------------
def _node_options(w: torch.Tensor, costs: list[torch.Tensor], primitives: Sequence[str], steps: int,
                  skip_dim: bool) -> list[list[tuple[float, tuple[float, ...], tuple[Edge, Edge]]]]:
    """Per node: (score, cost vector, the two edges) of every pair of inputs and ops, Pareto-pruned."""
    keep = [k for k, p in enumerate(primitives) if p != "none"]
    out, start = [], 0
    for i in range(steps):
        opts = []
        for a, b in itertools.combinations(range(2 + i), 2):
            for oa, ob in itertools.product(keep, keep):
                score = float(w[start + a, oa] + w[start + b, ob])
                cost = tuple(float(c[start + a, oa] + c[start + b, ob]) for c in costs)
                if skip_dim:
                    cost += (float(primitives[oa] == "skip_connect") + float(primitives[ob] == "skip_connect"),)
                ea, eb = (primitives[oa], a), (primitives[ob], b)
                # the stronger edge first, as DARTS's rule writes them (ties: the lower input)
                pair = (ea, eb) if float(w[start + a, oa]) >= float(w[start + b, ob]) else (eb, ea)
                opts.append((score, cost, pair))
        out.append(_pareto(opts))
        start += 2 + i
    return out


def _pareto(items: list) -> list:
    """Keep the items (score, cost vector, ...) that no other beats: higher-or-equal score at lower-or-equal cost
    in every dimension (of equal ones, the first)."""
    items = sorted(items, key=lambda t: -t[0])
    kept: list = []
    for it in items:
        if not any(k[0] >= it[0] and all(x <= y for x, y in zip(k[1], it[1])) for k in kept):
            kept.append(it)
    return kept


def constrained_derive(model: CostModel, weights: Sequence[torch.Tensor], budget: dict[str, float],
                       edge_weights: Sequence[torch.Tensor | None] = (None, None),
                       skip_limit: int | None = None) -> Genotype | None:
    """The genotype of highest score whose exact cost fits ``budget`` (and whose normal cell holds at most
    ``skip_limit`` skip connections), or None when none does.

    Exact: costs are additive over nodes, so the nodes (of both cell types) are combined one at a time keeping the
    Pareto front of (score, partial cost) and dropping partial choices that cannot fit even with the cheapest
    completion; per node there are C(n, 2)·|ops|² options (810 for the last node of the AT-DARTS space)."""
    metrics = list(budget)
    limits = [budget[m] - model.fixed(m) for m in metrics]
    nodes: list[tuple[str, int, list]] = []
    for kind, w, e in zip(("normal", "reduce"), weights, edge_weights):
        w = w.detach().double().cpu() * (1.0 if e is None else e.detach().double().cpu()[:, None])
        costs = [model.table(m, kind) for m in metrics]
        skip_dim = skip_limit is not None and kind == "normal"
        for i, opts in enumerate(_node_options(w, costs, model.primitives, model.steps, skip_dim)):
            if skip_limit is not None and not skip_dim:  # a zero skip count for the reduction cell
                opts = [(s, c + (0.0,), p) for s, c, p in opts]
            nodes.append((kind, i, opts))
    if skip_limit is not None:
        limits.append(float(skip_limit))
    dims = len(limits)
    # the cheapest completion after each node, per dimension
    rest = [[0.0] * dims for _ in range(len(nodes) + 1)]
    for n in range(len(nodes) - 1, -1, -1):
        rest[n] = [rest[n + 1][d] + min(c[d] for _, c, _ in nodes[n][2]) for d in range(dims)]
    tol = 1e-9
    front = [(0.0, (0.0,) * dims, ())]
    for n, (_, _, opts) in enumerate(nodes):
        grown = []
        for score, cost, path in front:
            for s, c, pair in opts:
                total = tuple(x + y for x, y in zip(cost, c))
                if all(t + r <= lim + tol * max(1.0, abs(lim)) for t, r, lim in zip(total, rest[n + 1], limits)):
                    grown.append((score + s, total, path + (pair,)))
        front = _pareto(grown)
        if not front:
            return None
    best = front[0][2]  # the highest score (sorted by _pareto)
    concat = model.concat
    normal = [e for pair in best[:model.steps] for e in pair]
    reduce = [e for pair in best[model.steps:] for e in pair]
    return Genotype(normal, concat, reduce, list(concat))


def smallest_cost(model: CostModel, metric: str) -> float:
    """The smallest ``metric`` of any genotype DARTS's rule may derive: per node, its two cheapest edges."""
    keep = [k for k, p in enumerate(model.primitives) if p != "none"]
    total = model.fixed(metric)
    for kind in ("normal", "reduce"):
        cheapest = model.table(metric, kind)[:, keep].min(-1).values.tolist()
        start = 0
        for i in range(model.steps):
            total += sum(sorted(cheapest[start:start + 2 + i])[:2])
            start += 2 + i
    return total


def check_feasible(model: CostModel, budget: dict[str, float], skip_limit: int | None = None) -> None:
    """Refuse a budget that no derivable genotype meets, naming the smallest achievable cost."""
    for metric, target in budget.items():
        low = smallest_cost(model, metric)
        if low > target:
            raise ConfigError(f"--budget {metric}={_show(metric, target)} is impossible: the smallest achievable "
                              f"{metric} of this network is {_show(metric, low)}")
    uniform = [torch.ones(len(edge_rows(model.steps)), len(model.primitives), dtype=torch.float64)] * 2
    if constrained_derive(model, uniform, budget, skip_limit=skip_limit) is None:
        lows = ", ".join(f"{m} {_show(m, smallest_cost(model, m))}" for m in budget)
        raise ConfigError(f"--budget {format_budget(budget)} is impossible: each is achievable alone ({lows}) but no "
                          f"genotype meets them all" + ("" if skip_limit is None else
                                                        f" with at most {skip_limit} skip connections"))


def _show(metric: str, value: float) -> str:
    return f"{value:.3f} ms" if metric == "latency" else f"{int(round(value)):,}"


# -- a search's budget ----------------------------------------------------------------------------------------------
class SearchBudget:
    """What a search (:class:`fastnas.search.Search`) does with costs: the expected cost of every metric each epoch,
    and with ``--budget`` the penalty (:attr:`penalty`), the feasibility check (at construction, before anything is
    written) and the derivation that meets it (:meth:`derive`).

    The network costed is the retraining preset ``cfg.deploy`` (default :func:`fastnas.costmodel.default_preset` of the
    dataset) with ``--deploy-C``, ``--deploy-layers``, ``--deploy-network``, for the search's data (classes, channels,
    image side). Latency needs ``--latency-table FILE`` or a latency budget, which measures a table on the search's
    device (kept as ``latency_table.json``)."""

    def __init__(self, cfg, info, model, device: torch.device) -> None:
        from .costmodel import Deployment, default_preset
        from .latency import LatencyTable

        self.budget = parse_budget(cfg.budget) if cfg.budget else {}
        self.deployment = Deployment.from_preset(cfg.deploy or default_preset(cfg.dataset), info.num_classes,
                                                 info.in_channels, info.image_size, C=cfg.deploy_C,
                                                 layers=cfg.deploy_layers, network=cfg.deploy_network)
        if cfg.latency_table:
            self.latency = LatencyTable.load(cfg.latency_table)
        elif "latency" in self.budget:
            self.latency = LatencyTable.for_target("cuda" if device.type == "cuda" else "cpu")
        else:
            self.latency = None
        self.model = CostModel(self.deployment, model.primitives, model.steps, model.multiplier, self.latency)
        self.skip_limit = cfg.skip_limit
        self.penalty = (BudgetPenalty(self.model, self.budget, cfg.budget_penalty, cfg.budget_alpha,
                                      cfg.budget_beta, cfg.budget_lambda) if self.budget else None)
        self.unavailable = None  # why this search's network cannot be costed (without a budget, only logged)
        if self.budget:
            check_feasible(self.model, self.budget, cfg.skip_limit)
        else:
            try:
                self.model.fixed("params")
            except ConfigError as exc:
                self.unavailable = str(exc)

    def describe(self) -> str:
        d = self.deployment
        if self.unavailable:
            return f"no cost is logged: the costed network cannot be built ({self.unavailable}); see --deploy"
        text = (f"cost of the {d.network} network C={d.C}, {d.layers} cells, {d.num_classes} classes, "
                f"{d.input_size}x{d.input_size}x{d.in_channels}")
        if self.budget:
            p = self.penalty
            form = (f"alpha {p.alpha}, beta {p.beta}" if p.form == "mul#log" else f"lambda {p.lam}")
            text += f"; budget {format_budget(self.budget)}, penalty {p.form} ({form})"
        return text

    def expected(self, model) -> dict[str, float]:
        """The expected cost of every metric now (for the log and ``alphas.json``; empty when unavailable)."""
        if self.unavailable:
            return {}
        with torch.no_grad():
            weights, edges = model.arch_weights(), model.edge_weights()
            return {m: float(self.model.expected(m, [w.double().cpu() for w in weights],
                                                 [None if e is None else e.double().cpu() for e in edges]))
                    for m in self.model.metrics}

    def derive(self, model) -> Genotype:
        """The genotype of highest score that meets the budget (and the skip limit)."""
        weights, edges = model.arch_weights(), model.edge_weights()
        g = constrained_derive(self.model, weights, self.budget, edges, self.skip_limit)
        if g is None:  # cannot happen after check_feasible; kept as a clear error rather than a crash
            raise ConfigError(f"no genotype meets --budget {format_budget(self.budget)}")
        return g

    def record(self, genotype: Genotype) -> dict:
        """What genotype.json says about cost: the exact cost, the budget and the network costed."""
        if self.unavailable:
            return {}
        out = {"cost": self.model.cost(genotype), "deployment": self.deployment.to_dict()}
        if self.budget:
            out["budget"] = dict(self.budget)
        if self.latency is not None:
            out["latency_table"] = dict(self.latency.meta)
        return out
