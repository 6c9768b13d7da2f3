"""Small shared builders for the tests."""
from __future__ import annotations

from fastnas.config import SearchConfig


def tiny_search_config(**overrides) -> SearchConfig:
    """A search that runs in about a second: 64 digits, C=4, 3 cells, 2 steps an epoch."""
    base = dict(dataset="digits", limit=64, C=4, layers=3, epochs=2, batch_size=16, max_steps=2, seed=3,
                arch_lr=3e-3, device="cpu")
    base.update(overrides)
    return SearchConfig(**base)
