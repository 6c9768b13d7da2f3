"""Collapse controls and indicators (fastnas.robust, fastnas.indicators), several seeds and determinism."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnas
from fastnas import indicators, robust
from fastnas import search as search_cli
from fastnas.architect import Architect
from fastnas.config import SearchConfig
from fastnas.errors import ConfigError
from fastnas.genotype import Genotype
from fastnas.nn.plans import AuxSkipPlan
from fastnas.search import Search
from helpers import tiny_search_config

PRIMS = ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3")


def _tiny_fp64_net(primitives=("none", "skip_connect", "sep_conv_3x3", "channel_attention", "avg_pool_3x3"),
                   aux_skip=False):
    torch.manual_seed(0)
    net = fastnas.SuperNet(4, 3, 3, primitives=list(primitives), steps=2, multiplier=2, in_channels=1,
                           aux_skip=aux_skip).double()
    with torch.no_grad():
        for a in net.arch_parameters():
            a.normal_(0, 0.5)
    return net


# -- P-DARTS: skip limit --------------------------------------------------------------------------------------------
# softmax weights (rows sum to 1) of two nodes; rows: node 0 <- (c_{k-2}, c_{k-1}),
# node 1 <- (c_{k-2}, c_{k-1}, node 0); columns: PRIMS
HAND_WEIGHTS = torch.tensor([
    [0.0, 0.10, 0.60, 0.30],   # node 0 <- 0: skip strongest
    [0.0, 0.10, 0.50, 0.40],   # node 0 <- 1: skip, then sep
    [0.0, 0.10, 0.70, 0.20],   # node 1 <- 0: skip strongest of all
    [0.0, 0.30, 0.30, 0.40],   # node 1 <- 1: sep
    [0.0, 0.35, 0.45, 0.20],   # node 1 <- 2: skip, then max pool
])


@pytest.mark.parametrize("limit,expected", [
    (None, [("skip_connect", 0), ("skip_connect", 1), ("skip_connect", 0), ("skip_connect", 2)]),
    # 4 skips: the weakest, node 1 <- 2 (0.45), gives way (node 1 takes sep from input 1, 0.40, over max pool 0.35);
    # then node 0 <- 1 (0.50), which becomes its sep (0.40)
    (2, [("skip_connect", 0), ("sep_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 1)]),
    # then node 0 <- 0 (0.60) and node 1 <- 0 (0.70) too
    (0, [("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("max_pool_3x3", 2)]),
])
def test_skip_limit_derives_the_documented_cell(limit, expected):
    if limit is None:
        gene = fastnas.genotype.derive_cell(HAND_WEIGHTS, PRIMS, 2)
        notes = []
    else:
        gene, notes = robust.limit_skips(HAND_WEIGHTS, PRIMS, 2, limit)
    assert gene == expected
    assert len(notes) == {None: 0, 2: 2, 0: 4}[limit]
    if notes:
        assert notes[0].startswith("node 1: skip_connect from input 2 (weight 0.4500) replaced")


def test_skip_limit_acts_on_the_normal_cell_of_a_supernet_only():
    net = fastnas.SuperNet(4, 3, 3, primitives=list(PRIMS), steps=2, multiplier=2, in_channels=1)
    with torch.no_grad():
        net.alphas_normal.copy_(HAND_WEIGHTS.clamp_min(1e-6).log())
        net.alphas_reduce.copy_(HAND_WEIGHTS.clamp_min(1e-6).log())
    genotype, notes = robust.derive_with_skip_limit(net, 2)
    assert genotype.normal == [("skip_connect", 0), ("sep_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 1)]
    assert genotype.reduce == net.genotype().reduce and len(notes) == 2
    assert robust.derive_with_skip_limit(net, None) == (net.genotype(), [])


# -- DARTS-: auxiliary skip -----------------------------------------------------------------------------------------
def test_aux_skip_coefficient_follows_its_schedule_during_a_search():
    assert [robust.aux_skip_coefficient(e, 4) for e in range(4)] == [1.0, 0.75, 0.5, 0.25]
    s = Search(tiny_search_config(epochs=2, aux_skip=True, max_steps=1), progress=False)
    assert isinstance(s.model.plan, AuxSkipPlan)
    seen = []
    train_epoch = s.train_epoch
    s.train_epoch = lambda: (train_epoch(), seen.append(s.model.plan.coefficient))[0]  # set at its start
    genotype = s.run().genotype
    assert seen == [1.0, 0.5]
    # the derivation rule ignores the auxiliary skip: the genotype is DARTS's rule on the α
    w_normal, w_reduce = s.model.arch_weights()
    assert genotype == fastnas.genotype.derive(w_normal, w_reduce, s.model.primitives, 4, 4)


@fastnas.ops.backend("reference")
def test_aux_skip_adds_beta_times_each_input_through_its_auxiliary_op():
    """With every op weight 0, each node is β·Σ of its inputs: as they are at stride 1, through the edge's own
    factorized reduction at stride 2 (the reduction cell's inputs), as DARTS-'s code does."""
    with pytest.raises(ConfigError, match="aux_skip=True"):
        fastnas.SuperNet(4, 3, 3, primitives=["none", "skip_connect"], in_channels=1,
                         plan=AuxSkipPlan(fastnas.nn.plans.MemoryPlan()))
    net = _tiny_fp64_net(aux_skip=True)
    assert isinstance(net.plan, AuxSkipPlan)
    assert net.cells[0].aux_reduce is None and sorted(net.cells[1].aux_reduce) == ["0", "1", "2", "3"]
    beta = 0.3
    net.plan.coefficient = beta
    x = torch.randn(2, 12, 8, 8, dtype=torch.float64)
    zeros = torch.zeros_like(net.alphas_normal)
    for cell in (net.cells[0], net.cells[1]):  # a normal cell, then a reduction cell (layers 3: reductions 1, 2)
        assert cell.reduction == (cell is net.cells[1])
        s0, s1 = (x, x) if not cell.reduction else (x, torch.randn(2, 8, 8, 8, dtype=torch.float64))
        out = cell(s0, s1, zeros)
        p0, p1 = cell.preprocess0(s0), cell.preprocess1(s1)
        if cell.reduction:
            aux = cell.aux_reduce
            n0 = beta * (aux["0"](p0) + aux["1"](p1))
            n1 = beta * (aux["2"](p0) + aux["3"](p1) + n0)
        else:
            n0 = beta * (p0 + p1)
            n1 = beta * (p0 + p1 + n0)
        torch.testing.assert_close(out, torch.cat([n0, n1], dim=1))
    # coefficient 0: DARTS's sums exactly, and the genotype never depends on the plan
    net.plan.coefficient = 0.0
    y = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        wrapped = net.eval()(y)
    with torch.no_grad():
        plain = _tiny_fp64_net()
        missing = plain.load_state_dict(net.state_dict(), strict=False)
        assert all("aux_reduce" in k for k in missing.unexpected_keys) and not missing.missing_keys
        plain = plain.eval()(y)
    torch.testing.assert_close(wrapped, plain, rtol=0, atol=0)


# -- β-DARTS: Beta-Decay --------------------------------------------------------------------------------------------
def test_beta_decay_gradient_matches_autograd_of_its_formula():
    torch.manual_seed(0)
    alphas = [torch.randn(14, 10, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    c = robust.beta_decay_schedule(3, 10, 2.0)
    assert c == pytest.approx(0.6) and robust.beta_decay_schedule(0, 10, 2.0) == 0.0
    exact = torch.autograd.grad(c * robust.beta_decay_loss(alphas), alphas)
    # the formula itself: mean over the 28 edges of logsumexp
    torch.testing.assert_close(robust.beta_decay_loss(alphas),
                               torch.cat([a.exp().sum(-1).log() for a in alphas]).mean())
    for g, e in zip(robust.beta_decay_gradient(alphas, c), exact):
        torch.testing.assert_close(g, e)


def test_architect_adds_the_beta_decay_gradient():
    net = _tiny_fp64_net()
    crit = nn.CrossEntropyLoss()
    xv, yv = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (4,))
    term = robust.BetaDecay(5.0)
    term.set_epoch(1, 2)
    alphas = net.arch_parameters()
    loss = crit(net(xv), yv) + term.coefficient * robust.beta_decay_loss(alphas)
    expected = torch.autograd.grad(loss, alphas)
    arch = Architect(net, crit, order=1, terms=[term])
    arch.optimizer.step = lambda: None  # keep α where the gradient was taken
    arch.step(xv, yv, xv, yv, 0.1, torch.optim.SGD(net.weight_parameters(), lr=0.1))
    for a, e in zip(alphas, expected):
        torch.testing.assert_close(a.grad, e)


# -- SDARTS-RS: α noise in the weight step --------------------------------------------------------------------------
def test_alpha_noise_perturbs_the_weight_step_only_and_restores_alpha():
    net = _tiny_fp64_net()
    clean = [a.detach().clone() for a in net.arch_parameters()]
    w_clean = net.arch_weights()
    eps = 0.03
    with robust.alpha_noise(net, eps):
        inside = net.arch_weights()
    for w, c in zip(inside, w_clean):
        assert not torch.equal(w, c)
        assert (w >= 0).all() and torch.allclose(w.sum(-1), torch.ones(w.shape[0], dtype=w.dtype))
        # before renormalising each weight moved by at most eps; the row sum by at most eps · ops
        assert (w - c).abs().max() <= 2 * eps * w.shape[1]
    for a, c in zip(net.arch_parameters(), clean):
        assert torch.equal(a, c)
    # large noise clips some weights to exactly 0 and keeps every edge a distribution
    p = robust.perturbed_weights(torch.zeros(5, 4), 1.0, torch.Generator().manual_seed(0))
    assert (p == 0).any() and torch.allclose(p.sum(-1), torch.ones(5, dtype=p.dtype))


def test_alpha_noise_rises_linearly_from_0_03_as_in_sdarts_code():
    assert robust.alpha_noise_schedule(0, 50, 0.3) == pytest.approx(0.03)
    assert robust.alpha_noise_schedule(25, 50, 0.3) == pytest.approx(0.165)
    assert robust.alpha_noise_schedule(49, 50, 0.3) == pytest.approx(0.03 + 0.27 * 49 / 50)
    assert robust.alpha_noise_schedule(0, 10, 0.01) == robust.alpha_noise_schedule(9, 10, 0.01) == 0.01
    controls = robust.Controls(SearchConfig(alpha_noise=0.3, epochs=4))
    controls.start_epoch(2)
    assert controls.noise_epsilon == pytest.approx(0.165)


def test_search_applies_alpha_noise_in_the_weight_step_and_not_in_the_arch_step():
    s = Search(tiny_search_config(epochs=1, alpha_noise=0.03, max_steps=1), progress=False)
    seen = {"arch": [], "weight": []}
    softmax = lambda: s.model.arch_weights()[0].detach().clone()  # noqa: E731
    arch_first = s.architect._first_order
    s.architect._first_order = lambda x, y: (seen["arch"].append((softmax(), s.model.alphas_normal.detach().clone())),
                                              arch_first(x, y))[1]
    import fastnas.search as search_module
    original = search_module.weight_step

    def spy(model, *args, **kwargs):
        seen["weight"].append(softmax())
        return original(model, *args, **kwargs)
    search_module.weight_step = spy
    try:
        s.run()
    finally:
        search_module.weight_step = original
    assert len(seen["arch"]) == len(seen["weight"]) == 1
    for (w_arch, alpha), w_weight in zip(seen["arch"], seen["weight"]):
        torch.testing.assert_close(w_arch, F.softmax(alpha, dim=-1))  # clean in the architecture step
        assert not torch.allclose(w_weight, w_arch, atol=1e-4)        # perturbed in the weight step


# -- DARTS+: early stopping -----------------------------------------------------------------------------------------
def _entry(epoch, normal_rows, genotype_normal):
    g = Genotype(genotype_normal, [2, 3], [("sep_conv_3x3", 0), ("sep_conv_3x3", 1)] * 2, [2, 3])
    return {"epoch": epoch, "genotype": str(g), "normal": normal_rows, "reduce": [[0.0, 0.2, 0.3, 0.5]] * 5}


CONV = [("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("max_pool_3x3", 2)]
ONE_SKIP = [("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("max_pool_3x3", 2)]
TWO_SKIPS = [("skip_connect", 0), ("sep_conv_3x3", 1), ("skip_connect", 0), ("max_pool_3x3", 2)]


def test_early_stop_fires_on_two_skips_or_a_stable_ranking_of_the_learnable_ops():
    prims = ("none", "skip_connect", "sep_conv_3x3", "dil_conv_3x3")
    a = [[0.0, 0.1, 0.2, 0.7]] * 5
    b = [[0.0, 0.1, 0.7, 0.2]] * 5  # another ranking of the learnable ops
    a2 = [[0.0, 0.15, 0.25, 0.6]] * 5  # other weights, the same ranking as a
    a3 = [[0.0, 0.3, 0.2, 0.5]] * 5  # the skip moves, the learnable ops keep a's ranking
    assert robust.alpha_ranking({"normal": a, "reduce": a}, prims) == ((3, 2),) * 10
    stop = lambda h, **kw: robust.early_stop_reason(h, prims, 3, **kw)  # noqa: E731
    assert stop([]) is None
    assert stop([_entry(1, a, ONE_SKIP)]) is None
    assert "2 skip connections" in stop([_entry(1, a, ONE_SKIP), _entry(2, b, TWO_SKIPS)])
    # ranking unchanged for 3 epochs (4 entries with one ranking)
    history = [_entry(1, b, CONV), _entry(2, a, CONV), _entry(3, a2, CONV), _entry(4, a, CONV)]
    assert stop(history) is None
    history.append(_entry(5, a3, CONV))
    assert "has not changed for 3 epochs" in stop(history)
    # epochs of warm-up (α does not move) are not counted
    assert stop(history, warmup_epochs=2) is None
    # the search stops and writes its outputs
    s = Search(tiny_search_config(epochs=5, early_stop=True, early_stop_patience=1, max_steps=1),
               progress=False)
    reasons = iter([None, "because"])
    s.controls.stop_reason = lambda history, primitives: next(reasons)
    written = []
    s.write_final_outputs = written.append
    result = s.run()
    assert len(result.history) == 2 and result.history[-1]["early_stop"] == "because" and written


# -- indicators -----------------------------------------------------------------------------------------------------
def test_counts_and_entropy():
    g = Genotype(TWO_SKIPS, [2, 3], [("channel_attention", 0), ("avg_pool_3x3", 1), ("spatial_attention", 2),
                                     ("sep_conv_3x3", 0)], [2, 3])
    assert indicators.cell_counts(g) == {"normal": {"parameter_free": 3, "attention": 0},
                                         "reduce": {"parameter_free": 1, "attention": 2}}
    uniform = torch.full((14, 10), 0.1)
    assert indicators.alpha_entropy(uniform) == pytest.approx(torch.log(torch.tensor(10.0)).item())
    assert indicators.alpha_entropy(F.one_hot(torch.arange(5) % 4, 4).double()) == pytest.approx(0.0)


@fastnas.ops.backend("reference")
def test_hessian_eigenvalue_matches_the_explicit_hessian():
    net = _tiny_fp64_net()
    crit = nn.CrossEntropyLoss()
    torch.manual_seed(1)
    x, y = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (4,))
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    value = indicators.hessian_eigenvalue(net, net, crit, x, y, iterations=400, tol=1e-10)
    for n, b in net.named_buffers():  # the batch-norm statistics are put back
        assert torch.equal(b, buffers[n]), n

    shapes = [a.shape for a in (net.alphas_normal, net.alphas_reduce)]
    sizes = [s.numel() for s in shapes]
    weights = {n: p.detach() for n, p in net.named_weight_parameters()}

    def loss(flat):
        an, ar = flat.split(sizes)
        params = {**weights, "alphas_normal": an.view(shapes[0]), "alphas_reduce": ar.view(shapes[1])}
        return crit(torch.func.functional_call(net, {**params, **{n: b.clone() for n, b in buffers.items()}},
                                               (x,)), y)

    flat = torch.cat([net.alphas_normal.detach().reshape(-1), net.alphas_reduce.detach().reshape(-1)])
    hessian = torch.autograd.functional.hessian(loss, flat)
    torch.testing.assert_close(hessian, hessian.T)
    eigenvalues = torch.linalg.eigvalsh(hessian)
    dominant = eigenvalues[eigenvalues.abs().argmax()].item()
    assert value == pytest.approx(dominant, rel=1e-6)


# -- the command line: options, --seeds, outputs --------------------------------------------------------------------
def test_collapse_options_are_config_fields_and_checked(capsys):
    from fastnas.search import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args([
        "--skip-limit", "2", "--aux-skip", "--beta-decay", "1", "--alpha-noise", "0.03", "--early-stop",
        "--early-stop-patience", "5", "--hessian-every", "2"]))
    assert (cfg.skip_limit, cfg.aux_skip, cfg.beta_decay, cfg.alpha_noise, cfg.early_stop, cfg.early_stop_patience,
            cfg.hessian_every) == (2, True, 1.0, 0.03, True, 5, 2)
    default = SearchConfig()
    assert (default.skip_limit, default.aux_skip, default.beta_decay, default.alpha_noise, default.early_stop,
            default.hessian_every) == (None, False, 0.0, 0.0, False, 0)
    for field, bad in [("skip_limit", -1), ("beta_decay", float("nan")), ("alpha_noise", 2.0),
                       ("early_stop_patience", 0), ("hessian_every", -1)]:
        with pytest.raises(ConfigError, match=field.replace("_", "-")):
            tiny_search_config(**{field: bad}).validate()
    with pytest.raises(SystemExit):
        search_cli.main(["--help"])
    text = capsys.readouterr().out
    for opt in ["collapse controls", "--skip-limit", "--aux-skip", "--beta-decay", "--alpha-noise", "--early-stop",
                "--early-stop-patience", "--hessian-every", "--seeds"]:
        assert opt in text


def test_seeds_writes_a_summary_and_indicators(tmp_path, capsys):
    run = tmp_path / "run"
    rc = search_cli.main(["--dataset", "digits", "--limit", "64", "--C", "4", "--layers", "3", "--epochs", "2",
                          "--batch-size", "16", "--max-steps", "1", "--run-dir", str(run), "--no-progress",
                          "--seeds", "2", "--seed", "5", "--hessian-every", "2", "--skip-limit", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    for seed in (5, 6):
        folder = run / f"seed-{seed}"
        for name in ["config.json", "log.txt", "alphas.json", "genotype.json", "normal.png", "collapse.png"]:
            assert (folder / name).stat().st_size > 0, (seed, name)
        assert json.loads((folder / "config.json").read_text())["seed"] == seed
        epochs = json.loads((folder / "alphas.json").read_text())["epochs"]
        assert [e["indicators"]["hessian_eigenvalue"] is None for e in epochs] == [True, False]
        assert set(epochs[0]["indicators"]) == {"parameter_free", "attention", "entropy", "hessian_eigenvalue"}
        genotype = Genotype.from_json(folder / "genotype.json")
        assert sum(op == "skip_connect" for op, _ in genotype.normal) <= 1
        assert f"seed {seed}: {genotype}" in out
    summary = json.loads((run / "seeds.json").read_text())
    assert summary["seeds"] == [5, 6] and sum(summary["normal"]["edges"].values()) == 2 * 8
    assert sum(summary["reduce"]["ops"].values()) == 2 * 8
    text = (run / "seeds.txt").read_text()
    assert "2 searches, seeds 5, 6" in text and "attention over all genotypes" in text
    assert (run / "seeds.png").read_bytes()[:4] == b"\x89PNG"
    assert "Hessian eigenvalue" in (run / "log.txt").read_text()


# -- determinism ----------------------------------------------------------------------------------------------------
def test_one_seed_gives_a_bitwise_identical_alpha_history():
    def history():
        s = Search(tiny_search_config(epochs=2, seed=7, max_steps=1), progress=False)
        result = s.run()
        return result.genotype, [{k: v for k, v in h.items() if k != "seconds"} for h in result.history], \
            [a.detach().clone() for a in s.model.arch_parameters()]
    g1, h1, a1 = history()
    g2, h2, a2 = history()
    assert g1 == g2 and h1 == h2  # floats compared exactly
    assert all(torch.equal(x, y) for x, y in zip(a1, a2))


# -- random baseline ------------------------------------------------------------------------------------------------
def test_random_genotypes_follow_darts_derivation_rules():
    import random

    from fastnas.random_baseline import rank_of, sample_genotype

    rng = random.Random(0)
    seen_ops, seen_inputs = set(), set()
    for _ in range(200):
        g = sample_genotype("at-darts", 4, 4, rng)
        g.validate(steps=4)
        for cell in (g.normal, g.reduce):
            for i in range(4):
                (op_a, a), (op_b, b) = cell[2 * i], cell[2 * i + 1]
                assert a != b and 0 <= a < i + 2 and 0 <= b < i + 2
                seen_inputs.add((i, a))
                seen_inputs.add((i, b))
                seen_ops.update((op_a, op_b))
        assert g.normal_concat == g.reduce_concat == [2, 3, 4, 5]
    assert seen_ops == set(fastnas.space.SPACES["at-darts"]) - {"none"}
    assert seen_inputs == {(i, j) for i in range(4) for j in range(i + 2)}
    assert rank_of(50.0, [40.0, 50.0, 60.0, 30.0]) == {"beats": 2, "ties": 1, "trails": 1, "percentile": 62.5}


def test_random_baseline_retrains_and_ranks(tmp_path, capsys):
    from fastnas import random_baseline

    run = tmp_path / "baseline"
    rc = random_baseline.main(["--genotype", "DARTS_V2", "--samples", "2", "--space", "darts", "--dataset", "digits",
                               "--limit", "32", "--C", "4", "--layers", "3", "--epochs", "1", "--batch-size", "16",
                               "--max-steps", "1", "--no-auxiliary", "--run-dir", str(run), "--no-progress"])
    assert rc == 0
    report = json.loads((run / "baseline.json").read_text())
    assert len(report["random"]) == 2 and report["searched"]["genotype"] == str(fastnas.genotypes.get("DARTS_V2"))
    for r in report["random"]:
        Genotype.parse(r["genotype"]).validate(known_ops=fastnas.space.SPACES["darts"], steps=4)
    assert report["rank"]["beats"] + report["rank"]["ties"] + report["rank"]["trails"] == 2
    for name in ("searched", "random-1", "random-2"):
        assert (run / name / "metrics.json").exists(), name
    assert "percentile" in capsys.readouterr().out


BASELINE = ["--samples", "1", "--space", "darts", "--limit", "32", "--C", "4", "--layers", "3", "--epochs", "1",
            "--batch-size", "16", "--max-steps", "1", "--no-auxiliary", "--no-progress"]


@pytest.mark.parametrize("case", ["malformed genotype", "missing genotype", "empty folder"])
def test_random_baseline_checks_before_writing_and_its_advice_works(case, tmp_path, capsys):
    from fastnas import random_baseline

    run = tmp_path / "rb01"
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "b").mkdir()
    bad = {"malformed genotype": ["--genotype", "Genotype(normal=[('sep_conv_3x3', 0)"],
           "missing genotype": ["--genotype", str(tmp_path / "no-such-run")],
           "empty folder": ["--genotype", "DARTS_V2", "--dataset", "folder", "--data-dir", str(tmp_path / "empty"),
                            "--workers", "0"]}[case]
    assert random_baseline.main(bad + BASELINE + ["--run-dir", str(run)]) == 2
    assert not run.exists(), sorted(p.name for p in run.rglob("*"))
    if case != "malformed genotype":
        return
    good = ["--genotype", "DARTS_V2", "--dataset", "digits"] + BASELINE + ["--run-dir", str(run)]
    assert random_baseline.main(good) == 0  # the corrected rerun into the same folder
    capsys.readouterr()
    assert random_baseline.main(good) == 2  # now the folder holds a baseline: the refusal's advice ...
    advice = capsys.readouterr().err
    assert "--overwrite" in advice and "--resume" not in advice, advice
    assert random_baseline.main(good + ["--overwrite"]) == 0  # ... works when followed
    assert sorted(p.name for p in run.iterdir()) == ["baseline.json", "baseline.txt", "log.txt", "random-1",
                                                     "searched"]


@pytest.mark.parametrize("command, given, needed", [
    ("search", ["--early-stop-patience", "3"], ["--early-stop"]),
    ("search", ["--compile-scope", "model"], ["--compile"]),
    ("search", ["--skip-bad-images", "--"], ["--dataset", "folder"]),
    ("train", ["--lr-gamma", "0.5"], ["--lr-schedule", "step"]),
    ("train", ["--lr-schedule", "step", "--lr-min", "0.001"], ["--lr-schedule", "cosine"]),
])
def test_an_option_that_does_nothing_without_another_is_refused(command, given, needed, capsys, tmp_path):
    """``given`` ends with the refused option and its value (``--`` for a flag)."""
    import importlib

    module = importlib.import_module(f"fastnas.{command}")
    argv = ["--dataset", "digits", "--no-progress", "--out", str(tmp_path / "runs")] + [a for a in given if a != "--"]
    assert module.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{given[-2]} does nothing without {' '.join(needed)}" in err, err
    assert not (tmp_path / "runs").exists()
    module.config_from_args(module.build_parser().parse_args(argv + needed))  # the advice, followed, is accepted
