"""How a search cell's node sums Σ w·op(h) are executed: one plan per way, built once per network by
:func:`make_plan` from the setting it will run in (:class:`Execution`).

===============  =========================================================================================
``plain``        every candidate whole in PyTorch's own modules, every activation stored (:class:`PlainPlan`,
                 the DARTS formulation)
``memory``       parameter-free candidates recomputed in the backward, relu(state) shared, lean modules
                 (:class:`MemoryPlan`)
``fused_norms``  the memory plan, with the backend's node sum applying the candidates' final batch norms
                 (:class:`FusedNormsPlan`; the default where its kernels run: the ``cpu`` backend, channels_last,
                 float32/float64, no autocast)
``batched``      each state's outgoing candidates as a few batched calls over stacked weights, added to the running
                 node sums by one call per state (:class:`BatchedPlan`)
``partial``      PC-DARTS's partial channels (:class:`PartialChannelsPlan`)
``regions``      another plan with the cell's modules run as compiled regions (:class:`RegionsPlan`)
``aux_skip``     another plan's sums plus DARTS-'s auxiliary skip on every edge (:class:`AuxSkipPlan`)
===============  =========================================================================================

The factory composes them in one order: the node sums (plain, memory, fused norms or partial), then compiled regions
around them, then the auxiliary skip around that. A plan asked for by name that cannot run in the setting is refused
with the reason; without a name the factory picks the fastest that can, and says why (``plan.reason``).
"""
from __future__ import annotations

import dataclasses

from ... import ops
from ...errors import ConfigError
from .aux_skip import AuxSkipPlan
from .base import CellPlan, NodeSum, Plan, Runner
from .batched import BatchedPlan
from .execution import Execution
from .fused_norms import FusedNormsPlan
from .memory import MemoryPlan
from .partial import PartialChannelsPlan
from .plain import PlainPlan
from .regions import RegionsPlan

PLANS: dict[str, type[Plan]] = {plan.name: plan for plan in (PlainPlan, MemoryPlan, FusedNormsPlan, BatchedPlan,
                                                             PartialChannelsPlan, RegionsPlan)}

__all__ = ["AuxSkipPlan", "BatchedPlan", "CellPlan", "Execution", "FusedNormsPlan", "MemoryPlan", "NodeSum", "PLANS",
           "PartialChannelsPlan", "Plan", "PlainPlan", "RegionsPlan", "Runner", "make_plan"]


def make_plan(plan: str | Plan | None = None, execution: Execution | None = None, *, store_all: bool = False,
              partial_channels: int = 1, aux_skip: bool = False) -> Plan:
    """The plan of a search network that runs in ``execution`` (default: :class:`Execution`'s defaults).

    ``plan``: a name of :data:`PLANS` (refused with a one-line :class:`ConfigError` where it cannot run), a
    :class:`Plan` (used as it is), or None for the best that can run: the DARTS formulation with ``store_all``, else
    fused norms where their kernels run, else the memory plan; a whole-model compile gets the plain sums (the
    compiler decides what to store). ``partial_channels`` > 1 takes the partial plan; ``execution.compile ==
    "regions"`` wraps the sums in compiled regions; ``aux_skip`` wraps the result in DARTS-'s auxiliary skip. The
    chosen plan's ``reason`` says why it was chosen."""
    execution = execution or Execution()
    if isinstance(plan, Plan):
        _check_partial(plan, partial_channels)
        plan.reason = plan.reason or "given"
        return plan
    if plan is not None and plan not in PLANS:
        raise ConfigError(f"unknown plan {plan!r}; choose one of {', '.join(PLANS)}")
    if plan == "regions":
        plan, execution = None, dataclasses.replace(execution, compile="regions")
    chosen = _node_sums(plan, execution, store_all, partial_channels)
    _check_partial(chosen, partial_channels)
    if isinstance(chosen, BatchedPlan):
        _check_batched(execution, store_all, aux_skip)
    if execution.compile == "regions":
        reason = chosen.reason
        chosen = RegionsPlan(chosen, execution.device)
        chosen.reason = f"compiled regions over the {chosen.base.name} sums ({reason})"
    if aux_skip:
        reason = chosen.reason
        chosen = AuxSkipPlan(chosen)
        chosen.reason = f"DARTS-'s auxiliary skip over the {chosen.base.name} plan ({reason})"
    return chosen


def _node_sums(name: str | None, execution: Execution, store_all: bool, partial_channels: int) -> Plan:
    """The plan that computes the node sums (before regions and the auxiliary skip are wrapped around it)."""
    if partial_channels > 1 and name in (None, "partial"):
        plan = PartialChannelsPlan(memory_efficient=not store_all)
        plan.reason = f"partial channels 1/{partial_channels}" + (", every activation stored" if store_all else "")
        return plan
    why_not = _fused_norms_unsupported(execution)
    if name is None:
        if store_all:
            name, reason = "plain", "every activation stored, as the DARTS formulation does"
        elif execution.compile == "model":
            name, reason = "plain", "whole-model compile: the compiler decides what to store"
        elif why_not is None:
            name, reason = "fused_norms", f"the {execution.resolved_backend} backend's fused node sums apply"
        else:
            name, reason = "memory", f"fused norms do not apply: {why_not}"
    else:
        reason = "asked for"
        if name == "fused_norms" and why_not is not None:
            raise ConfigError(f"plan 'fused_norms' cannot run here: {why_not}; use plan 'memory'")
    plan = PLANS[name]()
    plan.reason = reason
    return plan


def _fused_norms_unsupported(execution: Execution) -> str | None:
    if execution.compile is not None:
        return f"torch.compile ({execution.compile}) runs whole candidates"
    return ops.fused_norms_unsupported(execution.device, execution.activation_dtype, execution.channels_last,
                                       execution.amp != "off", execution.backend)


def _check_batched(execution: Execution, store_all: bool, aux_skip: bool) -> None:
    why_not = ("every activation stored (the DARTS formulation)" if store_all else
               f"autocast ({execution.amp})" if execution.amp != "off" else
               "a whole-model compile (not tested with it yet)" if execution.compile == "model" else
               "DARTS-'s auxiliary skip" if aux_skip else None)
    if why_not is not None:
        raise ConfigError(f"plan 'batched' cannot run with {why_not}; use plan 'memory'")


def _check_partial(plan: Plan, partial_channels: int) -> None:
    if plan.partial != (partial_channels > 1):
        raise ConfigError(f"plan {plan!r} does not run cells with partial channels {partial_channels} "
                          f"(the partial plan runs those, and only those)")
