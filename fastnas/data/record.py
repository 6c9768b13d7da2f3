"""``data.json``: what a run's network takes (classes, channels, image side, normalisation), written as a run
starts, checked when it is read and when a run resumes."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..atomic import write_text
from ..errors import DataError
from .sources import DATASETS, DatasetInfo, dataset_info


DATA_JSON = "data.json"


def data_record(info: DatasetInfo) -> dict[str, Any]:
    """``data.json``'s content: dataset name, class names in label order, input channels, input side, and the
    per-channel mean and std applied after scaling pixels to [0, 1]; for an image folder the images per class in
    the training and the held-out part."""
    record = {"dataset": info.name, "classes": list(info.classes), "in_channels": info.in_channels,
              "image_size": info.image_size, "mean": [float(v) for v in info.mean],
              "std": [float(v) for v in info.std]}
    if info.images is not None:
        record["images"] = info.images
    return record


def data_json_text(info: DatasetInfo) -> str:
    return json.dumps(data_record(info), indent=2) + "\n"


def _check_record(record: Any, path: Path) -> dict[str, Any]:
    """``record`` when it has every key with a sensible value; a one-line DataError naming the first bad one."""
    if not isinstance(record, dict):
        raise DataError(f"{path} is not a JSON object")

    def per_channel(v: Any, low: float = -math.inf) -> bool:
        return isinstance(v, list) and len(v) == record.get("in_channels") and all(
            isinstance(x, (int, float)) and math.isfinite(x) and x > low for x in v)

    checks = [
        ("dataset", lambda v: isinstance(v, str) and v, "a dataset name"),
        ("classes", lambda v: isinstance(v, list) and v and all(isinstance(x, str) for x in v),
         "a non-empty list of names"),
        ("in_channels", lambda v: v in (1, 3), "1 or 3"),
        ("image_size", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
        ("mean", per_channel, "a list of one number per channel"),
        ("std", lambda v: per_channel(v, 0.0), "a list of one number > 0 per channel"),
    ]
    for key, ok, expected in checks:
        if key not in record:
            raise DataError(f"{path} is incomplete: no {key}")
        if not ok(record[key]):
            raise DataError(f"{path}: {key!r} must be {expected}, got {record[key]!r}")
    return record


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
    """The ``data.json`` of a search or retraining run folder, checked; for a run written before ``data.json``
    existed, the same record rebuilt from the built-in dataset its ``config.json`` (or ``model.json``) names."""
    run_dir = Path(run_dir)
    path = run_dir / DATA_JSON
    try:
        return _check_record(json.loads(path.read_text()), path)
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    dataset = _dataset_named_in(run_dir)
    if dataset not in DATASETS:
        raise DataError(f"{run_dir} holds no {DATA_JSON} (every search and retraining writes it when it starts): "
                        f"the classes and the image transform of its model are unknown")
    record = data_record(dataset_info(dataset))
    record["classes"] = record["classes"] or [str(i) for i in range(dataset_info(dataset).num_classes)]
    return record


def check_resumed_data(run_dir: str | Path, info: DatasetInfo) -> None:
    """On ``--resume``: the data must still be what the run started on (classes, channels, size); a run from
    before ``data.json`` existed gets one."""
    if not (Path(run_dir) / DATA_JSON).exists():
        write_text(data_json_text(info), Path(run_dir) / DATA_JSON)
        return
    saved, now = read_data_json(run_dir), data_record(info)
    changed = [k for k in ("dataset", "classes", "in_channels", "image_size") if saved[k] != now[k]]
    if changed:
        raise DataError(f"the data changed since the run started ({', '.join(changed)}: now {now[changed[0]]!r}, "
                        f"was {saved[changed[0]]!r})")
