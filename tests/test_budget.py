"""Searching within a budget (fastnas.budget): parsing, the penalty, the exact constrained derivation, the CLI."""
import itertools
import json

import pytest
import torch

from fastnas import budget as B
from fastnas import costmodel as C
from fastnas import search as search_cli
from fastnas.errors import ConfigError
from fastnas.genotype import derive, gene_rows

PRIMS = ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3", "channel_attention")
DEP = C.Deployment(C=4, layers=3, num_classes=3, in_channels=1, input_size=8, network="cifar")


def test_parse_budget():
    assert B.parse_budget("params=3.0M,madds=500M, latency=8ms") == {"params": 3e6, "madds": 5e8, "latency": 8.0}
    assert B.parse_budget("params=120000") == {"params": 120000.0}
    assert B.parse_budget("latency=500us") == {"latency": 0.5}
    for bad in ("params=3x", "flops=1M", "params=1M,params=2M", "latency=8", "params=0", "params=nan"):
        with pytest.raises(ConfigError):
            B.parse_budget(bad)


def _brute_force(model, w, budget, skip_limit=None):
    """Every genotype of the small space: the best score that fits, by enumeration."""
    keep = [k for k, p in enumerate(PRIMS) if p != "none"]
    cells = []
    for kind, wk in zip(("normal", "reduce"), w):
        tables = {m: model.table(m, kind) for m in budget}
        nodes = []
        start = 0
        for i in range(model.steps):
            opts = []
            for a, b in itertools.combinations(range(2 + i), 2):
                for oa, ob in itertools.product(keep, keep):
                    opts.append((float(wk[start + a, oa] + wk[start + b, ob]),
                                 {m: float(t[start + a, oa] + t[start + b, ob]) for m, t in tables.items()},
                                 (PRIMS[oa] == "skip_connect") + (PRIMS[ob] == "skip_connect")))
            nodes.append(opts)
            start += 2 + i
        cell = []
        for combo in itertools.product(*nodes):
            cell.append((sum(o[0] for o in combo), {m: sum(o[1][m] for o in combo) for m in budget},
                         sum(o[2] for o in combo)))
        cells.append(cell)
    best = None
    for (sn, cn, kn), (sr, cr, _) in itertools.product(*cells):
        if skip_limit is not None and kn > skip_limit:
            continue
        if all(model.fixed(m) + cn[m] + cr[m] <= t for m, t in budget.items()):
            best = sn + sr if best is None else max(best, sn + sr)
    return best


def _score(g, w):
    total = 0.0
    for edges, wk in zip((g.normal, g.reduce), w):
        total += sum(float(wk[r, PRIMS.index(op)]) for r, (op, _) in zip(gene_rows(edges), edges))
    return total


@pytest.mark.parametrize("seed", [0, 1])
def test_constrained_derivation_is_the_best_fitting_genotype(seed):
    model = C.CostModel(DEP, PRIMS, steps=2, multiplier=2)
    torch.manual_seed(seed)
    w = [torch.softmax(torch.randn(5, len(PRIMS), dtype=torch.float64), -1) for _ in range(2)]
    free = derive(w[0], w[1], PRIMS, 2, 2)
    lo, hi = B.smallest_cost(model, "params"), model.cost(free)["params"]
    for budget, skip_limit in [({"params": lo + 0.3 * (hi - lo)}, None), ({"params": lo + 0.7 * (hi - lo)}, 0),
                               ({"params": lo + 0.6 * (hi - lo), "madds": model.cost(free)["madds"] * 0.8}, None)]:
        g = B.constrained_derive(model, w, budget, skip_limit=skip_limit)
        want = _brute_force(model, w, budget, skip_limit)
        assert (g is None) == (want is None)
        if g is not None:
            assert _score(g, w) == pytest.approx(want, abs=1e-12)
            assert all(model.cost(g)[m] <= t for m, t in budget.items())
    # a budget the unconstrained genotype meets changes nothing
    assert B.constrained_derive(model, w, {"params": hi}) == free


def test_penalty_forms():
    loss = torch.tensor(2.0, dtype=torch.float64)
    e = {"params": torch.tensor(2e5, dtype=torch.float64)}
    got = B.penalised(loss, e, {"params": 1e5}, "mul#log")
    assert float(got) == pytest.approx(2.0 * 0.2 * (torch.log(e["params"]).item() / torch.log(torch.tensor(1e5)).item())
                                       ** 0.3)
    assert float(B.penalised(loss, e, {"params": 1e5}, "add#linear")) == pytest.approx(2.0 + 0.1 * 1.0)
    assert float(B.penalised(loss, e, {"params": 4e5}, "add#linear")) == pytest.approx(2.0)


def test_impossible_budget_is_one_line_and_exit_2(tmp_path, capsys):
    run = tmp_path / "run"
    code = search_cli.main(["--preset", "quick", "--limit", "64", "--epochs", "1", "--max-steps", "1",
                            "--budget", "params=50000", "--run-dir", str(run), "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "smallest achievable params" in err[0] and "99,866" in err[0]
    assert not run.exists()


def test_budgeted_search_fits_and_records_it(tmp_path):
    from helpers import tiny_search_config

    from fastnas.search import Search

    cfg = tiny_search_config(budget="params=60000", deploy_C=8, deploy_layers=5)
    s = Search(cfg, tmp_path)
    result = s.run()
    dep = C.Deployment.from_preset("quick", C=8, layers=5)
    assert C.cost(result.genotype, dep)["params"] <= 60000
    saved = json.loads((tmp_path / "genotype.json").read_text())
    assert saved["cost"]["params"] <= 60000 and saved["budget"] == {"params": 60000.0}
    history = json.loads((tmp_path / "alphas.json").read_text())["epochs"]
    assert "params" in history[-1]["expected_cost"]


def _tiny_net():
    import fastnas

    torch.manual_seed(0)
    net = fastnas.SuperNet(4, 3, 3, primitives=list(PRIMS), steps=2, multiplier=2, in_channels=1).double()
    with torch.no_grad():
        for a in net.arch_parameters():
            a.normal_(0, 0.5)
    return net


def _arch_grads(net, order, penalty):
    from torch import nn

    from fastnas.architect import Architect

    x, y = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (4,))
    arch = Architect(net, nn.CrossEntropyLoss(), order=order, penalty=penalty)
    arch.optimizer.step = lambda: None  # keep α where the gradient was taken
    torch.manual_seed(5)
    arch.step(x, y, x, y, 0.1, torch.optim.SGD(net.weight_parameters(), lr=0.1))
    return [a.grad.clone() for a in net.arch_parameters()]


def test_architect_takes_the_gradient_of_the_penalised_loss():
    from torch import nn

    net = _tiny_net()
    pen = B.BudgetPenalty(C.CostModel(DEP, PRIMS, steps=2, multiplier=2), {"params": 5000.0}, "mul#log", 0.2, 0.3,
                          0.1)
    x, y = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (4,))
    expected = torch.autograd.grad(pen(nn.CrossEntropyLoss()(net(x), y), net), net.arch_parameters())
    from fastnas.architect import Architect

    arch = Architect(net, nn.CrossEntropyLoss(), order=1, penalty=pen)
    arch.optimizer.step = lambda: None
    arch.step(x, y, x, y, 0.1, torch.optim.SGD(net.weight_parameters(), lr=0.1))
    for a, e in zip(net.arch_parameters(), expected):
        torch.testing.assert_close(a.grad, e)
    # second order: the objective's gradient, Hessian-vector product included, scales with it
    plain = _arch_grads(_tiny_net(), 2, None)
    doubled = _arch_grads(_tiny_net(), 2, lambda loss, model: 2 * loss)
    for p, d in zip(plain, doubled):
        torch.testing.assert_close(d, 2 * p)


def test_latency_budget_measures_a_table_that_the_next_search_reuses(tmp_path):
    from helpers import tiny_search_config

    from fastnas.latency import LatencyTable
    from fastnas.search import Search

    first = tmp_path / "first"
    first.mkdir()
    Search(tiny_search_config(epochs=1, budget="latency=1000ms", deploy_C=4, deploy_layers=3), first).run()
    saved = json.loads((first / "genotype.json").read_text())
    assert saved["cost"]["latency"] <= 1000 and saved["latency_table"]["threads"] >= 1
    table = LatencyTable.load(first / "latency_table.json")
    again = Search(tiny_search_config(epochs=1, budget="params=1M", deploy_C=4, deploy_layers=3,
                                      latency_table=str(first / "latency_table.json")), None)
    assert again.budget.latency.ops == table.ops and "latency" in again.budget.expected(again.model)


def test_a_network_that_cannot_be_costed_only_stops_a_budgeted_search():
    from helpers import tiny_search_config

    from fastnas.search import Search

    s = Search(tiny_search_config(epochs=1, deploy_network="imagenet"), None, progress=False)  # 8x8: too small
    assert "cannot be built" in s.budget.describe() and s.budget.expected(s.model) == {}
    with pytest.raises(ConfigError, match="too small"):
        Search(tiny_search_config(epochs=1, deploy_network="imagenet", budget="params=1M"), None, progress=False)
