"""Test accuracy of a trained model: ``python -m fastnas.evaluate RUN_DIR``.

Reads the run folder's ``model.safetensors`` and ``model.json`` (written by ``python -m fastnas.train``), evaluates
on the test split of the dataset it was trained on, and prints the accuracy. For an image folder the test split is
its held-out part, read from the run's ``--data-dir`` (or another folder with the same classes) with the run's
``data.json`` (classes, size, normalisation).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from . import runtime
from .data import (FolderImages, dataset_info, eval_transform, load_split, loader_workers, open_folder,
                   read_data_json)
from .config import device_ok
from .errors import ConfigError, DataError, FastNASError
from .evalnet import EvalNet, load_model


def check_dataset(model: EvalNet, dataset: str | None) -> str:
    """The dataset to evaluate on: the one the model was trained on. Another one is refused (it has another number
    of channels, classes or image size, or other classes)."""
    trained = model.meta.get("dataset")
    if dataset is None:
        if trained is None:
            raise DataError("the model does not record its dataset: pass --dataset")
        return trained
    if "folder" in (dataset, trained):
        if dataset != trained:
            raise DataError(f"the model was trained on {trained!r}; it cannot be evaluated on {dataset!r}")
        return dataset
    info = dataset_info(dataset)
    if trained is not None and dataset != trained:
        raise DataError(f"the model was trained on {trained!r} ({model.in_channels} channel(s), {model.num_classes} "
                        f"classes, {model.input_size}x{model.input_size}); it cannot be evaluated on {dataset!r} "
                        f"({info.in_channels} channel(s), {info.num_classes} classes, "
                        f"{info.image_size}x{info.image_size})")
    if (info.in_channels, info.num_classes) != (model.in_channels, model.num_classes):
        raise DataError(f"{dataset!r} has {info.in_channels} channel(s) and {info.num_classes} classes, the model "
                        f"takes {model.in_channels} and gives {model.num_classes}")
    return dataset


def evaluate_run(run_dir, dataset: str | None = None, split: str = "test", data_dir=None, download: bool = False,
                 batch_size: int = 256, device: str = "auto", backend: str = "auto", amp: str = "off",
                 channels_last: bool = False, limit: int | None = None) -> runtime.Meter:
    dev = runtime.pick_device(device)
    runtime.select_backend(backend, dev)
    model = load_model(run_dir, dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    dataset = check_dataset(model, dataset)
    if dataset == "folder":
        data, workers = folder_split(run_dir, split, data_dir, limit), loader_workers("folder", None)
    else:
        data, workers = load_split(dataset, train=split == "train", data_dir=data_dir, download=download,
                                   limit=limit), 0
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=dev.type == "cuda")
    criterion = nn.CrossEntropyLoss()
    return runtime.evaluate(model, loader, lambda logits, y: criterion(logits.float(), y), dev, amp, channels_last)


def folder_split(run_dir, split: str, data_dir=None, limit: int | None = None) -> FolderImages:
    """The held-out (``test``) or training part of the image folder a run was trained on, as the run's
    ``data.json`` says to read it; ``data_dir`` replaces the run's ``--data-dir``."""
    info = read_data_json(run_dir)
    try:
        config = json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    data_dir = data_dir or config.get("data_dir")
    parts = open_folder(data_dir, skip_bad_images=bool(config.get("skip_bad_images")),
                        workers=loader_workers("folder", None), saved=info)
    samples = parts.val if split == "test" else parts.train
    return FolderImages(samples[:limit] if limit is not None else samples, eval_transform(info), parts.info)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastnas.evaluate",
                                description="Evaluate the model of a python -m fastnas.train run folder.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("run_dir", help="the run folder (holding model.safetensors and model.json)")
    add("--dataset", choices=["digits", "cifar10", "cifar100", "folder"],
        help="default: the dataset the model was trained on")
    add("--split", choices=["test", "train"], default="test")
    add("--data-dir", help="folder holding cifar-10-batches-py / cifar-100-python, or the image folder "
                           "(default for a folder: the run's own --data-dir)")
    add("--download", action="store_true", help="download CIFAR into --data-dir")
    add("--limit", type=int, help="evaluate only the first N images")
    add("--batch-size", type=int, default=256)
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add("--backend", default="auto", choices=["auto", "reference", "cpu", "cuda", "triton"], help="fused-op backend")
    add("--amp", default="off", choices=["off", "bf16", "fp16"], help="mixed precision")
    add("--channels-last", action="store_true", help="NHWC memory layout")
    return p


def check_options(args: argparse.Namespace) -> None:
    """The numeric and device options, checked as the training CLIs check theirs."""
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be an integer >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be an integer >= 1, got {args.limit}")
    if not device_ok(args.device):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_options(args)
        meter = evaluate_run(args.run_dir, args.dataset, args.split, args.data_dir, args.download, args.batch_size,
                             args.device, args.backend, args.amp, args.channels_last, args.limit)
    except FastNASError as exc:
        print(f"fastnas.evaluate: error: {exc}", file=sys.stderr)
        return 2
    if meter.n == 0:
        print(f"fastnas.evaluate: error: the {args.split} split has no images", file=sys.stderr)
        return 2
    print(f"{args.split} accuracy: {meter.accuracy:.2f}% ({meter.correct}/{meter.n} images), "
          f"loss {meter.avg_loss:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
