"""A trained model's files in its run folder: ``model.safetensors`` (weights and batch-norm statistics) and
``model.json`` (the architecture, the dataset, the run's summary), and what ``data.json`` adds to a loaded model.

Kept apart from the network (:mod:`fastnas.evalnet`), which builds the model these files describe
(:func:`fastnas.load_model`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from .errors import CheckpointError, DataError

MODEL_FILE, MODEL_META = "model.safetensors", "model.json"


def save_model(model: nn.Module, run_dir: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write ``model.safetensors`` (weights and batch-norm statistics) and ``model.json`` (architecture, dataset,
    and whatever ``extra`` holds), each atomically."""
    from safetensors.torch import save_file

    from .atomic import replacing, write_text

    run_dir = Path(run_dir)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with replacing(run_dir / MODEL_FILE) as tmp:
        save_file(state, tmp, metadata={"format": "fastnas.EvalNet"})
    meta = {"arch": model.arch_config(), **(extra or {})}
    write_text(json.dumps(meta, indent=2) + "\n", run_dir / MODEL_META)


def read_model_meta(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / MODEL_META
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"no run folder at {run_dir}")
    if not path.exists():
        raise CheckpointError(f"no trained model in {run_dir}: {MODEL_META} is missing "
                              f"(written by python -m fastnas.train after its first epoch)")
    try:
        meta = json.loads(path.read_text())
        meta["arch"]["genotype"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is corrupt ({type(exc).__name__})") from None
    return meta


def load_weights(model: nn.Module, run_dir: str | Path) -> None:
    """Load ``model.safetensors`` into ``model`` (built from ``model.json``); a CheckpointError when it is
    unreadable or does not fit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(Path(run_dir) / MODEL_FILE), device="cpu")
    except (FileNotFoundError, SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {Path(run_dir) / MODEL_FILE}: {exc}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{MODEL_FILE} does not fit {MODEL_META}: {str(exc).splitlines()[0]}") from None


def attach_data(model: nn.Module, run_dir: Path) -> None:
    """``model.data_info``, ``model.classes`` and ``model.transform`` from the run folder's ``data.json`` (None
    when the folder has none); a DataError when its classes or channels do not fit the model."""
    from .data import DATA_JSON as DATA_FILE, eval_transform, read_data_json

    try:
        info = read_data_json(run_dir)
    except DataError:
        if (run_dir / DATA_FILE).exists():
            raise
        info = None
    if info is not None:
        if len(info["classes"]) != model.num_classes:
            raise DataError(f"{run_dir / DATA_FILE} lists {len(info['classes'])} classes, but the model's classifier "
                            f"has {model.num_classes} outputs")
        if info["in_channels"] != model.in_channels:
            raise DataError(f"{run_dir / DATA_FILE} says the images have {info['in_channels']} channel(s), but the "
                            f"model takes {model.in_channels}")
    # kept out of the module's children: the transform is not part of the network
    object.__setattr__(model, "data_info", info)
    object.__setattr__(model, "classes", None if info is None else list(info["classes"]))
    object.__setattr__(model, "transform", None if info is None else eval_transform(info))
