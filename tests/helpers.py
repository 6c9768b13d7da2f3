"""Small shared builders for the tests."""
from __future__ import annotations

import pytest
import torch

import fastnas.ops as ops
from benchmarks.op_calls import OpCounter  # noqa: F401  (shared with the tests)
from fastnas.config import SearchConfig

BACKENDS = ("reference", "cpu", "cuda", "triton")


def tiny_search_config(**overrides) -> SearchConfig:
    """A search that runs in about a second: 64 digits, C=4, 3 cells, 2 steps an epoch."""
    base = dict(dataset="digits", limit=64, C=4, layers=3, epochs=2, batch_size=16, max_steps=2, seed=3,
                arch_lr=3e-3, device="cpu")
    base.update(overrides)
    return SearchConfig(**base)


def backend_targets(names=BACKENDS) -> list:
    """pytest params (backend, device) for each backend of ``names`` that can run on each device here."""
    out = []
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for name in names:
            try:
                ops.resolve_backend(dev, name)
            except ops.BackendUnavailable:
                continue
            out.append(pytest.param(name, dev, id=f"{name}-{dev}"))
    return out


def saved_bytes(net: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes that autograd keeps for the backward of one forward pass (parameters excluded)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x)
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    return sum(v for k, v in seen.items() if k not in params)

