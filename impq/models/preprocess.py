"""Image preprocessing (no torch here: the llama.cpp runner imports this module). The geometry (squash or resize+crop to the model's square size) is done here, in PIL,
for both the PyTorch reference and the llama.cpp runner: llama.cpp letterboxes non-square images where Imp
squashes, so impq hands mtmd an image already at the model's size (mtmd then only normalises)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ImpqError


def load_image(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise ImpqError(path, f"unreadable image ({err.__class__.__name__}: {err})") from None


def to_model_square(image: Image.Image, size: int, resize: str) -> Image.Image:
    """The model's square input: "squash" (Imp, bicubic, no crop or padding) or "shortest_crop" (CLIP)."""
    if resize == "squash":
        return image.resize((size, size), Image.Resampling.BICUBIC)
    # CLIP processors: shortest side to `size`, then a centre crop
    scale = size / min(image.size)
    resized = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                           Image.Resampling.BICUBIC)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def normalized(square: Image.Image, mean, std) -> np.ndarray:
    """[3, S, S] float32: scaled to [0, 1] and normalised, exactly as mtmd normalises."""
    array = np.asarray(square, dtype=np.float32) / 255.0
    array = (array - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))
