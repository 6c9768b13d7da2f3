"""Classify images with a trained model from Python: :class:`Predictor` (``python -m fastnas.predict`` is its command
line, kept in its own module so that importing the package does not import the command).

The run folder is one that ``python -m fastnas.train`` wrote (``model.safetensors``, ``model.json``, ``data.json``).
Each image goes through the run's evaluation transform (:func:`fastnas.load_model`'s ``model.transform``); a folder
stands for the images in it (recursively, in name order).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch

from . import ops, runtime
from .config import device_ok
from .errors import CheckpointError, ConfigError, DataError
from .evalnet import load_model

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")


def read_image(path: str | Path):
    """The PIL image at ``path``; a DataError naming it when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise DataError(f"cannot read image {path}: no such file") from None
    except UnidentifiedImageError:
        raise DataError(f"cannot read image {path}: not an image file PIL can read") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


def expand_paths(items: Iterable[str | Path]) -> list[Path]:
    """Files as given; a folder as the image files under it, in name order. A folder without images is refused."""
    out: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"{path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            out += found
        else:
            out.append(path)
    return out


class Predictor:
    """A trained run's model with its classes and transform: ``predict(images_or_paths)`` gives, for each image, its
    top-k ``(class, probability)`` pairs, most probable first.

    Images may be paths (a folder stands for its images), PIL images, or tensors already transformed ([C, S, S]).
    """

    def __init__(self, run_dir: str | Path, device: str = "cpu", backend: str = "auto", top_k: int = 5,
                 batch_size: int = 64) -> None:
        if not device_ok(device):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
        if not (isinstance(top_k, int) and top_k >= 1):
            raise ConfigError(f"top_k must be an integer >= 1, got {top_k!r}")
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.device = runtime.pick_device(device)
        try:  # the backend is used within predict() only: the global selection is left alone
            self.backend = ops.resolve_backend(self.device, backend)
        except (ops.BackendUnavailable, ValueError) as exc:
            raise ConfigError(str(exc)) from None
        self.run_dir = run_dir
        self.model = load_model(run_dir, self.device)
        if self.model.transform is None:
            raise DataError(f"{run_dir} holds no data.json and names no known dataset: its classes and image "
                            f"transform are unknown")
        self.classes: list[str] = self.model.classes
        self.transform = self.model.transform
        self.top_k, self.batch_size = top_k, batch_size

    def _tensor(self, item: Any) -> torch.Tensor:
        if isinstance(item, torch.Tensor):
            return item
        if isinstance(item, (str, Path)):
            item = read_image(item)
        return self.transform(item)

    def _items(self, images_or_paths: Any) -> list:
        if isinstance(images_or_paths, (str, Path)) or not isinstance(images_or_paths, (list, tuple)):
            images_or_paths = [images_or_paths]
        out: list = []
        for item in images_or_paths:
            out += expand_paths([item]) if isinstance(item, (str, Path)) else [item]
        return out

    @torch.no_grad()
    def probabilities(self, images_or_paths: Any) -> torch.Tensor:
        """[N, classes] softmax probabilities, one row per image (folders expanded)."""
        items = self._items(images_or_paths)
        rows = []
        with ops.backend(self.backend):
            for start in range(0, len(items), self.batch_size):
                batch = torch.stack([self._tensor(x) for x in items[start:start + self.batch_size]])
                probs = torch.softmax(self.model(batch.to(self.device)).float(), dim=1).cpu()
                if not bool(torch.isfinite(probs).all()):
                    raise CheckpointError(f"the model in {self.run_dir} gives non-finite outputs (NaN or inf): "
                                          f"its weights are not usable; retrain it")
                rows.append(probs)
        return torch.cat(rows) if rows else torch.zeros(0, len(self.classes))

    def predict(self, images_or_paths: Any, top_k: int | None = None) -> list[list[tuple[str, float]]]:
        """For each image, its ``top_k`` (default: the predictor's) most probable (class, probability) pairs."""
        k = min(top_k or self.top_k, len(self.classes))
        probs = self.probabilities(images_or_paths)
        values, indices = probs.topk(k, dim=1)
        return [[(self.classes[i], float(p)) for p, i in zip(v.tolist(), idx.tolist())]
                for v, idx in zip(values, indices)]
