"""Regenerates impq/assets/images/sample-*.png: the bundled default images for `impq verify`.
Non-square sizes whose edges do not fall on a 14-pixel patch grid, with simple coloured shapes."""

import random
from pathlib import Path

from PIL import Image, ImageDraw

random.seed(7)
out = Path(__file__).resolve().parent.parent / "impq" / "assets" / "images"
for i, size in enumerate([(131, 97), (97, 131), (160, 160)]):
    img = Image.new("RGB", size, tuple(random.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(5):
        x0, y0 = random.randrange(size[0] - 20), random.randrange(size[1] - 20)
        x1, y1 = x0 + random.randrange(10, 40), y0 + random.randrange(10, 40)
        colour = tuple(random.randrange(256) for _ in range(3))
        [draw.ellipse, draw.rectangle][random.randrange(2)]((x0, y0, x1, y1), fill=colour)
    draw.text((size[0] // 3, size[1] // 2), "7A", fill=(255, 255, 255))
    img.save(out / f"sample-{i + 1}.png")
