"""Search spaces: the registry of candidate operations and the named sets of primitives.

``darts`` is the 8 primitives of DARTS; ``at-darts`` (the default) adds the CBAM channel and spatial attention gates,
as in Shin and Bae. Register a new operation with :func:`register_op` and use its name in any list of primitives.
"""
from __future__ import annotations

from typing import Callable, Sequence

from torch import nn

from .errors import ConfigError
from .nn.attention import ChannelAttention
from .nn.operations import BUILTIN_OPS, gated

OpFactory = Callable[[int, int, bool], nn.Module]
"""``factory(C, stride, affine) -> module`` mapping [N, C, H, W] to [N, C, H / stride, W / stride]."""

DARTS_PRIMITIVES = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)
ATTENTION_PRIMITIVES = ("channel_attention", "spatial_attention")
SPACES: dict[str, tuple[str, ...]] = {
    "darts": DARTS_PRIMITIVES,
    "at-darts": DARTS_PRIMITIVES + ATTENTION_PRIMITIVES,
}
DEFAULT_SPACE = "at-darts"

_REGISTRY: dict[str, OpFactory] = dict(BUILTIN_OPS)


def register_op(name: str, factory: OpFactory, *, overwrite: bool = False) -> None:
    """Make ``name`` usable in search spaces and genotypes. A name containing ``pool`` gets DARTS's affine-free
    batch norm after it in search cells."""
    if not name.isidentifier():
        raise ConfigError(f"op name {name!r} must be a Python identifier (letters, digits, underscores)")
    if name in _REGISTRY and not overwrite:
        raise ConfigError(f"op {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = factory


def channel_attention_op(reduction: int) -> OpFactory:
    """A channel-attention factory with MLP reduction ``reduction`` (register it under a name of your choice)."""
    return lambda C, stride, affine: gated(ChannelAttention(C, reduction), C, stride, affine)


def registered_ops() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def make_op(name: str, C: int, stride: int, affine: bool) -> nn.Module:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown op {name!r}; known ops: {', '.join(_REGISTRY)}")
    return _REGISTRY[name](C, stride, affine)


def resolve_primitives(spec: str | Sequence[str]) -> tuple[str, ...]:
    """A space name (``darts``, ``at-darts``) or a list of op names → the validated tuple of op names."""
    if isinstance(spec, str):
        if spec in SPACES:
            return SPACES[spec]
        if "," in spec:
            spec = [s.strip() for s in spec.split(",") if s.strip()]
        else:
            raise ConfigError(f"unknown search space {spec!r}; use one of {', '.join(SPACES)} or a list of op names")
    names = tuple(spec)
    unknown = [n for n in names if n not in _REGISTRY]
    if unknown:
        raise ConfigError(f"unknown op(s) {', '.join(map(repr, unknown))}; known ops: {', '.join(_REGISTRY)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"duplicate op names in the search space: {list(names)}")
    if not [n for n in names if n != "none"]:
        raise ConfigError("the search space needs at least one op besides 'none'")
    return names
