"""The search loop: both orders, the second-order gradient itself, exact resume, outputs and errors."""
import json

import pytest
import torch
from torch import nn

import fastnas
from fastnas import search as search_cli
from fastnas.architect import Architect
from fastnas.data import read_data_json
from fastnas.search import Search
from helpers import tiny_search_config


@pytest.mark.parametrize("order", [1, 2])
def test_search_runs_and_moves_the_alphas(order):
    s = Search(tiny_search_config(order=order, epochs=1), progress=False)
    before = [a.detach().clone() for a in s.model.arch_parameters()]
    weights_before = [p.detach().clone() for p in s.model.weight_parameters()]
    result = s.run()
    assert isinstance(result.genotype, fastnas.Genotype)
    assert any(not torch.equal(a, b) for a, b in zip(before, s.model.arch_parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(weights_before, s.model.weight_parameters()))
    assert len(result.history) == 1 and 0 <= result.valid_accuracy <= 100


def _tiny_fp64_net():
    torch.manual_seed(0)
    net = fastnas.SuperNet(4, 3, 3, primitives=["none", "skip_connect", "sep_conv_3x3", "channel_attention",
                                                "avg_pool_3x3"], steps=2, multiplier=2, in_channels=1).double()
    with torch.no_grad():
        for a in net.arch_parameters():
            a.normal_(0, 0.5)
    return net


@fastnas.ops.backend("reference")  # the analytic side needs double backward, which the reference ops have
def test_second_order_gradient_matches_exact_hessian_vector_product():
    """The finite-difference architecture gradient equals the analytic one (double backward) in float64.

    DARTS's radius (ε·‖v‖ = 0.01) crosses ReLU and max-pool kinks on a network this small; a small radius shows the
    formula itself is exact."""
    net = _tiny_fp64_net()
    crit = nn.CrossEntropyLoss()
    xt, yt = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (6,))
    xv, yv = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (6,))
    opt = torch.optim.SGD(net.weight_parameters(), lr=0.1, momentum=0.9, weight_decay=3e-4)
    for p in net.weight_parameters():  # a momentum buffer, so the virtual step uses it
        opt.state[p]["momentum_buffer"] = 0.01 * torch.randn_like(p)
    eta, wd, mom = 0.1, 3e-4, 0.9
    arch = Architect(net, crit, order=2, network_momentum=mom, network_weight_decay=wd, fd_radius=1e-6)
    state_before = {k: v.clone() for k, v in net.state_dict().items()}
    names, weights = zip(*net.named_weight_parameters())
    _, grads = arch._second_order(xt, yt, xv, yv, eta, opt)
    # the network's own weights and batch-norm statistics are untouched by the virtual steps
    for k, v in net.state_dict().items():
        assert torch.equal(v, state_before[k]), k

    # exact: d/dα L_val(w'(α), α) with w'(α) = w − η (m + ∇w L_train(w, α) + λ w), by double backward
    alphas = net.arch_parameters()
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    call = lambda ws, x: torch.func.functional_call(net, {**dict(zip(names, ws)), **buffers}, (x,))  # noqa: E731
    loss_t = crit(call(weights, xt), yt)
    dw = torch.autograd.grad(loss_t, weights, create_graph=True)
    unrolled = [w - eta * (opt.state[w]["momentum_buffer"] * mom + g + wd * w) for w, g in zip(weights, dw)]
    exact = torch.autograd.grad(crit(call(unrolled, xv), yv), alphas)
    for g, e in zip(grads, exact):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-9)


def test_first_order_gradient_is_the_validation_gradient_and_leaves_weights_alone():
    net = _tiny_fp64_net()
    crit = nn.CrossEntropyLoss()
    xv, yv = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (4,))
    seen = []  # whether the weights needed a gradient while the architecture step ran the network
    hook = net.register_forward_pre_hook(lambda m, args: seen.append(any(p.requires_grad
                                                                         for p in net.weight_parameters())))
    _, grads = Architect(net, crit, order=1)._first_order(xv, yv)
    hook.remove()
    exact = torch.autograd.grad(crit(net(xv), yv), net.arch_parameters())
    for g, e in zip(grads, exact):
        torch.testing.assert_close(g, e)
    assert all(p.grad is None for p in net.weight_parameters())
    # frozen during the step (no weight gradient is built, frozen convolutions keep no input), live again after it
    assert seen == [False] and all(p.requires_grad for p in net.weight_parameters())


@pytest.mark.parametrize("order", [1, 2])
def test_resume_equals_uninterrupted(tmp_path, order):
    straight = Search(tiny_search_config(order=order, epochs=2), tmp_path / "a", progress=False)
    (tmp_path / "a").mkdir()
    straight.run()

    (tmp_path / "b").mkdir()
    interrupted = Search(tiny_search_config(order=order, epochs=2), tmp_path / "b", progress=False)
    interrupted.run(until_epoch=1)  # as if killed after the first epoch's checkpoint
    state = fastnas.checkpoint.load(tmp_path / "b")
    resumed = Search(tiny_search_config(order=order, epochs=2), tmp_path / "b", progress=False)
    resumed.load_state_dict(state)
    resumed.run()
    for a, b in zip(straight.model.arch_parameters(), resumed.model.arch_parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_cli_writes_every_output(tmp_path, capsys):
    run = tmp_path / "run"
    rc = search_cli.main(["--dataset", "digits", "--limit", "64", "--C", "4", "--layers", "3", "--epochs", "2",
                          "--batch-size", "16", "--max-steps", "2", "--run-dir", str(run), "--no-progress"])
    assert rc == 0
    for name in ["config.json", "log.txt", "alphas.json", "checkpoint.pt", "genotype.json", "genotype.txt",
                 "normal.png", "reduce.png", "alphas.png", "analysis.txt", "data.json"]:
        assert (run / name).stat().st_size > 0, name
    assert read_data_json(run) == {"dataset": "digits", "classes": [str(d) for d in range(10)], "in_channels": 1,
                                   "image_size": 8, "mean": [0.3074], "std": [0.388]}
    alphas = json.loads((run / "alphas.json").read_text())
    assert len(alphas["epochs"]) == 2 and len(alphas["epochs"][0]["normal"]) == 14
    g = fastnas.Genotype.from_json(run / "genotype.json")
    assert str(g) in capsys.readouterr().out
    assert (run / "normal.png").read_bytes()[:4] == b"\x89PNG"
    assert "attention" in (run / "analysis.txt").read_text()

    # resume a finished run with more epochs
    rc = search_cli.main(["--resume", str(run), "--epochs", "3", "--no-progress"])
    assert rc == 0
    assert len(json.loads((run / "alphas.json").read_text())["epochs"]) == 3


def test_cli_help_documents_options(capsys):
    with pytest.raises(SystemExit):
        search_cli.main(["--help"])
    text = capsys.readouterr().out
    for opt in ["--order", "--preset", "--resume", "--primitives", "--backend", "--amp", "--data-dir", "--download"]:
        assert opt in text


@pytest.mark.parametrize("argv,match", [
    (["--primitives", "none,sep_conv_9x9"], "unknown op"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/data"], "cifar-10-batches-py"),
    (["--dataset", "cifar10"], "--data-dir"),
    (["--C", "5"], "even"),
    (["--order", "2", "--amp", "fp16"], "refused"),
    (["--train-portion", "1.5"], "train-portion"),
    (["--resume", "/nonexistent/run"], "no checkpoint"),
])
def test_cli_errors_are_one_clear_line(argv, match, capsys):
    rc = search_cli.main(argv + ["--no-progress", "--limit", "32", "--layers", "3"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    import re
    assert re.search(match, err), err


def test_corrupt_checkpoint_is_reported(tmp_path, capsys):
    (tmp_path / "checkpoint.pt").write_bytes(b"this is not a checkpoint")
    assert search_cli.main(["--resume", str(tmp_path)]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_memory_layout_is_automatic_and_can_be_forced():
    """channels_last by default on the CPU (faster there), the default layout elsewhere; both flags override."""
    from fastnas import runtime
    from fastnas.search import build_parser, config_from_args

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert runtime.use_channels_last(None, cpu) and not runtime.use_channels_last(None, gpu)
    assert not runtime.use_channels_last(False, cpu) and runtime.use_channels_last(True, gpu)
    parse = lambda *a: config_from_args(build_parser().parse_args(list(a))).channels_last  # noqa: E731
    assert parse() is None and parse("--channels-last") is True and parse("--no-channels-last") is False


def test_threads_option_sets_torch_threads_and_refuses_nonsense(capsys, monkeypatch):
    from fastnas import search

    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    assert search.main(["--threads", "0"]) == 2
    assert "--threads must be >= 1, got 0" in capsys.readouterr().err
    monkeypatch.setattr(search, "_main", lambda args, argv: 0)  # parse and apply, do not search
    assert search.main(["--threads", "1"]) == 0 and seen == [1]
