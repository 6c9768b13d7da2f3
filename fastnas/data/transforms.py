"""Image transforms: DARTS's CIFAR recipe, cutout, and an image folder's training and evaluation transforms
(conversion of any PIL mode, high-bit-depth gray included, to the run's channels)."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torchvision.transforms import v2 as T


def transforms_for(info: Any, train: bool, cutout: int = 0) -> T.Compose:
    """DARTS's CIFAR transforms (random crop with padding 4, flip, normalise; cutout when asked); for the digits a
    1-pixel random shift (no flips: digits are not mirror-symmetric)."""
    steps = []
    if train:
        if info.name == "digits":
            steps.append(T.RandomCrop(info.image_size, padding=1))
        else:
            steps += [T.RandomCrop(info.image_size, padding=4), T.RandomHorizontalFlip()]
    steps.append(T.Normalize(info.mean, info.std))
    if train and cutout > 0:
        steps.append(Cutout(cutout))
    return T.Compose(steps)


class Cutout(torch.nn.Module):
    """Zero one random square of side ``size`` per image (DeVries and Taylor, 2017), as DARTS does."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        y0, y1 = max(0, cy - self.size // 2), min(h, cy + self.size // 2)
        x0, x1 = max(0, cx - self.size // 2), min(w, cx + self.size // 2)
        x = x.clone()
        x[..., y0:y1, x0:x1] = 0
        return x


_HIGH_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}  # PIL modes of 16-bit, 32-bit and float gray
_GRAY_MODES = {"1", "L", "LA"} | _HIGH_BIT_MODES  # PIL modes of single-channel images


def scaled_gray(image):
    """A high-bit-depth gray PIL image as a float (mode ``F``) image in [0, 1], divided by the value that stands
    for white: 65535 for 16-bit modes and for 32-bit integer images whose values fit in 16 bits (Pillow reads some
    16-bit files as mode ``I``), 2^31 - 1 for other 32-bit ones, 1 for float images. (PIL's own conversion to 8 bits
    clips instead: most of a 16-bit image would turn white.)"""
    import numpy as np
    from PIL import Image

    low, high = image.getextrema() if image.mode == "I" else (0, 0)
    white = 1.0 if image.mode == "F" else 65535.0 if low >= 0 and high <= 65535 else 2.0 ** 31 - 1
    pixels = np.asarray(image, dtype=np.float64) / white
    return Image.fromarray(np.clip(pixels, 0.0, 1.0).astype(np.float32), "F")


class ConvertMode:
    """A PIL image converted to ``mode`` (``"RGB"`` or ``"L"``); palette images through RGBA, so that a palette's
    transparency is read as PIL means it; high-bit-depth gray images scaled to [0, 1] by their range
    (:func:`scaled_gray`), kept at full precision (a float image) for ``"L"``. Tensors pass through unchanged."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, image):
        from PIL import Image

        if not isinstance(image, Image.Image) or image.mode == self.mode:
            return image
        if image.mode in _HIGH_BIT_MODES:
            image = scaled_gray(image)
            if self.mode == "L":
                return image
            image = image.point(lambda v: v * 255.0).convert("L")
        if image.mode in ("P", "PA"):
            image = image.convert("RGBA")
        return image.convert(self.mode)

    def __repr__(self) -> str:
        return f"ConvertMode({self.mode!r})"


def _folder_view(info: dict[str, Any], crop: list) -> list:
    """A folder image as the network sees it: converted to the run's channels, the short side resized to
    ``image_size``, ``crop``, then a float tensor in [0, 1]."""
    return [ConvertMode("L" if info["in_channels"] == 1 else "RGB"), T.Resize(int(info["image_size"])), *crop,
            T.ToImage(), T.ToDtype(torch.float32, scale=True)]


def eval_transform(info: dict[str, Any], normalise: bool = True) -> Callable:
    """The evaluation transform of a folder run, from its ``data.json`` dict: convert to RGB or L, resize the short
    side to ``image_size``, centre crop to ``image_size`` square, scale to [0, 1], normalise with the run's
    ``mean``/``std`` (unless ``normalise`` is false: the view the statistics are taken of). Takes PIL images."""
    steps = _folder_view(info, [T.CenterCrop(int(info["image_size"]))])
    return T.Compose(steps + [T.Normalize(list(info["mean"]), list(info["std"]))] if normalise else steps)


def train_transform(info: dict[str, Any], cutout: int = 0) -> Callable:
    """The training transform of a folder: DARTS's CIFAR recipe after resizing the short side to ``image_size``
    (random crop of that side with 1/8 of it as padding, horizontal flip), then normalisation and cutout if asked."""
    size = int(info["image_size"])
    steps = _folder_view(info, [T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip()])
    steps.append(T.Normalize(list(info["mean"]), list(info["std"])))
    return T.Compose(steps + [Cutout(cutout)] if cutout > 0 else steps)
