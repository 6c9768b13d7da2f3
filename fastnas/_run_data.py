"""What a run folder says about its images, and how an image is prepared for its model.

Every run folder holds ``data.json``: the dataset, its classes (in the classifier's order), the channels, the image
side and the normalisation. :func:`read_data_json` reads it (for runs written before it existed, it is rebuilt from
the dataset named in ``config.json`` or ``model.json``: classes "0".."N-1"); :func:`eval_transform` turns a PIL image
into the normalised tensor the model takes.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
from torchvision.transforms import v2 as T

from .data import dataset_info
from .errors import DataError

DATA_FILE = "data.json"


def _check(info: Any, path: Path) -> dict[str, Any]:
    """``info`` when it has every field with a sensible value; a one-line DataError naming the first bad one."""
    if not isinstance(info, dict):
        raise DataError(f"{path} is not a JSON object")

    def numbers(v):
        return isinstance(v, list) and all(isinstance(x, (int, float)) and math.isfinite(x) for x in v)

    c = info.get("in_channels")
    checks = [
        ("classes", lambda v: isinstance(v, list) and v and all(isinstance(x, str) for x in v),
         "a non-empty list of names"),
        ("in_channels", lambda v: v in (1, 3), "1 or 3"),
        ("image_size", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
        ("mean", lambda v: numbers(v) and len(v) == c, "a list of one number per channel"),
        ("std", lambda v: numbers(v) and len(v) == c and all(x > 0 for x in v), "a list of one number > 0 per channel"),
    ]
    for key, ok, expected in checks:
        if key not in info:
            raise DataError(f"{path} has no {key!r}")
        if not ok(info[key]):
            raise DataError(f"{path}: {key!r} must be {expected}, got {info[key]!r}")
    return info


def _dataset_named_in(run_dir: Path) -> str | None:
    for name in ("config.json", "model.json"):
        try:
            dataset = json.loads((run_dir / name).read_text()).get("dataset")
        except (OSError, ValueError, AttributeError):
            continue
        if dataset:
            return dataset
    return None


def read_data_json(run_dir: str | Path) -> dict[str, Any]:
    """The run folder's ``data.json`` (validated), or for an older run the same dict built from its dataset."""
    run_dir = Path(run_dir)
    path = run_dir / DATA_FILE
    if path.exists():
        try:
            info = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise DataError(f"cannot read {path}: {type(exc).__name__}") from None
        return _check(info, path)
    dataset = _dataset_named_in(run_dir)
    if dataset is None:
        raise DataError(f"{run_dir} holds no {DATA_FILE} and names no dataset in config.json: the classes and "
                        f"the image transform of its model are unknown")
    d = dataset_info(dataset)
    return {"dataset": d.name, "classes": [str(i) for i in range(d.num_classes)], "in_channels": d.in_channels,
            "image_size": d.image_size, "mean": list(d.mean), "std": list(d.std)}


class _Convert(torch.nn.Module):
    """A PIL image in the mode the model takes: L for one channel, RGB for three."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, image):
        return image.convert(self.mode) if image.mode != self.mode else image


def eval_transform(info: dict[str, Any]) -> Callable:
    """PIL image → normalised float tensor [C, S, S]: convert to L or RGB, resize the short side to the image size,
    centre-crop it square, scale to [0, 1], normalise."""
    size = info["image_size"]
    return T.Compose([
        _Convert("L" if info["in_channels"] == 1 else "RGB"),
        T.Resize(size),
        T.CenterCrop(size),
        T.PILToTensor(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(info["mean"], info["std"]),
    ])
