"""torch.compile of the search supernet: no graph breaks per cell, the same loss and gradients as eager, whole
cells or region by region (fastnas.compilation), first and second order."""
import contextlib
import logging

import pytest
import torch
from torch._dynamo.utils import counters

import fastnas
from fastnas import compilation
from fastnas.nn import plans
from fastnas.nn.plans import Execution
from fastnas.architect import Architect, weight_step

CPU = fastnas.ops.available_backends()["cpu"] == "available"


def _tiny_net(layers: int = 1, **kwargs):
    torch.manual_seed(0)
    net = fastnas.SuperNet(4, layers, 3, primitives=["none", "skip_connect", "sep_conv_3x3", "max_pool_3x3",
                                                "channel_attention", "spatial_attention"],
                           steps=2, multiplier=2, in_channels=1, **kwargs)
    with torch.no_grad():
        for a in net.arch_parameters():
            a.normal_(0, 0.5)
    return net


def _loss_and_grads(net, x, y):
    net.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["cpu"] if CPU else ["reference"])
def test_cells_compile_fullgraph_and_match_eager(backend):
    torch._dynamo.reset()
    x, y = torch.randn(2, 1, 8, 8), torch.randint(0, 3, (2,))
    with fastnas.ops.backend(backend):
        eager = _loss_and_grads(_tiny_net(), x, y)
        net = _tiny_net()
        for cell in net.cells:
            cell.compile(fullgraph=True)  # a graph break would raise here
        compiled = _loss_and_grads(net, x, y)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    assert compiled[1].keys() == eager[1].keys()
    for name in eager[1]:
        torch.testing.assert_close(compiled[1][name], eager[1][name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


def _first_order_grads(net, batches):
    """Loss and gradients of a first-order search step: the architecture step's α gradients, then the weight step's
    weight gradients (learning rate 0, so that both runs stay at the same weights)."""
    (x, y), (xv, yv) = batches
    criterion = torch.nn.CrossEntropyLoss()
    arch_loss, d_alpha = Architect(net, criterion, order=1)._first_order(xv, yv)
    optimizer = torch.optim.SGD(net.weight_parameters(), lr=0.0)
    weight_loss, _ = weight_step(net, net, criterion, optimizer, x, y, None, net.arch_parameters())
    grads = {n: p.grad.clone() for n, p in net.named_weight_parameters() if p.grad is not None}
    return [arch_loss.detach(), weight_loss, *d_alpha], grads


def _batches(channels_last: bool):
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(2):
        x = torch.randn(3, 1, 8, 8, generator=gen)
        out.append((x.contiguous(memory_format=torch.channels_last) if channels_last else x,
                    torch.randint(0, 3, (3,), generator=gen)))
    return out


def _assert_same(compiled, eager, rtol=1e-4, atol=1e-5):
    for i, (c, e) in enumerate(zip(compiled[0], eager[0])):
        torch.testing.assert_close(c, e, rtol=rtol, atol=atol, msg=lambda m: f"loss/alpha grad {i}: {m}")
    assert compiled[1].keys() == eager[1].keys()
    for name in eager[1]:
        torch.testing.assert_close(compiled[1][name], eager[1][name], rtol=rtol, atol=atol,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("channels_last,memory_plan", [(True, True), (False, False)],
                         ids=["channels_last-memory", "nchw-darts_memory"])
def test_regions_first_order_step_matches_eager_without_graph_breaks(channels_last, memory_plan):
    """One region per edge and per preprocessing op, over the memory plan's node sums or the plain ones."""
    torch._dynamo.reset()
    counters.clear()
    batches = _batches(channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format

    def net(scope):
        return _tiny_net(layers=3, memory_efficient=memory_plan,
                         execution=Execution(channels_last=channels_last, compile=scope)).to(memory_format=layout)

    with fastnas.ops.backend("cpu" if CPU else "reference"):
        eager = _first_order_grads(net(None), batches)
        net = net("regions")
        regions = net.plan.regions
        compiled = _first_order_grads(net, batches)
    assert isinstance(net.plan.base, plans.MemoryPlan if memory_plan else plans.PlainPlan)
    assert regions == sum(len(c.edges) + 2 for c in net.cells)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] > 0  # the regions did compile
    assert not any(r.failed for r in _regions(net))
    _assert_same(compiled, eager)


def test_regions_second_order_step_matches_eager():
    """The virtual step runs the network through functional_call with swapped weights: the compiled regions take
    them as inputs."""
    torch._dynamo.reset()
    counters.clear()
    (x, y), (xv, yv) = _batches(channels_last=True)
    criterion = torch.nn.CrossEntropyLoss()

    def arch_grads(net):
        optimizer = torch.optim.SGD(net.weight_parameters(), lr=0.1, momentum=0.9)
        loss, grads = Architect(net, criterion, order=2)._second_order(x, y, xv, yv, 0.1, optimizer)
        return [loss.detach(), *grads], {}

    with fastnas.ops.backend("cpu" if CPU else "reference"):
        eager = arch_grads(_tiny_net().to(memory_format=torch.channels_last))
        net = _regions_net()
        compiled = arch_grads(net)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert not any(r.failed for r in _regions(net))
    # the finite-difference Hessian-vector product divides by 2ε: fp32 rounding differences grow by 1/ε there
    _assert_same(compiled, eager, rtol=1e-3, atol=1e-4)


def _regions_net():
    return _tiny_net(execution=Execution(channels_last=True, compile="regions")).to(memory_format=torch.channels_last)


def _regions(net):
    return net.plan.compiled()


@contextlib.contextmanager
def _warnings():
    """The messages of the warnings fastnas logs meanwhile (a handler of its own, whatever other tests left)."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    compilation.log.addHandler(handler)
    try:
        yield messages
    finally:
        compilation.log.removeHandler(handler)


def test_region_kind_that_fails_to_compile_runs_eagerly():
    """A compiler failure sends its whole region kind back to eager execution, said once per kind; the step is then
    the eager one."""
    batches = _batches(channels_last=True)
    with fastnas.ops.backend("cpu" if CPU else "reference"):
        eager = _first_order_grads(_tiny_net().to(memory_format=torch.channels_last), batches)
        net = _regions_net()

        def fail(*args, **kwargs):
            raise RuntimeError("backend compiler failed")

        kinds = _regions(net)
        for kind in kinds:
            kind.compiled = fail
        with _warnings() as messages:
            fallen_back = _first_order_grads(net, batches)
    called = {kind.label for kind in kinds if kind.failed}
    assert {"EdgeCandidates", "ReLUConvBN"} <= called
    warned = [m for m in messages if "running it eagerly" in m]
    assert len(warned) == len(called)
    _assert_same(fallen_back, eager)


def test_compile_failure_falls_back_to_eager():
    class Breaks(torch.nn.Module):
        def forward(self, x):
            return x + 1

    reported: set[str] = set()
    wrapped = compilation.CompiledOrEager(Breaks(), "the test module", reported=reported)
    other = compilation.CompiledOrEager(Breaks(), "the test module", reported=reported)

    def fail(*args):
        raise RuntimeError("backend compiler failed")

    wrapped.compiled = other.compiled = fail
    with _warnings() as messages:
        outs = [wrapped(torch.zeros(2)), wrapped(torch.zeros(2)), other(torch.zeros(2))]
    assert all(torch.equal(out, torch.ones(2)) for out in outs)
    assert wrapped.failed and other.failed
    # said once for the label among the instances that share it, naming it and the error
    messages = [m for m in messages if "running it eagerly" in m]
    assert len(messages) == 1 and "the test module" in messages[0] and "backend compiler failed" in messages[0]


def test_search_with_compile_runs_regions_under_amp(caplog):
    """``fastnas.search --compile --amp bf16``: the regions compile (no failure, no graph break), the run reports
    the compiling step and the cache state, and validation runs eagerly."""
    from fastnas.search import Search
    from helpers import tiny_search_config

    torch._dynamo.reset()
    counters.clear()
    search = Search(tiny_search_config(compile=True, amp="bf16", epochs=1, max_steps=1, layers=1), progress=False)
    compilation.log.propagate = True
    try:
        with caplog.at_level("INFO", logger="fastnas"):
            search.run()
    finally:
        compilation.log.propagate = False
    regions = _regions(search.model)
    assert regions and not any(r.failed for r in regions)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] > 0
    assert any("first search step (compiling) took" in r.message and "Inductor cache" in r.message
               for r in caplog.records)
