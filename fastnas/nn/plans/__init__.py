"""How a search cell's node sums Σ w·op(h) are executed: one plan per way, chosen once per network.

===============  =========================================================================================
``plain``        every candidate whole, every activation stored (:class:`PlainPlan`, as DARTS)
``memory``       parameter-free candidates recomputed in the backward, relu(state) shared (:class:`MemoryPlan`)
``fused_norms``  the memory plan, with the ``cpu`` backend's node sum applying the candidates' final batch norms
                 (:class:`FusedNormsPlan`; the default)
``partial``      PC-DARTS's partial channels (:class:`PartialChannelsPlan`)
``regions``      another plan with the cell's modules run as compiled regions (:class:`RegionsPlan`;
                 :func:`fastnas.compilation.compile_regions`)
``aux_skip``     another plan's sums plus DARTS-'s auxiliary skip on every edge (:class:`AuxSkipPlan`;
                 a wrapper, like ``regions``, set by ``--aux-skip``)
===============  =========================================================================================
"""
from __future__ import annotations

from ...errors import ConfigError
from .aux_skip import AuxSkipPlan
from .base import CellPlan, NodeSum, Plan, Runner
from .fused_norms import FusedNormsPlan
from .memory import MemoryPlan
from .partial import PartialChannelsPlan
from .plain import PlainPlan
from .regions import RegionsPlan

PLANS: dict[str, type[Plan]] = {plan.name: plan for plan in (PlainPlan, MemoryPlan, FusedNormsPlan,
                                                             PartialChannelsPlan, RegionsPlan)}

__all__ = ["AuxSkipPlan", "CellPlan", "FusedNormsPlan", "MemoryPlan", "NodeSum", "PLANS", "PartialChannelsPlan", "Plan",
           "PlainPlan", "RegionsPlan", "Runner", "default_plan", "make_plan"]


def default_plan(memory_efficient: bool = True, partial_channels: int = 1) -> Plan:
    """The plan ``memory_efficient`` stands for: fused norms (or the memory plan where they do not apply), else
    plain; with partial channels, PC-DARTS's sums with or without the memory savings."""
    if partial_channels > 1:
        return PartialChannelsPlan(memory_efficient)
    return FusedNormsPlan() if memory_efficient else PlainPlan()


def make_plan(plan: str | Plan, partial_channels: int = 1) -> Plan:
    """``plan`` (a name of :data:`PLANS` or a plan) for cells with ``partial_channels``; ConfigError when the plan
    is not for such cells."""
    if isinstance(plan, str):
        if plan not in PLANS:
            raise ConfigError(f"unknown plan {plan!r}; choose one of {', '.join(PLANS)}")
        plan = RegionsPlan(default_plan(True, partial_channels)) if plan == "regions" else PLANS[plan]()
    if not isinstance(plan, Plan):
        raise ConfigError(f"a plan is a name or a fastnas.nn.plans.Plan, got {type(plan).__name__}")
    if plan.partial != (partial_channels > 1):
        raise ConfigError(f"plan {plan!r} does not run cells with partial channels {partial_channels} "
                          f"(the partial plan runs those, and only those)")
    return plan
