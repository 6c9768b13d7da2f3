"""Classify images with a trained model: ``python -m fastnas.predict RUN_DIR IMAGE_OR_FOLDER... [--top-k K]``.

Each image goes through the run's evaluation transform (:class:`fastnas.Predictor`); a folder stands for the images
in it (recursively, in name order). The top-k classes are printed with their probabilities, or with ``--json`` one
JSON document.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .errors import FastNASError
from .predictor import IMAGE_SUFFIXES, Predictor, expand_paths, read_image

__all__ = ["IMAGE_SUFFIXES", "Predictor", "build_parser", "expand_paths", "main", "read_image"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastnas.predict",
                                description="Print the most probable classes of images under a trained model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", help="a python -m fastnas.train run folder")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, or folders of them")
    p.add_argument("--top-k", type=int, default=5, help="classes to print per image")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "cpu", "cuda", "triton"],
                   help="fused-op backend")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        predictor = Predictor(args.run_dir, args.device, args.backend, args.top_k, args.batch_size)
        paths = expand_paths(args.images)
        results = predictor.predict(paths)
    except FastNASError as exc:
        print(f"fastnas.predict: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{"image": str(path), "top_k": [{"class": c, "probability": p} for c, p in result]}
                          for path, result in zip(paths, results)], indent=2))
    else:
        for path, result in zip(paths, results):
            print(f"{path}: " + ", ".join(f"{c} {p:.4f}" for c, p in result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
