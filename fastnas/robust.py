"""Collapse controls: options against DARTS's collapse into parameter-free cells.

With longer searches DARTS's derived cells fill with parameter-free operations (skip connections, pooling) and get
worse (Zela et al., 2020, "Understanding and Robustifying Differentiable Architecture Search"). Each control below
is an option of ``python -m fastnas.search`` and a :class:`fastnas.config.SearchConfig` field, off by default:

=====================  ================================================================================================
``--skip-limit N``     P-DARTS (Chen et al., 2019): the derived normal cell keeps at most N ``skip_connect`` edges.
                       While it has more, the skip weight of its weakest skip edge is set to 0 and the cell derived
                       again with DARTS's rule, so that node takes its next-best choice; each replacement is logged.
``--aux-skip``         DARTS- (Chu et al., 2021): an auxiliary skip on every edge, outside α (the identity; at stride
                       2 a factorized reduction of its own), weighted β_t = 1 − e/E in epoch e (from 0) of E
                       (:class:`fastnas.nn.plans.AuxSkipPlan`).
``--beta-decay λ``     β-DARTS (Ye et al., 2022): Beta-Decay regularisation in the architecture step,
                       L_β = λ_t · mean over the edges of both cell types of log Σ_k exp(α_k), λ_t = λ · e/E.
``--alpha-noise ε``    SDARTS-RS (Chen and Hsieh, 2020): in the weight step only, the softmax weights of every edge
                       are perturbed by U(−ε_t, ε_t), clipped to [0, 1] and renormalised; the architecture step sees
                       the clean α. As in SDARTS's code, ε_t rises linearly from 0.03 in the first epoch towards ε
                       (ε_t = 0.03 + (ε − 0.03)·e/E; the code's ε is 0.3; an ε below 0.03 is used throughout).
``--early-stop``       DARTS+ (Liang et al., 2019): stop when the derived normal cell holds two or more skip
                       connections, or when the ranking of the learnable ops (with parameters) on every edge has not
                       changed for ``--early-stop-patience`` epochs (10 in the paper).
=====================  ================================================================================================

:class:`Controls` gathers them for :class:`fastnas.search.Search`, which only calls it at fixed points of its loop.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .genotype import Edge, Genotype, derive_cell, gene_rows
from .indicators import is_parameter_free_op
from .nn.plans import AuxSkipPlan

SKIP = "skip_connect"


# -- P-DARTS: a limit on skip connections ---------------------------------------------------------------------------
def limit_skips(weights: torch.Tensor, primitives: Sequence[str], steps: int, limit: int,
                edge_weights: torch.Tensor | None = None) -> tuple[list[Edge], list[str]]:
    """DARTS's derivation of one cell from softmax ``weights`` [edges, ops], with at most ``limit`` skip edges.

    While the derived cell has more, the skip weight of its weakest skip edge (scaled by ``edge_weights`` when
    given, as the derivation ranks it) is set to 0 and the cell is derived again. Returns (edges, one note per
    replacement)."""
    gene = derive_cell(weights, primitives, steps, edge_weights)
    if SKIP not in primitives:
        return gene, []
    k = list(primitives).index(SKIP)
    w = weights.detach().double().cpu().clone()
    scale = edge_weights.detach().double().cpu() if edge_weights is not None else torch.ones(w.shape[0])
    notes = []
    while sum(op == SKIP for op, _ in gene) > limit:
        rows = gene_rows(gene)
        skips = [(float(w[r, k] * scale[r]), n, r) for n, ((op, _), r) in enumerate(zip(gene, rows)) if op == SKIP]
        weakest, n, row = min(skips)  # ties go to the earlier edge
        w[row, k] = 0.0
        before = gene
        gene = derive_cell(w, primitives, steps, edge_weights)
        node = n // 2
        notes.append(f"node {node}: {before[n][0]} from input {before[n][1]} (weight {weakest:.4f}) replaced; "
                     f"node {node} now takes {gene[2 * node]} and {gene[2 * node + 1]}")
    return gene, notes


def derive_with_skip_limit(model, limit: int | None) -> tuple[Genotype, list[str]]:
    """The genotype of ``model`` (a :class:`fastnas.SuperNet`), its normal cell holding at most ``limit`` skip
    connections (None: DARTS's rule alone). Returns (genotype, notes on what was replaced)."""
    genotype = model.genotype()
    if limit is None:
        return genotype, []
    w_normal, _ = model.arch_weights()
    e_normal, _ = model.edge_weights()
    normal, notes = limit_skips(w_normal, model.primitives, model.steps, limit, e_normal)
    return genotype._replace(normal=normal), notes


# -- DARTS-: the auxiliary skip's schedule --------------------------------------------------------------------------
def linear_schedule(start: float, end: float, epoch: int, epochs: int) -> float:
    """start + (end − start)·e/E in epoch ``epoch`` (from 0) of ``epochs``: the ramp of every control's coefficient."""
    return start + (end - start) * epoch / epochs


def aux_skip_coefficient(epoch: int, epochs: int, beta0: float = 1.0) -> float:
    """β_t = β0 · (1 − e/E) during epoch ``epoch`` (from 0) of ``epochs``: β0 in the first, β0/E in the last."""
    return linear_schedule(beta0, 0.0, epoch, epochs)


# -- β-DARTS: Beta-Decay regularisation -----------------------------------------------------------------------------
def beta_decay_loss(alphas: Sequence[torch.Tensor]) -> torch.Tensor:
    """mean over all edges of log Σ_k exp(α_k): the smoothmax of each edge's logits (the formula; for autograd)."""
    return torch.cat([torch.logsumexp(a, dim=-1) for a in alphas]).mean()


def beta_decay_gradient(alphas: Sequence[torch.Tensor], coefficient: float) -> list[torch.Tensor]:
    """d(coefficient · :func:`beta_decay_loss`)/dα in closed form: coefficient · softmax(α) / (number of edges)."""
    edges = sum(a.shape[0] for a in alphas)
    return [coefficient * F.softmax(a.detach(), dim=-1) / edges for a in alphas]


def beta_decay_schedule(epoch: int, epochs: int, lam: float) -> float:
    """λ_t = λ · e/E in epoch ``epoch`` (from 0) of ``epochs``: 0 in the first epoch, rising linearly."""
    return linear_schedule(0.0, lam, epoch, epochs)


class BetaDecay:
    """The Beta-Decay term of the architecture step: its gradient, added to the α gradient of each step."""

    def __init__(self, lam: float) -> None:
        self.lam, self.coefficient = lam, 0.0

    def set_epoch(self, epoch: int, epochs: int) -> None:
        self.coefficient = beta_decay_schedule(epoch, epochs, self.lam)

    def __call__(self, model) -> list[torch.Tensor]:
        """The term's gradient for each of ``model.arch_parameters()`` (zeros for PC-DARTS's edge weights)."""
        alphas = [model.alphas_normal, model.alphas_reduce]
        grads = beta_decay_gradient(alphas, self.coefficient)
        return grads + [torch.zeros_like(p) for p in model.arch_parameters()[2:]]


# -- SDARTS-RS: random smoothing ------------------------------------------------------------------------------------
def perturbed_weights(alpha: torch.Tensor, epsilon: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """softmax(α) + U(−ε, ε), clipped to [0, 1], each edge renormalised (an edge clipped to all zeros keeps its
    strongest op at 1), as SDARTS-RS's random perturbation of the architecture weights."""
    w = F.softmax(alpha.detach().double(), dim=-1)
    noise = torch.rand(w.shape, generator=generator, dtype=torch.float64, device="cpu").to(w.device)
    p = (w + (2 * noise - 1) * epsilon).clamp_(0.0, 1.0)
    dead = p.sum(dim=-1, keepdim=True) == 0
    strongest = torch.zeros_like(p).scatter_(-1, w.argmax(dim=-1, keepdim=True), 1.0)  # (one_hot reads its input)
    p = torch.where(dead, strongest, p)
    return p / p.sum(dim=-1, keepdim=True)


def alpha_noise_schedule(epoch: int, epochs: int, epsilon: float, start: float = 0.03) -> float:
    """SDARTS-RS's ramp: ε_t = ε0 + (ε − ε0)·e/E in epoch ``epoch`` (from 0) of ``epochs``, ε0 = min(``start``, ε)."""
    return linear_schedule(min(start, epsilon), epsilon, epoch, epochs)


@contextlib.contextmanager
def alpha_noise(model, epsilon: float) -> Iterator[None]:
    """For the block, α of both cell types replaced by log(:func:`perturbed_weights`), so the network's softmax
    yields exactly the perturbed weights (a weight clipped to 0 is log 0 = −inf, which softmax maps to 0); the
    clean α are put back after it. The draws come from torch's global generator (a resume restores it)."""
    alphas = [model.alphas_normal, model.alphas_reduce]
    clean = [a.detach().clone() for a in alphas]
    with torch.no_grad():
        for a in alphas:
            a.copy_(perturbed_weights(a, epsilon).log().to(a.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for a, c in zip(alphas, clean):
                a.copy_(c)


# -- DARTS+: early stopping -----------------------------------------------------------------------------------------
def alpha_ranking(entry: dict, primitives: Sequence[str]) -> tuple:
    """Per edge of both cell types, the learnable ops (those with parameters: not ``none``, skip or pooling) from
    strongest to weakest, as DARTS+'s criterion ranks them (an ``alphas.json`` epoch entry: softmax weights under
    ``normal`` and ``reduce``)."""
    keep = [k for k, p in enumerate(primitives) if not is_parameter_free_op(p)]
    ranking = []
    for kind in ("normal", "reduce"):
        for row in entry[kind]:
            ranking.append(tuple(sorted(keep, key=lambda k: (-row[k], k))))
    return tuple(ranking)


def early_stop_reason(history: Sequence[dict], primitives: Sequence[str], patience: int,
                      warmup_epochs: int = 0) -> str | None:
    """DARTS+'s criteria on the epochs so far (``alphas.json`` entries): why the search stops now, or None.

    Stop when the last epoch's derived normal cell holds two or more skip connections, or when the ranking of the
    learnable ops on every edge (:func:`alpha_ranking`) has been the same for the last ``patience`` epochs (epochs of
    warm-up, when α does not move, are not counted)."""
    if not history:
        return None
    last = history[-1]
    skips = sum(op == SKIP for op, _ in Genotype.parse(last["genotype"]).normal)
    if skips >= 2:
        return f"the normal cell holds {skips} skip connections (DARTS+: two or more)"
    moving = [h for h in history if h["epoch"] > warmup_epochs]
    if len(moving) > patience:
        recent = {alpha_ranking(h, primitives) for h in moving[-(patience + 1):]}
        if len(recent) == 1:
            return f"the ranking of the alphas has not changed for {patience} epochs (DARTS+)"
    return None


# -- the controls of a search ---------------------------------------------------------------------------------------
class Controls:
    """The collapse controls of one search (a :class:`fastnas.config.SearchConfig`) over ``model`` (built with
    ``aux_skip=cfg.aux_skip``, whose plan is then DARTS-'s auxiliary skip), at the points of the loop where they
    act: each epoch's schedules (:meth:`start_epoch`), the weight step
    (:meth:`weight_step`), the architecture step's extra gradients (:attr:`arch_terms`), the derivation
    (:meth:`derive`) and the end of an epoch (:meth:`stop_reason`)."""

    def __init__(self, cfg, model=None) -> None:
        self.cfg = cfg
        self.aux_plan: AuxSkipPlan | None = None
        if cfg.aux_skip:
            if not isinstance(getattr(model, "plan", None), AuxSkipPlan):
                raise ConfigError("--aux-skip needs a network built with aux_skip=True")
            self.aux_plan = model.plan
        self.beta_decay = BetaDecay(cfg.beta_decay) if cfg.beta_decay > 0 else None
        self.noise_epsilon = cfg.alpha_noise  # SDARTS-RS's ε_t, set each epoch
        self.arch_terms = [self.beta_decay] if self.beta_decay is not None else []

    def describe(self) -> list[str]:
        cfg, out = self.cfg, []
        if cfg.skip_limit is not None:
            out.append(f"skip limit {cfg.skip_limit} (P-DARTS)")
        if cfg.aux_skip:
            out.append("auxiliary skip, coefficient 1 -> 0 (DARTS-)")
        if cfg.beta_decay > 0:
            out.append(f"Beta-Decay lambda {cfg.beta_decay}, ramped from 0 (beta-DARTS)")
        if cfg.alpha_noise > 0:
            out.append(f"alpha noise U(-eps, eps) in the weight step, eps {min(0.03, cfg.alpha_noise)} -> "
                       f"{cfg.alpha_noise} (SDARTS-RS)")
        if cfg.early_stop:
            out.append(f"early stop, patience {cfg.early_stop_patience} (DARTS+)")
        return out

    def start_epoch(self, epoch: int) -> None:
        """Set the schedules for epoch ``epoch`` (from 0)."""
        if self.aux_plan is not None:
            self.aux_plan.coefficient = aux_skip_coefficient(epoch, self.cfg.epochs)
        if self.beta_decay is not None:
            self.beta_decay.set_epoch(epoch, self.cfg.epochs)
        if self.cfg.alpha_noise > 0:
            self.noise_epsilon = alpha_noise_schedule(epoch, self.cfg.epochs, self.cfg.alpha_noise)

    def weight_step(self, model):
        """The context of a weight step: α perturbed (SDARTS-RS) or as it is."""
        if self.cfg.alpha_noise > 0:
            return alpha_noise(model, self.noise_epsilon)
        return contextlib.nullcontext()

    def derive(self, model) -> tuple[Genotype, list[str]]:
        return derive_with_skip_limit(model, self.cfg.skip_limit)

    def stop_reason(self, history: Sequence[dict], primitives: Sequence[str]) -> str | None:
        if not self.cfg.early_stop:
            return None
        return early_stop_reason(history, primitives, self.cfg.early_stop_patience, self.cfg.warmup_epochs)
