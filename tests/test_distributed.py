"""Search and retraining under torchrun: 2 processes on the CPU (gloo), tiny shapes.

Every rank must end with bitwise the same alphas and weights (``--verify-sync`` all-gathers a digest of each tensor
after every epoch and fails the job otherwise), rank 0 alone writes one run folder, ``--resume`` works, and a
failing rank ends the whole job with its error."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

import fastnas
from fastnas import checkpoint
from fastnas import evaluate as evaluate_cli

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

SLOW = pytest.mark.skipif(not os.environ.get("FASTNAS_SLOW_TESTS"),
                          reason="more torchrun jobs (about 20 s each on 2 CPU cores); set FASTNAS_SLOW_TESTS=1")
SEARCH_ARGS = ["--dataset", "digits", "--limit", "64", "--C", "4", "--layers", "3", "--batch-size", "8",
               "--max-steps", "2", "--device", "cpu", "--no-progress", "--verify-sync"]
TRAIN_ARGS = ["--genotype", "DARTS_V2", "--dataset", "digits", "--limit", "64", "--C", "4", "--layers", "3",
              "--batch-size", "8", "--max-steps", "2", "--eval-batch-size", "360", "--cutout", "2",
              "--drop-path-prob", "0.3", "--device", "cpu", "--no-progress", "--verify-sync"]
SEARCH_OUTPUTS = {"config.json", "log.txt", "alphas.json", "checkpoint.pt", "genotype.json", "genotype.txt",
                  "normal.png", "reduce.png", "alphas.png", "analysis.txt", "collapse.png", "data.json"}
TRAIN_OUTPUTS = {"config.json", "log.txt", "metrics.json", "checkpoint.pt", "genotype.json", "model.safetensors",
                 "model.json", "data.json"}
HERE = Path(__file__).parent


def torchrun(target: list[str], args: list[str], cwd: Path, timeout: float = 150, **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"] + target + args
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def digests(log: str) -> dict[int, str]:
    """Epoch -> the state digest that --verify-sync logged (identical on every rank)."""
    found = re.findall(r"verify-sync: epoch (\d+): .* identical on all 2 processes \(sha256 (\w+)\)", log)
    return {int(e): d for e, d in found}


def one_set_of_outputs(tmp_path: Path, run: Path, names: set[str]) -> None:
    assert {p.name for p in tmp_path.iterdir()} == {run.name}  # no second folder (e.g. a default runs/...)
    assert {p.name for p in run.iterdir()} == names  # no per-rank logs, no temporary files left


@pytest.mark.parametrize("order", [1, 2])
def test_search_ranks_agree_one_writer_and_resume(tmp_path, order):
    run = tmp_path / "run"
    proc = ok(torchrun(["-m", "fastnas.search"], SEARCH_ARGS + ["--order", str(order), "--epochs", "1",
                                                                 "--run-dir", "run"], tmp_path))
    assert proc.stdout.count("Genotype(") == 1  # only rank 0 prints
    one_set_of_outputs(tmp_path, run, SEARCH_OUTPUTS)
    log = (run / "log.txt").read_text()
    assert "torchrun: 2 processes (gloo), batch 8 per process, 16 in all" in log
    assert log.count("epoch 1/1:") == 1 and set(digests(log)) == {1}
    if order == 2:
        return

    proc = ok(torchrun(["-m", "fastnas.search"], ["--resume", "run", "--epochs", "2", "--no-progress",
                                                  "--verify-sync"], tmp_path))
    one_set_of_outputs(tmp_path, run, SEARCH_OUTPUTS)
    log = (run / "log.txt").read_text()
    assert "resumed run after epoch 1" in log and log.count("epoch 2/2:") == 1 and set(digests(log)) == {1, 2}
    history = json.loads((run / "alphas.json").read_text())["epochs"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[0]["normal"] != history[1]["normal"]  # the alphas moved in the resumed epoch
    state = checkpoint.load(run)
    assert state["epoch"] == 2 and fastnas.Genotype.from_json(run / "genotype.json") == \
        fastnas.Genotype.parse(history[-1]["genotype"])


def test_train_ranks_agree_one_writer_and_resume(tmp_path, capsys):
    run = tmp_path / "run"
    ok(torchrun(["-m", "fastnas.train"], TRAIN_ARGS + ["--epochs", "1", "--run-dir", "run"], tmp_path))
    one_set_of_outputs(tmp_path, run, TRAIN_OUTPUTS)
    proc = ok(torchrun(["-m", "fastnas.train"], ["--resume", "run", "--epochs", "2", "--no-progress",
                                                 "--verify-sync"], tmp_path))
    assert proc.stdout.count("test accuracy: final") == 1
    one_set_of_outputs(tmp_path, run, TRAIN_OUTPUTS)
    log = (run / "log.txt").read_text()
    assert log.count("epoch 2/2:") == 1 and set(digests(log)) == {1, 2}
    metrics = json.loads((run / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["epochs"]] == [1, 2] and metrics["finished"]
    # the two test shards together are the whole test split, scored with the saved (rank-agreed) model
    assert evaluate_cli.main([str(run)]) == 0
    assert f"test accuracy: {metrics['final_test_acc']:.2f}%" in capsys.readouterr().out


def test_a_failing_rank_stops_the_job_with_its_error(tmp_path):
    proc = torchrun([str(HERE / "dist_inject.py")], SEARCH_ARGS + ["--epochs", "2", "--run-dir", "run",
                                                                   "--dist-timeout", "60"],
                    tmp_path, timeout=90, FASTNAS_TEST_INJECT="raise")
    assert proc.returncode != 0
    assert "fastnas.search [rank 1/2]: error:" in proc.stderr
    assert "RuntimeError: injected failure on rank 1" in proc.stderr
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@SLOW
def test_verify_sync_reports_ranks_that_differ(tmp_path):
    proc = torchrun([str(HERE / "dist_inject.py")], SEARCH_ARGS + ["--epochs", "2", "--run-dir", "run"],
                    tmp_path, timeout=90, FASTNAS_TEST_INJECT="desync")
    assert proc.returncode != 0
    assert re.search(r"--verify-sync: alphas and weights differ across ranks in 1 tensors \(stem\.", proc.stderr), \
        proc.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # the check runs before the epoch is saved


@SLOW
def test_resume_equals_uninterrupted_under_torchrun(tmp_path):
    """Each rank's random draws are a function of (seed, epoch, rank): a resumed job ends bitwise where the
    uninterrupted one does."""
    ok(torchrun(["-m", "fastnas.search"], SEARCH_ARGS + ["--epochs", "2", "--run-dir", "a"], tmp_path))
    ok(torchrun([str(HERE / "dist_inject.py")], SEARCH_ARGS + ["--epochs", "2", "--run-dir", "b"], tmp_path,
                FASTNAS_TEST_INJECT="interrupt"))
    assert checkpoint.load(tmp_path / "b")["epoch"] == 1
    ok(torchrun(["-m", "fastnas.search"], ["--resume", "b", "--verify-sync", "--no-progress"], tmp_path))
    a, b = (digests((tmp_path / d / "log.txt").read_text()) for d in "ab")
    assert a == b and len(a) == 2
