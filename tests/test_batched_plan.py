"""The batched plan (input-stationary cells over stacked weights) computes what the plain plan computes, in float64:
logits, loss, every weight and α gradient, every running statistic, first and second order, the Hessian-vector
product of the collapse indicator; its state dict is the other plans'; it is refused where it does not run."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fastnas
from fastnas.architect import Architect
from fastnas.errors import ConfigError
from fastnas.nn import plans
from fastnas.nn.plans.batched import per_edge
from fastnas.space import register_op
from helpers import OpCounter

AVAILABLE = fastnas.ops.available_backends()
# (triton: interpreted on the CPU, the kernels a GPU runs)
BACKENDS = ["reference"] + [b for b in ("cpu", "triton") if AVAILABLE[b] == "available"]
RTOL = 1e-10


def _net(plan, space="at-darts", channels_last=True, seed=0, compile=None, **kwargs):
    torch.manual_seed(seed)
    execution = plans.Execution(channels_last=channels_last, dtype=torch.float64, compile=compile)
    net = fastnas.SuperNet(8, 3, 10, primitives=space, steps=3, multiplier=2, in_channels=1, plan=plan,
                           execution=execution, **kwargs)
    net = net.double()
    with torch.no_grad():
        for a in net.arch_parameters():
            a.normal_(0, 0.3)
    return net.to(memory_format=torch.channels_last) if channels_last else net


def _batch(channels_last=True, seed=1, size=9):
    x = torch.randn(4, 1, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (x.contiguous(memory_format=torch.channels_last) if channels_last else x), torch.arange(4) % 10


def _step(net, backend, channels_last=True):
    x, y = _batch(channels_last)
    with fastnas.ops.backend(backend):
        logits = net(x)
        loss = nn.functional.cross_entropy(logits, y)
        loss.backward()
    grads = per_edge(net, {n: p.grad for n, p in net.named_parameters() if p.grad is not None})
    return logits.detach(), loss.detach(), grads, net.state_dict()


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    scale = want.abs().max().clamp_min(1e-300)
    assert (got - want).abs().max() <= RTOL * scale, f"{what}: {(got - want).abs().max() / scale:.3g} relative"


def _assert_same(got, want):
    _assert_close(got[0], want[0], "logits")
    _assert_close(got[1], want[1], "loss")
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        _assert_close(got[2][name], want[2][name], name)
    assert got[3].keys() == want[3].keys()
    for name in want[3]:
        _assert_close(got[3][name].double(), want[3][name].double(), name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("space", ["darts", "at-darts"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_batched_equals_plain(space, backend, channels_last):
    _assert_same(_step(_net("batched", space, channels_last), backend, channels_last),
                 _step(_net("plain", space, channels_last), backend, channels_last))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_equals_plain_without_grad_and_in_eval_mode(backend):
    x, _ = _batch()
    batched, plain = _net("batched"), _net("plain")
    with fastnas.ops.backend(backend), torch.no_grad():
        _assert_close(batched(x), plain(x), "no_grad logits")
        batched.eval(), plain.eval()
        _assert_close(batched(x), plain(x), "eval logits")


@pytest.mark.parametrize("space", ["darts", "at-darts"])
def test_second_order_step_equals_plain(space):
    grads = []
    for plan in ("batched", "plain"):
        net = _net(plan, space)
        optimizer = torch.optim.SGD(net.weight_parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
        architect = Architect(net, nn.functional.cross_entropy, order=2)
        (x, y), (xv, yv) = _batch(seed=1), _batch(seed=2)
        with fastnas.ops.backend("reference"):
            architect.step(x, y, xv, yv, 0.025, optimizer)
        grads.append([a.grad for a in net.arch_parameters()])
    for got, want in zip(*grads):
        _assert_close(got, want, "second-order alpha gradient")


def test_hessian_vector_product_equals_plain():
    products = []
    for plan in ("batched", "plain"):
        net = _net(plan)
        x, y = _batch()
        alphas = net.arch_parameters()
        with fastnas.ops.backend("reference"):
            grads = torch.autograd.grad(nn.functional.cross_entropy(net(x), y), alphas, create_graph=True)
            gen = torch.Generator().manual_seed(5)  # a random direction (ones is softmax's null direction)
            v = [torch.randn(a.shape, generator=gen, dtype=a.dtype) for a in alphas]
            products.append(torch.autograd.grad(grads, alphas, grad_outputs=v))
    for got, want in zip(*products):
        _assert_close(got, want, "Hessian-vector product")


def test_state_dict_is_per_edge_and_loads_both_ways():
    batched, plain = _net("batched"), _net("plain", seed=3)
    assert {k: v.shape for k, v in batched.state_dict().items()} == \
        {k: v.shape for k, v in plain.state_dict().items()}
    x, _ = _batch()
    batched.load_state_dict(plain.state_dict())
    with torch.no_grad():
        _assert_close(batched(x), plain(x), "plain's weights loaded into batched")
    again = _net("memory", seed=4)
    again.load_state_dict(batched.state_dict())
    with torch.no_grad():
        _assert_close(again(x), batched(x), "batched's weights loaded into memory")


def test_parameters_are_stacked_and_few():
    batched, plain = _net("batched", "darts"), _net("plain", "darts")
    assert sum(p.numel() for p in batched.parameters()) == sum(p.numel() for p in plain.parameters())
    assert not [n for n, _ in batched.named_parameters() if ".edges." in n]  # every candidate's weights stacked
    assert len(list(batched.parameters())) * 3 < len(list(plain.parameters()))


def test_alpha_enters_by_one_call_per_state_and_nodes_are_running_sums():
    net = _net("batched", "darts")
    x, y = _batch()
    with OpCounter() as counter:
        nn.functional.cross_entropy(net(x), y).backward()
    assert counter.counts["aten::select"] == 0
    states = sum(len(cell.state_candidates) for cell in net.cells)  # every state with outgoing edges
    assert counter.counts["aten::take"] == states
    assert counter.counts["fastnas::edge_sums"] == states and counter.counts["fastnas::edge_sums_backward"] == states
    assert counter.counts["fastnas::mixed_sum"] == 0


def test_a_space_without_convolutions():
    space = ["none", "max_pool_3x3", "skip_connect", "spatial_attention", "channel_attention"]
    _assert_same(_step(_net("batched", space), "reference"), _step(_net("plain", space), "reference"))


class _Doubler(nn.Module):
    def __init__(self, C: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(C, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_an_op_it_does_not_know_runs_per_edge():
    register_op("test_batched_doubler", lambda C, stride, affine: _Doubler(C) if stride == 1 else
                nn.Sequential(nn.AvgPool2d(2, ceil_mode=True), _Doubler(C)), overwrite=True)
    space = ["none", "max_pool_3x3", "test_batched_doubler", "sep_conv_3x3"]
    _assert_same(_step(_net("batched", space), "reference"), _step(_net("plain", space), "reference"))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
def test_batched_in_compiled_regions_equals_plain():
    """Under --compile each state's StateCandidates is a compiled region (a small space keeps the compile short)."""
    space = ["none", "max_pool_3x3", "skip_connect", "sep_conv_3x3", "channel_attention"]
    compiled = _net("batched", space, compile="regions")
    assert compiled.plan.name == "regions" and compiled.plan.base.name == "batched"
    _assert_same(_step(compiled, "cpu"), _step(_net("plain", space), "cpu"))
    kinds = compiled.plan.compiled()
    assert kinds and not any(kind.failed for kind in kinds)


@pytest.mark.parametrize("setting", [dict(amp="bf16"), dict(compile="model")])
def test_refused_where_it_does_not_run(setting):
    with pytest.raises(ConfigError, match="plan 'batched' cannot run"):
        plans.make_plan("batched", plans.Execution(**setting))


def test_refused_with_the_darts_formulation_aux_skip_and_partial_channels():
    with pytest.raises(ConfigError, match="plan 'batched' cannot run"):
        plans.make_plan("batched", store_all=True)
    with pytest.raises(ConfigError, match="plan 'batched' cannot run"):
        plans.make_plan("batched", aux_skip=True)
    with pytest.raises(ConfigError, match="partial"):
        plans.make_plan("batched", partial_channels=2)
