"""The plans of fastnas.nn.plans: each computes what the plain plan computes (logits, loss, every gradient, the batch
norms' running statistics) with a fixed seed, and is chosen once, by name or as an object."""
from __future__ import annotations

import unittest.mock as mock

import pytest
import torch

import fastnas
from fastnas.errors import ConfigError
from fastnas.nn import plans
from helpers import saved_bytes

CPU = fastnas.ops.available_backends()["cpu"] == "available"
BACKENDS = ["reference"] + (["cpu"] if CPU else [])


def _net(plan=None, partial_channels=1, **kwargs):
    torch.manual_seed(0)
    net = fastnas.SuperNet(8, 3, 10, primitives="at-darts", steps=2, multiplier=2, in_channels=1,
                           partial_channels=partial_channels, plan=plan, **kwargs)
    with torch.no_grad():
        for a in net.arch_parameters():
            a.normal_(0, 0.3)
    return net.to(memory_format=torch.channels_last)


def _step(net, backend):
    """Logits, loss, every gradient and every buffer after one forward and backward."""
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)).contiguous(
        memory_format=torch.channels_last)
    y = torch.arange(4) % 10
    with fastnas.ops.backend(backend):
        logits = net(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    return logits.detach(), loss.detach(), grads, dict(net.named_buffers())


def _assert_same(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)
    assert got[2].keys() == want[2].keys() and {"alphas_normal", "alphas_reduce"} <= want[2].keys()
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    for name in want[3]:
        torch.testing.assert_close(got[3][name], want[3][name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("plan", ["memory", "fused_norms", plans.MemoryPlan()])
def test_plan_equals_plain(plan, backend):
    _assert_same(_step(_net(plan), backend), _step(_net("plain"), backend))


@pytest.mark.skipif(not CPU, reason="the fused node sum is the cpu backend's")
def test_fused_norms_plan_runs_the_fused_sum_where_it_applies():
    kernels = fastnas.ops.implementation("cpu", "cpu").kernels
    fused = mock.Mock(side_effect=kernels["normalized_mixed_sum"])
    with mock.patch.dict(kernels, {"normalized_mixed_sum": fused}):
        _step(_net("fused_norms"), "cpu")
        assert fused.called
        fused.reset_mock()
        _step(_net("fused_norms"), "reference")
        _step(_net("memory"), "cpu")
    assert not fused.called


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_plan_with_and_without_memory_savings(backend):
    lean = _net(partial_channels=2)
    assert isinstance(lean.plan, plans.PartialChannelsPlan) and lean.plan.memory_efficient
    _assert_same(_step(lean, backend), _step(_net(partial_channels=2, memory_efficient=False), backend))


def test_memory_plans_store_less_than_plain():
    x = torch.randn(4, 1, 8, 8).contiguous(memory_format=torch.channels_last)

    def saved(net):
        return saved_bytes(net, x)

    plain = saved(_net("plain"))
    assert saved(_net("memory")) < 0.8 * plain
    assert saved(_net(partial_channels=2)) < saved(_net(partial_channels=2, memory_efficient=False))


def test_no_grad_forward_equals_plain():
    with torch.no_grad():
        for plan in ("memory", "fused_norms"):
            torch.testing.assert_close(_step_no_grad(_net(plan)), _step_no_grad(_net("plain")))


def _step_no_grad(net):
    return net(torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2)))


def test_plan_is_chosen_by_name_object_or_memory_switch():
    assert isinstance(_net().plan, plans.FusedNormsPlan)
    assert isinstance(_net(memory_efficient=False).plan, plans.PlainPlan)
    assert isinstance(_net("memory").plan, plans.MemoryPlan)
    net = _net()
    net.set_memory_efficient(False)
    assert isinstance(net.plan, plans.PlainPlan) and not net.memory_efficient
    net.set_memory_efficient(True)
    assert isinstance(net.plan, plans.FusedNormsPlan) and net.memory_efficient
    net.set_plan("memory")
    assert all(isinstance(cell.plan, plans.memory.MemoryCellPlan) for cell in net.cells)
    assert isinstance(_net("partial", partial_channels=2).plan, plans.PartialChannelsPlan)


def test_plans_refused_where_they_do_not_fit():
    with pytest.raises(ConfigError, match="unknown plan"):
        _net("fast")
    with pytest.raises(ConfigError, match="partial"):
        _net("partial")
    with pytest.raises(ConfigError, match="partial"):
        _net("memory", partial_channels=2)


def test_regions_plan_wraps_the_memory_sums_and_replaces_no_method():
    net = _net()
    count = fastnas.compilation.compile_regions(net, "cpu")
    assert isinstance(net.plan, plans.RegionsPlan) and isinstance(net.plan.base, plans.MemoryPlan)
    assert count == sum(len(cell.edges) + 2 for cell in net.cells)
    assert not any(name in module.__dict__ for module in net.modules() for name in ("forward", "after_relu"))
    fastnas.compilation.compile_regions(net, "cpu")  # again: still one level of regions
    assert not isinstance(net.plan.base, plans.RegionsPlan)
    plain = _net("plain")
    fastnas.compilation.compile_regions(plain, "cpu")
    assert isinstance(plain.plan.base, plans.PlainPlan) and not plain.memory_efficient
