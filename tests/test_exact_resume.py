"""An interrupted run resumed equals the uninterrupted run bitwise (wall-clock fields aside): image folders read by
worker processes (the default count), random augmentation on, the process stopped by SIGINT or kill -9 in the middle
of an epoch, then continued with --resume. Tiny shapes; the two runs of each case go side by side."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = str(Path(__file__).resolve().parents[1])
NET = ["--C", "4", "--layers", "3", "--batch-size", "8", "--epochs", "4", "--image-size", "8", "--seed", "3",
       "--threads", "1", "--device", "cpu", "--no-progress"]
CLOCK = ("seconds", "train_img_s")  # wall-clock fields


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two classes of 20 random 12x12 RGB images (40 images: 32 to train on, 8 held out)."""
    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir()
        for i in range(20):
            pixels = torch.randint(0, 128, (12, 12, 3), generator=g, dtype=torch.uint8) + 100 * c
            Image.fromarray(pixels.numpy(), "RGB").save(root / name / f"{i}.png")
    return root


def _start(module: str, argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.Popen([sys.executable, "-m", f"fastnas.{module}", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err


def _interrupt_after_first_epoch(proc: subprocess.Popen, run_dir: Path, sig: int) -> None:
    """Send ``sig`` once the first epoch is committed (the process is then in its second epoch)."""
    deadline = time.monotonic() + 600
    while not (run_dir / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode != 0, "the run ended before it was interrupted"
    epoch = torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"]
    assert 1 <= epoch < 4, err


def _without_clock(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in CLOCK} for h in history]


def _run_pair(module: str, argv: list[str], tmp_path: Path, sig: int) -> tuple[Path, Path]:
    """An uninterrupted run and one interrupted by ``sig`` then resumed; returns their folders."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    first = _start(module, argv + ["--run-dir", str(whole)])
    second = _start(module, argv + ["--run-dir", str(cut)])
    _interrupt_after_first_epoch(second, cut, sig)
    _finish(_start(module, ["--resume", str(cut), "--no-progress"]))
    _finish(first)
    return whole, cut


def _model(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


def test_a_folder_search_interrupted_by_sigint_resumes_exactly(folder, tmp_path):
    argv = ["--dataset", "folder", "--data-dir", str(folder)] + NET
    whole, cut = _run_pair("search", argv, tmp_path, signal.SIGINT)
    a, b = (json.loads((d / "alphas.json").read_text()) for d in (whole, cut))
    assert _without_clock(a["epochs"]) == _without_clock(b["epochs"])
    assert (whole / "genotype.json").read_text() == (cut / "genotype.json").read_text()
    wa, wb = _model(whole), _model(cut)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_folder_retraining_killed_resumes_exactly(folder, tmp_path):
    argv = ["--dataset", "folder", "--data-dir", str(folder), "--genotype", "DARTS_V2", "--cutout", "3",
            "--drop-path-prob", "0.3"] + NET
    whole, cut = _run_pair("train", argv, tmp_path, signal.SIGKILL)
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (whole, cut))
    assert _without_clock(a["epochs"]) == _without_clock(b["epochs"])
    assert (whole / "model.safetensors").read_bytes() == (cut / "model.safetensors").read_bytes()
    assert json.loads((cut / "config.json").read_text())["threads"] == 1
