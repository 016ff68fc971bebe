"""The "shapes" visual question answering task: seeded scenes of coloured shapes, one-word answers.

Every object in a scene has a distinct shape and a distinct colour, so every question names one object.
Question types: colour, shape, count, existence (yes/no), position (left/right), size (small/large) and a
fine-detail one: the digit written inside a large shape, readable at the native resolution and hard at half
of it. Scenes and questions are a pure function of the seed.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..fileio import atomic_output, ensure_writable_dir

CANVAS = 224
SHAPES = ("circle", "square", "triangle", "diamond", "star")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
          "purple": (140, 60, 190), "orange": (245, 130, 20)}
QUESTION_TYPES = ("color", "shape", "count", "exist", "position", "size", "digit")
SMALL, LARGE = (9, 12), (26, 34)     # radius ranges in pixels on the 224-pixel canvas


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str          # "small" | "large"
    x: float
    y: float
    radius: float
    digit: str | None = None


def _polygon(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(x - r, y - r), (x + r, y - r), (x + r, y + r), (x - r, y + r)]
    if shape == "triangle":
        return [(x, y - r), (x + r, y + r * 0.85), (x - r, y + r * 0.85)]
    if shape == "diamond":
        return [(x, y - r), (x + r, y), (x, y + r), (x - r, y)]
    points = []                                     # five-pointed star
    for i in range(10):
        angle = math.pi / 2 + i * math.pi / 5
        radius = r if i % 2 == 0 else r * 0.45
        points.append((x + radius * math.cos(angle), y - radius * math.sin(angle)))
    return points


def make_scene(rng: random.Random) -> list[SceneObject]:
    n = rng.randint(2, 5)
    shapes = rng.sample(SHAPES, n)
    colors = rng.sample(list(COLORS), n)
    sizes = ["large"] + [rng.choice(("small", "large")) for _ in range(n - 1)]
    rng.shuffle(sizes)
    objects: list[SceneObject] = []
    # the digit goes on a large shape with room for it (stars and triangles are too thin)
    roomy = [i for i in range(n) if sizes[i] == "large" and shapes[i] in ("circle", "square", "diamond")]
    digit_owner = roomy[0] if roomy else None
    for i in range(n):
        lo, hi = LARGE if sizes[i] == "large" else SMALL
        for _ in range(200):                       # rejection sampling for non-overlapping placement
            r = rng.uniform(lo, hi)
            x, y = rng.uniform(r + 4, CANVAS - r - 4), rng.uniform(r + 4, CANVAS - r - 4)
            if abs(x - CANVAS / 2) < 14:
                continue                           # keep left/right unambiguous
            if all((x - o.x) ** 2 + (y - o.y) ** 2 > (r + o.radius + 6) ** 2 for o in objects):
                break
        digit = str(rng.randint(0, 9)) if i == digit_owner else None
        objects.append(SceneObject(shapes[i], colors[i], sizes[i], x, y, r, digit))
    return objects


_FONT = None


def render(objects: list[SceneObject], rng: random.Random) -> Image.Image:
    global _FONT
    if _FONT is None:
        # a glyph about 20 px tall on the canvas: about 15 px (one patch) at 168 px, 7 px at half of that
        _FONT = ImageFont.load_default(size=28)
    shade = rng.randint(225, 250)
    image = Image.new("RGB", (CANVAS, CANVAS), (shade, shade, shade - rng.randint(0, 15)))
    draw = ImageDraw.Draw(image)
    for obj in objects:
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((obj.x - obj.radius, obj.y - obj.radius, obj.x + obj.radius, obj.y + obj.radius), fill=fill)
        else:
            draw.polygon(_polygon(obj.shape, obj.x, obj.y, obj.radius), fill=fill)
        if obj.digit is not None:
            draw.text((obj.x, obj.y), obj.digit, fill=(255, 255, 255), font=_FONT, anchor="mm",
                      stroke_width=1, stroke_fill=(255, 255, 255))
    return image


def _describe(obj: SceneObject) -> str:
    return f"{obj.color} {obj.shape}"


def ask(objects: list[SceneObject], qtype: str, rng: random.Random) -> tuple[str, str] | None:
    """(question, answer) of the given type about the scene, or None when the scene cannot support it."""
    obj = rng.choice(objects)
    if qtype == "color":
        return f"What color is the {obj.shape}?", obj.color
    if qtype == "shape":
        return f"What shape is the {obj.color} object?", obj.shape
    if qtype == "count":
        return "How many shapes are there?", str(len(objects))
    if qtype == "exist":
        if rng.random() < 0.5:
            return f"Is there a {_describe(obj)}?", "yes"
        present = {(o.color, o.shape) for o in objects}
        color = rng.choice([c for c in COLORS])
        shape = rng.choice([s for s in SHAPES if (color, s) not in present])
        return f"Is there a {color} {shape}?", "no"
    if qtype == "position":
        return f"Is the {_describe(obj)} on the left or the right?", "left" if obj.x < CANVAS / 2 else "right"
    if qtype == "size":
        return f"Is the {_describe(obj)} small or large?", obj.size
    if qtype == "digit":
        owner = next((o for o in objects if o.digit is not None), None)
        if owner is None:
            return None
        return f"What number is written on the {owner.shape}?", owner.digit
    raise ValueError(qtype)


def patch_labels(objects: list[SceneObject], grid: int) -> list[list[int]]:
    """Per patch of a grid x grid tiling (row-major): [colour class, shape class, digit class, side] of the
    object under the patch centre (0 = background for colour, shape and side; 10 = no digit; side 1 = the
    object's centre is left of the middle, 2 = right). Training targets for an auxiliary loss on the vision
    tower, not part of the task."""
    mask = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(mask)
    for i, obj in enumerate(objects, start=1):
        if obj.shape == "circle":
            draw.ellipse((obj.x - obj.radius, obj.y - obj.radius, obj.x + obj.radius, obj.y + obj.radius), fill=i)
        else:
            draw.polygon(_polygon(obj.shape, obj.x, obj.y, obj.radius), fill=i)
    colors, labels = list(COLORS), []
    for row in range(grid):
        for col in range(grid):
            x, y = (col + 0.5) * CANVAS / grid, (row + 0.5) * CANVAS / grid
            index = mask.getpixel((int(x), int(y)))
            if index == 0:
                labels.append([0, 0, 10, 0])
                continue
            obj = objects[index - 1]
            near_digit = obj.digit is not None and (x - obj.x) ** 2 + (y - obj.y) ** 2 < (0.45 * obj.radius) ** 2
            labels.append([1 + colors.index(obj.color), 1 + SHAPES.index(obj.shape),
                           int(obj.digit) if near_digit else 10, 1 if obj.x < CANVAS / 2 else 2])
    return labels


def sample_scene(seed: int, n_questions: int = 1) -> tuple[Image.Image, list[dict], list[SceneObject]]:
    """One scene, `n_questions` questions of distinct types about it, and the scene's objects."""
    rng = random.Random(seed)
    objects = make_scene(rng)
    image = render(objects, rng)
    qas = []
    for qtype in rng.sample(QUESTION_TYPES, len(QUESTION_TYPES)):
        qa = ask(objects, qtype, rng)
        if qa:
            qas.append({"question": qa[0], "answer": qa[1], "type": qtype})
        if len(qas) == n_questions:
            break
    return image, qas, objects


def sample(seed: int, n_questions: int = 1) -> tuple[Image.Image, list[dict]]:
    """One scene and `n_questions` questions of distinct types about it."""
    image, qas, _ = sample_scene(seed, n_questions)
    return image, qas


# Split seeds: training uses seeds from 0 up; the shipped splits use disjoint high ranges.
SPLIT_SEEDS = {"calib": 10_000_000, "eval": 20_000_000}


def write_split(split: str, out: str | Path, n_items: int) -> Path:
    """Write `n_items` images (PNG) and `<split>.jsonl` with one question per image, balanced over types."""
    out = ensure_writable_dir(Path(out))
    (out / "images").mkdir(exist_ok=True)
    lines = []
    seed = SPLIT_SEEDS[split]
    for i in range(n_items):
        qtype = QUESTION_TYPES[i % len(QUESTION_TYPES)]
        while True:
            rng = random.Random(seed)
            objects = make_scene(rng)
            image = render(objects, rng)
            qa = ask(objects, qtype, rng)
            seed += 1
            if qa:
                break
        name = f"images/{split}-{i:04d}.png"
        image.save(out / name, optimize=True)
        lines.append(json.dumps({"image": name, "question": qa[0], "answer": qa[1], "type": qtype}))
    index = out / f"{split}.jsonl"
    with atomic_output(index) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return index
