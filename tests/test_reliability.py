"""No silent wrong answers, no lost runs: diverging runs stop, run folders are owned, bad options and genotype
strings get one clear line."""
import errno
import json
import os
import time

import pytest
import torch

import fastnas
from fastnas import checkpoint, evaluate as evaluate_cli, rundir, search as search_cli, train as train_cli
from fastnas.errors import ConfigError, DivergedError, RunFolderError
from fastnas.genotype import Genotype, derive
from fastnas.search import Search
from helpers import tiny_search_config

TINY = ["--limit", "64", "--C", "4", "--layers", "3", "--batch-size", "16", "--max-steps", "2", "--epochs", "1",
        "--device", "cpu", "--no-progress"]


# -- diverging runs --------------------------------------------------------------------------------------------------
def test_a_search_whose_alphas_diverge_stops_naming_epoch_and_step():
    s = Search(tiny_search_config(arch_lr=1e30, epochs=1), progress=False)
    with pytest.raises(DivergedError, match=r"architecture weights .* epoch 1, step \d"):
        s.run()


def test_a_diverging_search_exits_2_and_writes_no_genotype(tmp_path, capsys):
    run = tmp_path / "run"
    assert search_cli.main(TINY + ["--arch-lr", "1e30", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "NaN or infinite" in err and "Traceback" not in err
    assert not (run / "genotype.json").exists() and not (run / "checkpoint.pt").exists()


def test_a_genotype_is_not_derived_from_non_finite_alphas():
    w = torch.full((5, 3), 1 / 3)
    w[2, 1] = float("nan")
    with pytest.raises(DivergedError, match="NaN or infinite"):
        derive(w, w.clone(), ["none", "skip_connect", "max_pool_3x3"], 2, 2)


def test_json_outputs_stay_valid_json_with_non_finite_numbers(tmp_path):
    fastnas.runtime.write_json({"loss": float("nan"), "acc": [1.0, float("inf")]}, tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text()) == {"loss": None, "acc": [1.0, None]}


# -- run folders ----------------------------------------------------------------------------------------------------
def test_a_run_folder_held_by_one_run_is_refused_to_another(tmp_path):
    rundir.claim(tmp_path / "run")
    try:
        with pytest.raises(RunFolderError, match="in use by another run"):
            rundir.claim(tmp_path / "run")
    finally:
        rundir.release(tmp_path / "run")
    rundir.claim(tmp_path / "run")  # free again once released
    rundir.release(tmp_path / "run")


def test_a_finished_run_is_not_overwritten_without_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    assert search_cli.main(TINY + ["--run-dir", str(run)]) == 0
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    assert search_cli.main(TINY + ["--run-dir", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
    assert search_cli.main(TINY + ["--run-dir", str(run), "--overwrite"]) == 0
    assert json.loads((run / "genotype.json").read_text())["normal"]


@pytest.mark.parametrize("argv", [["--lr", "-1"], ["--dataset", "cifar10", "--data-dir", "/nonexistent"]])
def test_a_refused_run_leaves_no_folder(tmp_path, argv):
    run = tmp_path / "run"
    assert search_cli.main(TINY + argv + ["--run-dir", str(run)]) == 2
    assert not run.exists()


def test_an_unwritable_run_folder_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match="cannot create the run folder"):
        rundir.claim(tmp_path / "file" / "run")


def test_an_epoch_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    a, b = tmp_path / "checkpoint.pt", tmp_path / "alphas.json"
    checkpoint.write_together({a: b"epoch 1", b: b"epoch 1"})
    real_fsync, calls = os.fsync, []

    def full_disk(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(RunFolderError, match="No space left.*files of epoch 1 are intact"):
        fastnas.cli.commit_epoch(tmp_path, 2, {a: b"epoch 2", b: b"epoch 2"})
    assert a.read_bytes() == b.read_bytes() == b"epoch 1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alphas.json", "checkpoint.pt"]  # no temporary left


# -- one line for bad options ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("main,argv", [
    (search_cli.main, ["--lr", "-1"]), (search_cli.main, ["--lr", "nan"]), (search_cli.main, ["--lr", "inf"]),
    (search_cli.main, ["--arch-lr", "nan"]), (search_cli.main, ["--arch-lr", "-1"]),
    (search_cli.main, ["--grad-clip", "nan"]), (search_cli.main, ["--momentum", "-1"]),
    (search_cli.main, ["--weight-decay", "-1"]), (search_cli.main, ["--workers", "-1"]),
    (search_cli.main, ["--device", "foo"]), (search_cli.main, ["--stem-multiplier", "0"]),
    (search_cli.main, ["--max-steps", "0"]), (train_cli.main, ["--lr", "nan"]), (train_cli.main, ["--device", "foo"]),
    (train_cli.main, ["--momentum", "1.5"]), (evaluate_cli.main, ["RUN", "--batch-size", "0"]),
    (evaluate_cli.main, ["RUN", "--device", "foo"]), (evaluate_cli.main, ["RUN", "--limit", "0"]),
])
def test_bad_options_get_one_line_and_exit_2(main, argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0], err
    assert not (tmp_path / "runs").exists()


# -- genotype strings -----------------------------------------------------------------------------------------------
CELL = "[('skip_connect', 0), ('skip_connect', 1)] "


@pytest.mark.parametrize("concat,match", [
    ("range(30000000)", "at most 64"), ("range(10**12)", "one to three integers"), ("range('a')", "integers"),
    ("range(x)", "integers"), ("range(1, 2, 0)", "zero"), ("range(1000000)", "at most 64"),
])
def test_genotype_ranges_are_checked_before_they_are_expanded(concat, match):
    text = f"Genotype(normal={CELL}, normal_concat={concat}, reduce={CELL}, reduce_concat=range(2, 3))"
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=match) as info:
        Genotype.parse(text)
    assert time.perf_counter() - start < 1.0 and len(str(info.value)) < 300


@pytest.mark.parametrize("bad,match", [
    ({"normal": [["skip_connect", 1.7]], "normal_concat": [2], "reduce": [], "reduce_concat": [2]}, "integer"),
    ({"normal": [[5, 0]], "normal_concat": [2], "reduce": [], "reduce_concat": [2]}, "name"),
    ({"normal": [[None, 0]], "normal_concat": [2], "reduce": [], "reduce_concat": [2]}, "name"),
    ({"normal": []}, "missing"), ([], "must be a dict"),
])
def test_genotype_fields_are_not_silently_converted(bad, match):
    with pytest.raises(ConfigError, match=match):
        Genotype.from_dict(bad)


def test_genotype_inputs_of_the_wrong_kind_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="expected a genotype string"):
        Genotype.parse(None)
    with pytest.raises(ConfigError, match="no genotype file"):
        Genotype.from_json(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="EvalNet needs a Genotype"):
        fastnas.EvalNet(None)
    with pytest.raises(ConfigError, match="missing"):
        fastnas.EvalNet({})


# -- higher derivatives through the whole supernet ------------------------------------------------------------------
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_supernet_hessian_vector_product_matches_the_reference_backend(channels_last):
    """H·v of the loss with respect to α by double backward (RobustDARTS's eigenvalue, exact second order) on the
    default backend and plan equals the reference backend's, in float64."""
    torch.manual_seed(0)
    net = fastnas.SuperNet(4, 3, 3, primitives=["none", "skip_connect", "sep_conv_3x3", "channel_attention",
                                                "spatial_attention", "max_pool_3x3", "avg_pool_3x3"],
                           steps=2, multiplier=2, in_channels=1).double()
    x, y = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (4,))
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    alphas = net.arch_parameters()
    v = [torch.randn_like(a) for a in alphas]
    state = {k: t.clone() for k, t in net.state_dict().items()}

    def hvp(backend):
        net.load_state_dict(state)  # the same batch-norm statistics for both runs
        with fastnas.ops.backend(backend):
            loss = torch.nn.functional.cross_entropy(net(x), y)
            grads = torch.autograd.grad(loss, alphas, create_graph=True)
            return torch.autograd.grad(sum((g * u).sum() for g, u in zip(grads, v)), alphas)

    for ours, ref in zip(hvp("auto"), hvp("reference")):
        torch.testing.assert_close(ours, ref, rtol=1e-7, atol=1e-9)
        assert ref.abs().max() > 0


def test_fused_node_sum_gradient_with_a_graph_when_one_input_feeds_another():
    """A skip input h beside candidates computed from h: the gradient taken with create_graph (the path to higher
    derivatives) equals the plain one; each input's gradient counts only its own path."""
    torch.manual_seed(0)
    h = torch.randn(3, 4, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    grads = []
    for create_graph in (False, True):
        norms = [torch.nn.BatchNorm2d(4, affine=False).double() for _ in range(2)]
        out = fastnas.ops.normalized_mixed_sum([(torch.relu(h) * 2, norms[0]), (h * h, norms[1])], [h], w)
        grads.append(torch.autograd.grad(out, [w, h], g, create_graph=create_graph))
    for plain, with_graph in zip(*grads):
        torch.testing.assert_close(with_graph, plain, rtol=1e-10, atol=1e-12)


# -- file modes -----------------------------------------------------------------------------------------------------
def test_outputs_get_the_mode_the_umask_gives(tmp_path):
    """Atomic writes go through a temporary file (created 0600); the renamed outputs still get the umask's mode."""
    from fastnas import export as export_cli

    old = os.umask(0o022)
    try:
        search, train = tmp_path / "search", tmp_path / "train"
        assert search_cli.main(TINY + ["--run-dir", str(search)]) == 0
        assert train_cli.main(TINY + ["--genotype", str(search), "--run-dir", str(train)]) == 0
        assert export_cli.main([str(train), "--format", "torchscript"]) == 0
    finally:
        os.umask(old)
    modes = {f"{p.parent.name}/{p.name}": oct(p.stat().st_mode & 0o777)
             for folder in (search, train) for p in folder.iterdir()}
    assert {"search/checkpoint.pt", "search/alphas.json", "search/data.json", "train/model.safetensors",
            "train/metrics.json", "train/model.torchscript.pt"} <= set(modes)
    assert {k: v for k, v in modes.items() if v != "0o644"} == {}


def test_the_thread_count_is_recorded_and_kept_by_resume(tmp_path, capsys):
    run = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        assert search_cli.main(TINY + ["--threads", "1", "--run-dir", str(run)]) == 0
        assert json.loads((run / "config.json").read_text())["threads"] == 1
        torch.set_num_threads(2)
        assert search_cli.main(["--resume", str(run), "--epochs", "2", "--threads", "2", "--no-progress"]) == 0
        assert torch.get_num_threads() == 1  # the run's own count, not the one given
        assert "--threads 2 ignored: the run continues on its own 1 threads" in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)
