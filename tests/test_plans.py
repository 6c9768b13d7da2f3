"""The plans of fastnas.nn.plans: each computes what the plain plan computes (logits, loss, every gradient, the batch
norms' running statistics) with a fixed seed, and is chosen once, by name or as an object."""
from __future__ import annotations

import pytest
import torch

import fastnas
from fastnas.errors import ConfigError
from fastnas.nn import plans
from fastnas.nn.lean import LeanBatchNorm2d, LeanConv2d
from helpers import OpCounter, saved_bytes

CPU = fastnas.ops.available_backends()["cpu"] == "available"
BACKENDS = ["reference"] + (["cpu"] if CPU else [])


def _net(plan=None, partial_channels=1, execution=plans.Execution(channels_last=True), **kwargs):
    torch.manual_seed(0)
    net = fastnas.SuperNet(8, 3, 10, primitives="at-darts", steps=2, multiplier=2, in_channels=1,
                           partial_channels=partial_channels, plan=plan, execution=execution, **kwargs)
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


def _fused_sums(net, backend, amp="off"):
    """How many fused node sums (``fastnas::normalized_mixed_sum``) one forward and backward of ``net`` ran."""
    with OpCounter() as counter, torch.autocast("cpu", torch.bfloat16, enabled=amp != "off"):
        _step(net, backend)
    return counter.counts["fastnas::normalized_mixed_sum"]


@pytest.mark.skipif(not CPU, reason="the fused node sum is the cpu backend's")
def test_fused_norms_plan_runs_the_fused_sum_where_it_applies():
    assert _fused_sums(_net("fused_norms"), "cpu") > 0
    assert _fused_sums(_net("memory"), "cpu") == 0


SETTINGS = [  # (execution, store_all, partial_channels): the settings the CLI offers on this machine and CUDA's
    (plans.Execution(device, backend, channels_last, amp, compile=scope), store_all, partial)
    for device, backend in (("cpu", "cpu"), ("cpu", "reference"), ("cuda", None))
    for channels_last in (True, False) for amp in ("off", "bf16", "fp16") for scope in (None, "regions", "model")
    for store_all in (False, True) for partial in (1, 2)
    if not (backend == "cpu" and not CPU)
]


@pytest.mark.parametrize("execution,store_all,partial", SETTINGS,
                         ids=[f"{e.device}-{e.backend}-{'cl' if e.channels_last else 'nchw'}-{e.amp}-{e.compile}-"
                              f"{'all' if s else 'lean'}-pc{p}" for e, s, p in SETTINGS])
def test_the_factory_builds_a_plan_that_runs_in_each_setting(execution, store_all, partial):
    """Fused norms are chosen exactly where their kernels run, and asked for elsewhere they are refused when the
    network is built; every plan says why it was chosen."""
    def build(plan=None, aux_skip=False):
        return plans.make_plan(plan, execution, store_all=store_all, partial_channels=partial, aux_skip=aux_skip)

    plan = build()
    assert plan.reason
    sums = plan.base if isinstance(plan, plans.RegionsPlan) else plan
    supported = (execution.device == "cpu" and execution.backend == "cpu" and execution.channels_last
                 and execution.amp == "off" and execution.compile is None)
    if partial > 1:
        assert isinstance(sums, plans.PartialChannelsPlan) and sums.memory_efficient != store_all
    elif store_all or execution.compile == "model":
        assert isinstance(sums, plans.PlainPlan)
    else:
        assert isinstance(sums, plans.FusedNormsPlan if supported else plans.MemoryPlan), plan.reason
    assert isinstance(plan, plans.RegionsPlan) == (execution.compile == "regions")
    assert isinstance(build(aux_skip=True), plans.AuxSkipPlan)
    if partial == 1 and not supported:
        with pytest.raises(ConfigError, match="fused_norms"):
            build("fused_norms")


@pytest.mark.skipif(not CPU, reason="the fused node sum is the cpu backend's")
@pytest.mark.parametrize("channels_last,amp", [(True, "off"), (False, "off"), (True, "bf16")])
def test_the_plan_built_is_the_plan_that_runs(channels_last, amp):
    """The network built for a setting runs the fused sums if and only if its plan is the fused-norms plan: no
    plan falls back to another per call."""
    execution = plans.Execution("cpu", "cpu", channels_last, amp)
    net = _net(execution=execution)
    if not channels_last:
        net = net.to(memory_format=torch.contiguous_format)
    fused = isinstance(net.plan, plans.FusedNormsPlan)
    assert fused == (channels_last and amp == "off")
    assert (_fused_sums(net, "cpu", amp) > 0) == fused


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
    assert isinstance(_net().plan, plans.FusedNormsPlan if CPU else plans.MemoryPlan)
    assert isinstance(_net(memory_efficient=False).plan, plans.PlainPlan)
    assert isinstance(_net("memory").plan, plans.MemoryPlan)
    assert all(isinstance(cell.plan, plans.memory.MemoryCellPlan) for cell in _net("memory").cells)
    given = plans.MemoryPlan()
    assert _net(given).plan is given
    assert isinstance(_net("partial", partial_channels=2).plan, plans.PartialChannelsPlan)
    assert not hasattr(_net(), "set_plan") and not hasattr(_net(), "memory_efficient")


def test_darts_formulation_runs_pytorch_modules():
    lean_types = (LeanConv2d, LeanBatchNorm2d)
    for net in (_net(memory_efficient=False), _net("plain"), _net(partial_channels=2, memory_efficient=False)):
        assert not any(isinstance(m, lean_types) for cell in net.cells for m in cell.modules())
        assert any(type(m) is torch.nn.Conv2d for m in net.cells.modules())
    assert any(isinstance(m, lean_types) for m in _net("memory").cells.modules())
    assert _net("plain").state_dict().keys() == _net("memory").state_dict().keys()


def test_plans_refused_where_they_do_not_fit():
    with pytest.raises(ConfigError, match="unknown plan"):
        _net("fast")
    with pytest.raises(ConfigError, match="partial"):
        _net("partial")
    with pytest.raises(ConfigError, match="partial"):
        _net("memory", partial_channels=2)


def test_regions_plan_wraps_the_memory_sums_and_replaces_no_method():
    net = _net(execution=plans.Execution(channels_last=True, compile="regions"))
    assert isinstance(net.plan, plans.RegionsPlan) and isinstance(net.plan.base, plans.MemoryPlan)
    assert net.plan.regions == sum(len(cell.edges) + 2 for cell in net.cells)
    assert not any(name in module.__dict__ for module in net.modules() for name in ("forward", "after_relu"))
    assert isinstance(_net("regions").plan, plans.RegionsPlan)
    plain = _net(memory_efficient=False, execution=plans.Execution(compile="regions"))
    assert isinstance(plain.plan.base, plans.PlainPlan)
    with pytest.raises(ConfigError, match="whole candidates"):
        plans.RegionsPlan(plans.FusedNormsPlan())


@pytest.mark.parametrize("plan", ["memory", "fused_norms"])
def test_plans_with_grad_in_eval_mode_equal_plain(plan):
    """Batch norms in eval mode with gradients on (a Hessian probe of a trained supernet): the fused-norms plan
    applies each candidate's norm itself and sums as the memory plan does."""
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3)).contiguous(
        memory_format=torch.channels_last)
    outs = []
    for net in (_net(plan), _net("plain")):
        net.eval()
        loss = net(x).square().mean()
        loss.backward()
        outs.append((loss.detach(), net.alphas_normal.grad, net.alphas_reduce.grad))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_node_weights_are_picked_by_one_call_per_node():
    """α enters each node's sum as one tensor: no element-by-element ``select`` of the weights."""
    net = _net("memory")
    x = torch.randn(2, 1, 8, 8).contiguous(memory_format=torch.channels_last)
    with OpCounter() as counter:
        net(x).sum().backward()
    nodes = sum(len(cell.nodes) for cell in net.cells)
    assert counter.counts["aten::select"] == 0 and counter.counts["aten::select_backward"] == 0
    assert counter.counts["aten::index_select"] <= 2 * nodes
