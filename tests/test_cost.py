"""The cost model of the deployed network (fastnas.costmodel, fastnas.cost): exact parameters and multiply-adds,
the expectation over α, latency tables."""
import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fastnas
from fastnas import costmodel as C
from fastnas.genotype import Genotype, gene_rows
from fastnas.genotypes import DARTS_V2

SPACE = fastnas.SPACES["at-darts"]


def random_genotype(rng: random.Random, steps: int = 4, ops=SPACE) -> Genotype:
    ops = [o for o in ops if o != "none"]

    def cell():
        return [(rng.choice(ops), j) for i in range(steps) for j in rng.sample(range(2 + i), 2)]
    concat = list(range(2, steps + 2))
    return Genotype(cell(), concat, cell(), concat)


DEPLOYMENTS = [
    C.Deployment(C=4, layers=5, num_classes=3, in_channels=1, input_size=8, network="cifar"),
    C.Deployment(C=4, layers=5, num_classes=3, in_channels=1, input_size=8, network="cifar", auxiliary=True),
    C.Deployment(C=4, layers=3, num_classes=5, in_channels=3, input_size=32, network="imagenet"),
    C.Deployment(C=4, layers=3, num_classes=5, in_channels=3, input_size=32, network="imagenet", auxiliary=True),
]


@pytest.mark.parametrize("dep", DEPLOYMENTS, ids=["cifar", "cifar-aux", "imagenet", "imagenet-aux"])
def test_params_and_madds_are_exact_for_random_genotypes(dep):
    rng = random.Random(0)
    model = C.CostModel(dep, SPACE)
    for _ in range(3):
        g = random_genotype(rng)
        net = C.build(g, dep).eval()
        got = model.cost(g)
        assert got["params"] == sum(p.numel() for n, p in net.named_parameters()
                                    if dep.auxiliary or "auxiliary" not in n)
        with fastnas.ops.backend("reference"), FlopCounterMode(display=False) as counter, torch.no_grad():
            net(torch.zeros(1, dep.in_channels, dep.input_size, dep.input_size))
        assert got["madds"] * 2 == counter.get_total_flops()


def test_known_counts():
    assert C.cost(DARTS_V2)["params"] == 3_349_342  # DARTS's "param size = 3.349342MB"
    assert C.cost(DARTS_V2, "quick")["params"] == 245_242
    # a separable 3x3 conv at stride 1 on C channels and s x s: twice (depthwise 9 + pointwise C) per output
    assert C.op_madds("sep_conv_3x3", 8, 1, 4) == 2 * (8 * 9 + 8 * 8) * 16


def test_expected_cost_gradient_matches_finite_differences():
    dep = C.Deployment(C=4, layers=3, num_classes=3, in_channels=1, input_size=8, network="cifar")
    prims = ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3", "channel_attention")
    model = C.CostModel(dep, prims, steps=3, multiplier=3)
    torch.manual_seed(1)
    alphas = [torch.randn(9, len(prims), dtype=torch.float64, requires_grad=True) for _ in range(2)]

    def e(a):
        return model.expected("params", [torch.softmax(x, -1) for x in a])
    grads = torch.autograd.grad(e(alphas), alphas)
    h = 1e-6
    for a, g in zip(alphas, grads):
        for idx in [(0, 1), (3, 3), (8, 4), (5, 0)]:
            with torch.no_grad():
                a[idx] += h
                up = float(e(alphas))
                a[idx] -= 2 * h
                down = float(e(alphas))
                a[idx] += h
            assert g[idx].item() == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-4)
    assert torch.autograd.gradcheck(lambda x, y: e([x, y]), tuple(alphas))


def test_expected_cost_tends_to_the_derived_genotype():
    """With every kept edge's weight on one op and every other edge's on ``none``, E[c] is the derived network's."""
    dep = C.Deployment(C=4, layers=3, num_classes=3, in_channels=1, input_size=8, network="cifar")
    model = C.CostModel(dep, SPACE)
    g = random_genotype(random.Random(3))
    w = []
    for edges in (g.normal, g.reduce):
        a = torch.zeros(14, len(SPACE), dtype=torch.float64)
        a[:, 0] = 40.0  # none
        for r, (op, _) in zip(gene_rows(edges), edges):
            a[r, 0], a[r, SPACE.index(op)] = 0.0, 40.0
        w.append(torch.softmax(a, -1))
    for metric in ("params", "madds"):
        assert float(model.expected(metric, w)) == pytest.approx(model.cost(g)[metric], rel=1e-9)


def test_latency_table_round_trip(tmp_path):
    from fastnas.errors import ConfigError
    from fastnas.latency import LatencyTable, fit_correction, measure_space

    dep = C.Deployment(C=4, layers=3, num_classes=3, in_channels=1, input_size=8, network="cifar")
    prims = ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3")
    table = LatencyTable.for_target("cpu", threads=1, warmup=1, repeats=3, clock="thread")
    model = C.CostModel(dep, prims, steps=2, multiplier=2, latency=table)
    measure_space(model)
    g = Genotype([("sep_conv_3x3", 0), ("skip_connect", 1)] * 2, [2, 3], [("max_pool_3x3", 0), ("sep_conv_3x3", 1)] * 2,
                 [2, 3])
    predicted = model.cost(g)["latency"]
    table.save(tmp_path / "t.json")
    loaded = LatencyTable.load(tmp_path / "t.json")
    assert loaded.meta["threads"] == 1 and loaded.meta["batch"] == 1 and "torch" in loaded.meta["versions"]
    assert C.CostModel(dep, prims, 2, 2, loaded).cost(g)["latency"] == predicted
    with pytest.raises(ConfigError, match="no entry"):
        C.CostModel(dep, prims + ("sep_conv_5x5",), 2, 2, loaded).table("latency", "normal")
    # the correction: fixed + b + k * ops, kept in the table
    cheap = Genotype([("skip_connect", 0), ("max_pool_3x3", 1)] * 2, [2, 3], [("max_pool_3x3", 0)] * 4, [2, 3])
    b, k = fit_correction(table, C.CostModel(dep, prims, 2, 2, table), [g, cheap])
    assert table.meta["op_scale"] == k and table.meta["offset_ms"] == b
    corrected = C.CostModel(dep, prims, 2, 2, table).cost(g)["latency"]
    assert corrected == pytest.approx(predicted + b + (k - 1) * (predicted - model.fixed("latency")))


def test_costing_leaves_the_random_stream_alone():
    """A search logs its expected cost each epoch: building the ops it costs must not change the draws."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    C.CostModel(DEPLOYMENTS[0], SPACE).cost(random_genotype(random.Random(4)))
    assert torch.equal(before, torch.get_rng_state())


def test_onnxruntime_latency_of_an_op_and_a_network():
    pytest.importorskip("onnxruntime")
    from fastnas.latency import LatencyTable

    table = LatencyTable.for_target("onnxruntime", threads=1, warmup=1, repeats=3)
    assert table.op("spatial_attention", 4, 2, 8) > 0 and "onnxruntime" in table.meta["versions"]
    net = C.build(random_genotype(random.Random(5)), DEPLOYMENTS[0])
    assert table.network_ms(net) > 0
