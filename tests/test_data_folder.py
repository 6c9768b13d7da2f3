"""The user's own image folders: search, retrain, evaluate, predict and export on ImageFolder layouts made on the
fly (mixed sizes, PNG and JPEG, grayscale, RGB, RGBA and palette images, a corrupt file), the run's data.json, and one
clear line with exit 2 for each kind of bad data. Tiny shapes throughout."""
import json
import os
import re

import pytest
import torch
from PIL import Image

from fastnas import evaluate as evaluate_cli
from fastnas import export as export_cli
from fastnas import predict as predict_cli
from fastnas import search as search_cli
from fastnas import train as train_cli
from fastnas.data import DataError, eval_transform, open_folder, read_data_json
from fastnas.predict import Predictor

CLASSES = ("cat", "dog", "fish")
SIZES = [(10, 12), (17, 9), (16, 16), (9, 17)]
MODES = ["RGB", "L", "RGBA", "P"]
NET = ["--C", "4", "--layers", "3", "--epochs", "1", "--batch-size", "8", "--max-steps", "2", "--image-size", "16",
       "--device", "cpu", "--no-progress"]


def _image(mode: str, size: tuple[int, int], shade: int) -> Image.Image:
    """A small image whose brightness depends on its class, so there is something to learn."""
    noise = torch.randint(0, 40, (size[1], size[0], 3), dtype=torch.uint8) + shade
    image = Image.fromarray(noise.numpy(), "RGB")
    if mode == "P":
        return image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return image.convert(mode)


def make_folder(root, per_class: int = 6, modes=MODES, classes=CLASSES, corrupt: bool = False):
    """``root/<class>/<n>.png|jpg``: sizes and modes cycling; JPEG for RGB and L images every other time."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            mode, size = modes[i % len(modes)], SIZES[i % len(SIZES)]
            ext = "jpg" if mode in ("RGB", "L") and i % 2 == 0 else "png"
            _image(mode, size, 60 * c).save(root / name / f"{i}.{ext}")
    if corrupt:
        (root / classes[0] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def _one_line_error(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_search_retrain_and_evaluate_on_an_image_folder(tmp_path, capsys):
    data = make_folder(tmp_path / "images", corrupt=True)
    search_dir, train_dir = tmp_path / "search", tmp_path / "train"
    assert search_cli.main(["--dataset", "folder", "--data-dir", str(data), "--skip-bad-images",
                            "--run-dir", str(search_dir)] + NET) == 0
    info = read_data_json(search_dir)
    assert info["dataset"] == "folder" and info["classes"] == list(CLASSES)
    assert (info["in_channels"], info["image_size"]) == (3, 16)
    assert len(info["mean"]) == len(info["std"]) == 3 and all(0 < s < 1 for s in info["std"])
    assert info["images"] == {"train": {c: 5 for c in CLASSES}, "held_out": {c: 1 for c in CLASSES}}
    assert "images per class: train cat 5, dog 5, fish 5; held out cat 1" in (search_dir / "log.txt").read_text()
    assert json.loads((search_dir / "config.json").read_text())["skip_bad_images"] is True
    assert (search_dir / "genotype.json").exists()

    assert train_cli.main(["--genotype", str(search_dir), "--dataset", "folder", "--data-dir", str(data),
                           "--skip-bad-images", "--workers", "0", "--run-dir", str(train_dir)] + NET) == 0
    assert read_data_json(train_dir) == info  # the same folder gives the same classes and statistics
    capsys.readouterr()
    assert evaluate_cli.main([str(train_dir)]) == 0
    printed = capsys.readouterr().out
    # the held-out part: 20% of each class of 6 (the corrupt file left out) -> 1 + 1 + 1 images
    assert re.search(r"test accuracy: [\d.]+% \(\d+/3 images\)", printed), printed

    # predict names the folder's classes; the ONNX export predicts what PyTorch predicts on the same images
    dogs = sorted(str(p) for p in (data / "dog").iterdir())
    assert predict_cli.main([str(train_dir), str(data / "dog"), "--top-k", "2", "--json"]) == 0
    predicted = json.loads(capsys.readouterr().out)
    assert sorted(p["image"] for p in predicted) == dogs
    assert all(len(p["top_k"]) == 2 and {t["class"] for t in p["top_k"]} <= set(CLASSES) for p in predicted)
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    assert export_cli.main([str(train_dir), "--format", "onnx"]) == 0
    predictor = Predictor(train_dir, backend="reference")
    x = torch.stack([predictor.transform(Image.open(p)) for p in dogs])
    expected = predictor.probabilities(dogs)
    session = ort.InferenceSession(str(train_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    probs = torch.softmax(torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), dim=1)
    assert torch.equal(probs.argmax(1), expected.argmax(1))
    assert float((probs - expected).abs().max()) < 1e-4


def test_held_out_part_classes_and_channels_follow_the_folder(tmp_path):
    gray = make_folder(tmp_path / "gray", per_class=5, modes=["L"], classes=("a", "b"))
    parts = open_folder(gray, image_size=8)
    assert parts.info.in_channels == 1 and parts.info.classes == ("a", "b")
    assert (len(parts.train), len(parts.val)) == (8, 2)
    assert {label for _, label in parts.val} == {0, 1}  # every class is held out
    assert len({label for _, label in parts.train[:4]}) == 2  # the training part is shuffled
    x = eval_transform({"in_channels": 1, "image_size": 8, "mean": parts.info.mean,
                        "std": parts.info.std})(Image.open(parts.val[0][0]))
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32

    split = tmp_path / "split"
    make_folder(split / "train", per_class=4, classes=("x", "y"))
    make_folder(split / "val", per_class=2, classes=("y",))
    parts = open_folder(split, image_size=8)
    assert parts.info.in_channels == 3 and len(parts.train) == 8
    assert len({label for _, label in parts.train[:4]}) == 2  # shuffled here too
    assert [label for _, label in parts.val] == [1, 1]  # val/y is class 1 of train/'s classes
    with pytest.raises(DataError, match="the run was trained on"):
        open_folder(split, saved={"classes": ["x", "z"], "in_channels": 3, "image_size": 8, "mean": [0.5] * 3,
                                  "std": [0.2] * 3})


def test_eval_transform_converts_resizes_crops_and_normalises():
    info = {"dataset": "folder", "classes": ["a", "b"], "in_channels": 3, "image_size": 4, "mean": [0.5] * 3,
            "std": [0.25] * 3}
    rgba = Image.new("RGBA", (8, 6), (255, 0, 128, 10))
    x = eval_transform(info)(rgba)
    assert x.shape == (3, 4, 4)
    assert torch.allclose(x[:, 0, 0], torch.tensor([2.0, -2.0, (128 / 255 - 0.5) / 0.25]), atol=1e-5)


def _bad_folders(root):
    """name -> (folder, extra options, what the error must say)."""
    (root / "none").mkdir(parents=True)
    (root / "none" / "readme.txt").write_text("no class folders here")
    make_folder(root / "one", per_class=2, classes=("only",))
    make_folder(root / "empty", per_class=2, classes=("a", "b"))
    (root / "empty" / "c").mkdir()
    corrupt = make_folder(root / "corrupt", per_class=2, classes=("a", "b"), corrupt=True)
    truncated = make_folder(root / "truncated", per_class=2, classes=("a", "b"))
    jpeg = (truncated / "b" / "0.jpg").read_bytes()
    (truncated / "b" / "0.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    return {
        "no class folders": (root / "none", [], "holds no class folders"),
        "one class": (root / "one", [], r"one class folder \(only\).*at least 2"),
        "empty class": (root / "empty", [], r"no images .* in .*empty: c$"),
        "corrupt file": (root / "corrupt", [], re.escape(str(corrupt / "a" / "broken.png")) + ".*--skip-bad-images"),
        "truncated file": (root / "truncated", [], re.escape(str(truncated / "b" / "0.jpg")) + ": truncated"),
        "too small": (root / "one", ["--image-size", "2"], r"--image-size 2: .*needs at least 4x4.*--image-size 4 or"),
        "no folder": (root / "missing", [], "no image folder at"),
    }


@pytest.mark.parametrize("case", ["no class folders", "one class", "empty class", "corrupt file", "truncated file",
                                  "too small", "no folder"])
def test_bad_data_is_one_clear_line_and_leaves_no_run_folder(case, tmp_path, capsys):
    folder, extra, match = _bad_folders(tmp_path / "data")[case]
    out = tmp_path / "runs"
    argv = ["--dataset", "folder", "--data-dir", str(folder), "--out", str(out), "--workers", "0"] + NET + extra
    err = _one_line_error(capsys, search_cli.main(argv))
    assert re.search(match, err.strip()), err
    assert not out.exists()
    if case in ("corrupt file", "one class"):  # retraining refuses the same way
        err = _one_line_error(capsys, train_cli.main(argv + ["--genotype", "DARTS_V2"]))
        assert re.search(match, err.strip()), err
        assert not out.exists()


def test_image_size_is_for_folders_only(capsys):
    err = _one_line_error(capsys, search_cli.main(["--dataset", "digits", "--image-size", "16", "--no-progress"]))
    assert "--image-size applies to --dataset folder" in err


# -- links, files counted once, high-bit-depth images, classes left empty --------------------------------------------
def _labels_follow_folders(samples, classes):
    return all(os.path.basename(os.path.dirname(path)) == classes[label] or "/more/" in path
               for path, label in samples)


def test_links_are_followed_once_and_never_back_into_the_folder(tmp_path):
    data = make_folder(tmp_path / "images", per_class=8, modes=["RGB"], classes=("cat", "dog"))
    os.symlink("..", data / "cat" / "up")  # loops back to the data root
    outside = make_folder(tmp_path / "outside", per_class=2, modes=["RGB"], classes=("extra",)) / "extra"
    os.symlink(outside, data / "cat" / "more")  # a folder elsewhere: followed once
    os.symlink(outside, outside / "again")  # ... and its own loop is not
    parts = open_folder(data, image_size=8)
    samples = parts.train + parts.val
    assert len(samples) == len({path for path, _ in samples}) == 18
    assert parts.info.images["train"] == {"cat": 8, "dog": 6} and parts.info.images["held_out"] == {"cat": 2, "dog": 2}
    assert _labels_follow_folders(samples, ["cat", "dog"])
    assert not {path for path, _ in parts.train} & {path for path, _ in parts.val}


def test_a_file_under_two_classes_is_an_error_naming_both(tmp_path):
    data = make_folder(tmp_path / "images", per_class=3, modes=["RGB"], classes=("cat", "dog"))
    os.symlink(data / "dog" / "1.png", data / "cat" / "z.png")
    with pytest.raises(DataError, match=re.escape(f"{data / 'dog' / '1.png'} and {data / 'cat' / 'z.png'}") +
                       ".* under two classes"):
        open_folder(data, image_size=8)
    split = tmp_path / "split"
    make_folder(split / "train", per_class=3, modes=["RGB"], classes=("a", "b"))
    make_folder(split / "val", per_class=1, modes=["RGB"], classes=("a",))
    os.link(split / "train" / "b" / "1.png", split / "val" / "a" / "9.png")
    with pytest.raises(DataError, match="same file, in the training and the held-out images"):
        open_folder(split, image_size=8)


def _gray(mode: str, value):
    import numpy as np

    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    image = Image.fromarray(np.full((6, 6), value, dtype=dtype))
    assert image.mode == mode
    return image


@pytest.mark.parametrize("mode, value, scaled", [("I;16", 30670, 30670 / 65535), ("I", 30670, 30670 / 65535),
                                                 ("I", 2 ** 30, 2 ** 30 / (2 ** 31 - 1)), ("F", 0.25, 0.25)])
def test_high_bit_depth_images_are_scaled_by_their_range(tmp_path, mode, value, scaled):
    image = _gray(mode, value)
    gray = {"in_channels": 1, "image_size": 4, "mean": [0.0], "std": [1.0]}
    assert abs(float(eval_transform(gray)(image).mean()) - scaled) < 1e-6
    rgb = eval_transform({**gray, "in_channels": 3, "mean": [0.0] * 3, "std": [1.0] * 3})(image)
    assert rgb.shape[0] == 3 and abs(float(rgb.mean()) - scaled) < 1 / 255
    if mode == "I;16":  # a folder of 16-bit PNGs: one channel, statistics of the scaled values
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            for i in range(3):
                _gray(mode, value).save(tmp_path / name / f"{i}.png")
        parts = open_folder(tmp_path, image_size=4)
        assert parts.info.in_channels == 1 and abs(parts.info.mean[0] - scaled) < 1e-5


def test_a_class_left_empty_by_skip_bad_images_is_an_error_naming_it(tmp_path, capsys):
    data = make_folder(tmp_path / "images", per_class=2, modes=["RGB"], classes=("a", "b"))
    (data / "c").mkdir()
    (data / "c" / "broken.png").write_bytes(b"not an image")
    argv = ["--dataset", "folder", "--data-dir", str(data), "--skip-bad-images", "--workers", "0",
            "--out", str(tmp_path / "runs")] + NET
    assert search_cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the warning that counts the skipped files
    assert re.search(r"without a readable training image in .*images: c \(--skip-bad-images left out", err), err
    assert not (tmp_path / "runs").exists()
