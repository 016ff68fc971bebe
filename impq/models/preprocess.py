"""Image preprocessing (no torch here: the llama.cpp runner imports this module). The geometry (squash or resize+crop to the model's square size) is done here, in PIL,
for both the PyTorch reference and the llama.cpp runner: llama.cpp letterboxes non-square images where Imp
squashes, so impq hands mtmd an image already at the model's size (mtmd then only normalises)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ImpqError

# the most pixels an image may have (PIL's own default limit): a decompression bomb is refused before it is decoded.
# `impq --max-image-pixels N` sets it; PIL's check is off so that it is the one limit (PIL raises past twice it).
DEFAULT_MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3       # 89,478,485, as PIL computes its own
MAX_IMAGE_PIXELS = DEFAULT_MAX_IMAGE_PIXELS
Image.MAX_IMAGE_PIXELS = None
WIDE_INTEGER_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")    # 16-bit PNGs open as these


def set_max_image_pixels(limit: int) -> None:
    global MAX_IMAGE_PIXELS
    if limit < 1:
        raise ImpqError(None, f"--max-image-pixels {limit}: a positive number of pixels")
    MAX_IMAGE_PIXELS = limit


def load_image(path: str | Path) -> Image.Image:
    """RGB at 8 bits a channel; 16-bit images scaled down to 8 bits (PIL's convert would clip them at 255)."""
    try:
        with Image.open(path) as image:
            pixels = image.width * image.height
            if pixels > MAX_IMAGE_PIXELS:
                raise ImpqError(path, f"image of {image.width}x{image.height} = {pixels} pixels is over the limit of "
                                      f"{MAX_IMAGE_PIXELS} (raise it with impq --max-image-pixels N)")
            if image.mode in WIDE_INTEGER_MODES:
                wide = np.asarray(image, dtype=np.float64)
                return Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)).convert("RGB")
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
