"""Using a trained model: fastnas.load_model with the run's transform, Predictor and python -m fastnas.predict, and
python -m fastnas.export to ONNX (checked on onnxruntime, standard ops only), TorchScript and torch.export, the
exported files run without fastnas. Also the errors for bad runs and images. One tiny digits run serves them all."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastnas
from fastnas import export as export_cli
from fastnas import predict as predict_cli
from fastnas import train as train_cli
from fastnas.data import DATASETS, _digits
from fastnas.evalnet import EvalNet, save_model
from fastnas.predict import Predictor

TINY_ARGS = ["--limit", "64", "--C", "4", "--layers", "3", "--epochs", "1", "--batch-size", "16", "--max-steps", "2",
             "--eval-batch-size", "360", "--device", "cpu", "--no-progress"]
ATTENTION = fastnas.Genotype(
    normal=[("channel_attention", 0), ("spatial_attention", 1), ("sep_conv_3x3", 2), ("channel_attention", 1)],
    normal_concat=[2, 3],
    reduce=[("spatial_attention", 0), ("channel_attention", 1), ("skip_connect", 2), ("spatial_attention", 0)],
    reduce_concat=[2, 3],
)


def _digits_data_json(classes=None) -> dict:
    d = DATASETS["digits"]
    return {"dataset": "digits", "classes": classes or [str(i) for i in range(10)], "in_channels": 1,
            "image_size": 8, "mean": list(d.mean), "std": list(d.std)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A retrained digits run (with data.json) and a folder of six 8x8 grayscale digit PNGs."""
    root = tmp_path_factory.mktemp("use")
    run_dir = root / "run"
    assert train_cli.main(TINY_ARGS + ["--run-dir", str(run_dir)]) == 0
    if not (run_dir / "data.json").exists():
        (run_dir / "data.json").write_text(json.dumps(_digits_data_json()))
    images_dir = root / "images"
    images_dir.mkdir()
    images, labels = _digits(train=False)
    for i in range(6):
        pixels = (images[i, 0] * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pixels, mode="L").save(images_dir / f"digit{i}_{int(labels[i])}.png")
    return run_dir, images_dir


def _images(images_dir):
    return sorted(images_dir.glob("*.png"))


def _reference_probs(run_dir, paths):
    """What the model gives through its own transform, on the plain-PyTorch backend."""
    model = fastnas.load_model(run_dir)
    x = torch.stack([model.transform(Image.open(p)) for p in paths])
    with fastnas.ops.backend("reference"), torch.no_grad():
        return x, torch.softmax(model(x), dim=1)


def _one_line_error(capsys, rc, match):
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert match in err, err


# -- load_model, Predictor, the predict command --------------------------------------------------------------------
def test_load_model_has_classes_and_transform(run):
    run_dir, images_dir = run
    model = fastnas.load_model(run_dir)
    assert model.classes == [str(i) for i in range(10)] and model.data_info["image_size"] == 8
    x = model.transform(Image.open(_images(images_dir)[0]))
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32
    raw = torch.from_numpy(np.array(Image.open(_images(images_dir)[0]))).float() / 255
    torch.testing.assert_close(x[0], (raw - DATASETS["digits"].mean[0]) / DATASETS["digits"].std[0])
    assert model(x[None]).shape == (1, 10)
    assert "transform" not in dict(model.named_children())  # not part of the network


def test_predictor_top_k(run):
    run_dir, images_dir = run
    paths = _images(images_dir)
    predictor = fastnas.Predictor(run_dir, top_k=3)
    results = predictor.predict(paths)
    _, probs = _reference_probs(run_dir, paths)
    assert len(results) == 6
    for result, p in zip(results, probs):
        assert len(result) == 3 and [c for c, _ in result][0] == str(int(p.argmax()))
        assert [q for _, q in result] == sorted((q for _, q in result), reverse=True)
        assert abs(result[0][1] - float(p.max())) < 1e-5
    assert predictor.predict(images_dir, top_k=20) == predictor.predict([str(p) for p in paths], top_k=10)
    assert len(predictor.predict(Image.open(paths[0]))) == 1  # a PIL image
    assert abs(sum(q for _, q in predictor.predict(paths[0], top_k=10)[0]) - 1.0) < 1e-5


def test_predict_cli_text_and_json(run, capsys):
    run_dir, images_dir = run
    assert predict_cli.main([str(run_dir), str(images_dir), "--top-k", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["image"] for o in out] == [str(p) for p in _images(images_dir)]
    assert all(len(o["top_k"]) == 2 and set(o["top_k"][0]) == {"class", "probability"} for o in out)
    first = _images(images_dir)[0]
    assert predict_cli.main([str(run_dir), str(first), "--top-k", "1"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{first}: ") and line.count(",") == 0
    assert line.split(": ")[1].split()[0] == out[0]["top_k"][0]["class"]


def test_older_run_without_data_json_uses_its_dataset(run, tmp_path):
    run_dir, images_dir = run
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    (old / "data.json").unlink()
    model = fastnas.load_model(old)
    assert model.classes == [str(i) for i in range(10)] and model.data_info["mean"] == list(DATASETS["digits"].mean)
    assert Predictor(old).predict(images_dir) == Predictor(run_dir).predict(images_dir)


# -- export ----------------------------------------------------------------------------------------------------------
def test_onnx_export_matches_pytorch_with_standard_ops_only(run, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    run_dir, images_dir = run
    path = tmp_path / "digits.onnx"
    assert export_cli.main([str(run_dir), "--format", "onnx", "--output", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {path}" in out and "max difference" in out and "onnxruntime" in out
    proto = onnx.load(str(path))
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"} and not proto.functions
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert proto.graph.input[0].name == "images" and batch.dim_param and not batch.dim_value  # dynamic batch
    assert json.loads({p.key: p.value for p in proto.metadata_props}["fastnas.classes"]) == [str(i) for i in range(10)]
    x, expected = _reference_probs(run_dir, _images(images_dir))  # six images: another batch size than traced
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probs = torch.softmax(torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), dim=1)
    assert torch.equal(probs.argmax(1), expected.argmax(1))
    assert float((probs - expected).abs().max()) < 1e-4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_attention_ops_export_to_standard_onnx(tmp_path):
    """The CBAM gates (fused kernels in PyTorch) become standard ONNX ops through their reference decomposition."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    net = EvalNet(ATTENTION, 4, 3, 10, auxiliary=True, in_channels=1, input_size=8, steps=2)
    save_model(net, tmp_path, {"dataset": "digits"})
    (tmp_path / "data.json").write_text(json.dumps(_digits_data_json()))
    path, d_logits, d_probs = export_cli.export_model(tmp_path, "onnx")
    assert path == tmp_path / "model.onnx" and d_probs < 1e-4
    assert export_cli.nonstandard_onnx_nodes(onnx.load(str(path))) == []


@pytest.mark.parametrize("fmt,load", [
    ("torchscript", lambda p: torch.jit.load(str(p))),
    ("torch.export", lambda p: torch.export.load(str(p)).module()),
])
def test_torchscript_and_torch_export_round_trip(run, tmp_path, fmt, load, capsys):
    run_dir, images_dir = run
    out = tmp_path / ("model.pt" if fmt == "torchscript" else "model.pt2")
    assert export_cli.main([str(run_dir), "--format", fmt, "--output", str(out)]) == 0
    assert "max difference" in capsys.readouterr().out
    x, expected = _reference_probs(run_dir, _images(images_dir))
    with torch.no_grad():
        probs = torch.softmax(load(out)(x), dim=1)
    assert torch.equal(probs.argmax(1), expected.argmax(1)) and float((probs - expected).abs().max()) < 1e-5


def test_exported_files_run_without_fastnas(run, tmp_path):
    """A fresh interpreter where importing fastnas fails loads and runs all three exported files."""
    pytest.importorskip("onnxruntime")
    run_dir, images_dir = run
    files = {fmt: tmp_path / name for fmt, name in export_cli.FORMATS.items()}
    for fmt, path in files.items():
        export_cli.export_model(run_dir, fmt, path)
    x, expected = _reference_probs(run_dir, _images(images_dir))
    np.save(tmp_path / "x.npy", x.numpy())
    script = f"""
import sys
sys.modules["fastnas"] = None  # importing it fails
import numpy as np, onnxruntime, torch
x = np.load({str(tmp_path / 'x.npy')!r})
outs = [onnxruntime.InferenceSession({str(files['onnx'])!r}).run(None, {{"images": x}})[0],
        torch.jit.load({str(files['torchscript'])!r})(torch.from_numpy(x)).detach().numpy(),
        torch.export.load({str(files['torch.export'])!r}).module()(torch.from_numpy(x)).detach().numpy()]
np.save({str(tmp_path / 'out.npy')!r}, np.stack(outs))
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, timeout=300)
    for logits in np.load(tmp_path / "out.npy"):
        probs = torch.softmax(torch.from_numpy(logits), dim=1)
        assert torch.equal(probs.argmax(1), expected.argmax(1)) and float((probs - expected).abs().max()) < 1e-4


# -- bad input -----------------------------------------------------------------------------------------------------
def test_folder_without_trained_model(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"dataset": "digits"}))
    before = sorted(tmp_path.iterdir())
    _one_line_error(capsys, predict_cli.main([str(tmp_path), str(tmp_path)]), "no trained model in")
    _one_line_error(capsys, export_cli.main([str(tmp_path), "--format", "torchscript"]), "no trained model in")
    _one_line_error(capsys, predict_cli.main([str(tmp_path / "missing"), "x.png"]), "no run folder at")
    assert sorted(tmp_path.iterdir()) == before


def test_unreadable_images_are_named(run, tmp_path, capsys):
    run_dir, _ = run
    bad = tmp_path / "broken.png"
    bad.write_text("not a picture")
    _one_line_error(capsys, predict_cli.main([str(run_dir), str(bad)]), f"cannot read image {bad}")
    _one_line_error(capsys, predict_cli.main([str(run_dir), str(tmp_path / "gone.png")]),
                    f"cannot read image {tmp_path / 'gone.png'}: no such file")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(capsys, predict_cli.main([str(run_dir), str(empty)]), "holds no image files")


def test_classes_that_do_not_fit_the_classifier(run, tmp_path, capsys):
    run_dir, images_dir = run
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    (other / "data.json").write_text(json.dumps(_digits_data_json(classes=["cat", "dog", "fish"])))
    before = sorted(other.iterdir())
    _one_line_error(capsys, predict_cli.main([str(other), str(images_dir)]),
                    "lists 3 classes, but the model's classifier has 10 outputs")
    _one_line_error(capsys, export_cli.main([str(other), "--format", "torchscript"]), "lists 3 classes")
    (other / "data.json").write_text("{not json")
    _one_line_error(capsys, predict_cli.main([str(other), str(images_dir)]), "cannot read")
    assert sorted(other.iterdir()) == before


def test_export_leaves_nothing_when_the_check_fails(run, tmp_path, monkeypatch, capsys):
    run_dir, _ = run
    monkeypatch.setattr(export_cli, "PROB_TOLERANCE", -1.0)  # no export can pass
    out = tmp_path / "model.pt"
    _one_line_error(capsys, export_cli.main([str(run_dir), "--format", "torchscript", "--output", str(out)]),
                    "differs from PyTorch")
    assert list(tmp_path.iterdir()) == []


def test_missing_export_dependencies(run, tmp_path, monkeypatch, capsys):
    run_dir, _ = run
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    _one_line_error(capsys, export_cli.main([str(run_dir), "--output", str(tmp_path / "m.onnx")]),
                    "pip install fastnas[export]")
    assert list(tmp_path.iterdir()) == []


# -- outputs that are not numbers, warnings, existing files ------------------------------------------------------------
def _nan_run(run_dir, tmp_path):
    """A copy of ``run_dir`` whose model weights are NaN."""
    bad = tmp_path / "nan-run"
    shutil.copytree(run_dir, bad)
    model = fastnas.load_model(bad)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    save_model(model, bad, json.loads((bad / "model.json").read_text()))
    return bad


def test_non_finite_weights_stop_predict_and_export_naming_the_model(run, tmp_path, capsys):
    run_dir, images_dir = run
    bad = _nan_run(run_dir, tmp_path)
    _one_line_error(capsys, predict_cli.main([str(bad), str(images_dir)]),
                    f"the model in {bad} gives non-finite outputs")
    _one_line_error(capsys, export_cli.main([str(bad), "--format", "torchscript", "--output", str(tmp_path / "m.pt")]),
                    f"the model in {bad} has non-finite weights")
    assert not (tmp_path / "m.pt").exists()


def test_export_refuses_an_existing_output_without_overwrite(run, tmp_path, capsys):
    run_dir, _ = run
    out = tmp_path / "m.pt"
    argv = [str(run_dir), "--format", "torchscript", "--output", str(out)]
    assert export_cli.main(argv) == 0
    capsys.readouterr()
    before = out.read_bytes()
    _one_line_error(capsys, export_cli.main(argv), "exists; pass --overwrite")
    assert out.read_bytes() == before
    assert export_cli.main(argv + ["--overwrite"]) == 0  # the advice works


def test_the_predict_command_prints_no_runtime_warning(tmp_path):
    """The package does not import its command-line module, so ``python -m`` does not find it loaded already."""
    root = str(Path(fastnas.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root}
    done = subprocess.run([sys.executable, "-m", "fastnas.predict", "--help"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120)
    assert done.returncode == 0 and "usage:" in done.stdout
    assert "Warning" not in done.stderr, done.stderr
