"""`impq package`: a phone bundle, the pair a user copies to the phone, its recipe, and PHONE.md with the commands
and app settings to run it and the phone estimate with its band.

The source is an artifact folder (one GGUF pair, from `impq quantize` or `impq export`), or a sweep's folder: its
recommendation under its budgets, or with `max_accuracy_drop` the point with the shortest phone time to first
token within that many accuracy points of the original F16 pair (a sweep without budgets recommends the
original, which tells a user nothing).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import ImpqError
from .fileio import atomic_output
from .recipe import sha256_file
from .measure.phone import DEVICES, ModelCost
from .measure.phone_fit import PHONE_FIT, vision_kernels
from .runtime.gguf_pair import read_gguf_header, resolve_pair

PROMPT_TEXT_TOKENS = 40
ANSWER_TOKENS = 256                 # room for the answer in the context the bundle asks for


@dataclass(frozen=True)
class Chosen:
    text: Path
    mmproj: Path
    why: str                        # how the pair was chosen, for PHONE.md
    flash_attn: str                 # as measured (a sweep's point), else llama.cpp's default for phones: off
    accuracy: float | None = None   # a sweep point's, against its original's
    original_accuracy: float | None = None


def choose(source: Path, max_accuracy_drop: float | None = None) -> Chosen:
    """The pair a source names: an artifact folder's, or a sweep's chosen point (see the module's docstring)."""
    source = Path(source)
    if not source.is_dir():
        raise ImpqError(source, "not an artifact or sweep folder (impq quantize, impq export or impq "
                                "sweep-resolution output)")
    if (source / "sweep.json").is_file():
        return _from_sweep(source, max_accuracy_drop)
    if max_accuracy_drop is not None:
        raise ImpqError(source, "--max-accuracy-drop chooses among a sweep's points: this folder is not a sweep")
    if not any(source.glob("*.gguf")):
        raise ImpqError(source, "not an artifact or sweep folder: it holds no GGUF pair and no sweep.json")
    text, mmproj = resolve_pair(source)
    if "impq.settings" not in read_gguf_header(text, ("impq.settings",)).fields:
        raise ImpqError(text, "not an impq artifact: it carries no impq recipe (impq.settings)")
    return Chosen(text, mmproj, f"the artifact in {source.name}", "off")


def _from_sweep(source: Path, max_accuracy_drop: float | None) -> Chosen:
    record = json.loads((source / "sweep.json").read_text())
    rows = [r for r in record["points"] if r["runtime"] == "llama.cpp"]
    original = next((r for r in record["points"] if r.get("original")), None)
    if max_accuracy_drop is not None:
        if max_accuracy_drop < 0:
            raise ImpqError(None, f"--max-accuracy-drop {max_accuracy_drop}: accuracy points, 0 or more")
        if original is None:
            raise ImpqError(source, "the sweep has no original point (F16 at the native resolution) to measure a "
                                    "drop from")
        within = [r for r in rows if r["accuracy"] >= original["accuracy"] - max_accuracy_drop / 100]
        row = min(within, key=lambda r: (r["phone_ttft_s"], -r["accuracy"]), default=None)
        why = (f"the sweep's point with the shortest phone time to first token within {max_accuracy_drop:g} "
               f"accuracy points of the original F16 pair ({original['accuracy']:.1%})")
    else:
        settings = record["settings"]
        if settings.get("budget_ttft_ms") is None and settings.get("budget_size_mb") is None:
            raise ImpqError(source, "the sweep ran without budgets, so its recommendation is the original F16 pair: "
                                    "give --max-accuracy-drop P to take the fastest point within P accuracy points")
        row = record.get("recommended")
        why = "the sweep's recommendation under its budgets"
    if row is None:
        raise ImpqError(source, "no llama.cpp point of the sweep meets the condition")
    row = next(r for r in record["points"] if r["key"] == row["key"])
    if "text_gguf" not in row:
        raise ImpqError(source, "the sweep's rows do not name their files (written by an older impq): run the sweep "
                                "again to package from it")
    text, mmproj = source / row["text_gguf"], source / row["mmproj_gguf"]
    for path in (text, mmproj):
        if not path.is_file():
            raise ImpqError(path, "the sweep's file is not there (was the sweep run with --shared-dir? package "
                                  "from a folder holding its files)")
    return Chosen(text, mmproj, f"{why}: {row['type']} at {row['image_size']} px, token reduction "
                                f"{row['token_reduction']}", row["flash_attn"] or "off", row["accuracy"],
                  original and original["accuracy"])


def package(source: Path, out: Path, device_profile: str = "snapdragon-8-gen-3",
            max_accuracy_drop: float | None = None) -> dict:
    """Write the bundle to `out` (whole or not at all): the pair, recipe.yaml, bundle.json and PHONE.md."""
    if device_profile not in DEVICES:
        raise ImpqError(None, f"--device-profile {device_profile}: choose one of {', '.join(DEVICES)}")
    chosen = choose(source, max_accuracy_drop)
    device = DEVICES[device_profile]
    header = read_gguf_header(chosen.mmproj, ("clip.vision.image_size", "clip.vision.patch_size",
                                              "clip.projector_type", "impq.image_resize"))
    image_size = int(header.fields["clip.vision.image_size"])
    cost = ModelCost.from_gguf_pair(chosen.text, chosen.mmproj)
    estimate = PHONE_FIT.estimate(cost, device, PROMPT_TEXT_TOKENS)
    settings = read_gguf_header(chosen.text, ("impq.settings",)).fields["impq.settings"]
    # the fastest cores only: llama.cpp's threads spread over a phone's efficiency cores slow it down
    threads = sum(c.cores for c in device.clusters if c.flop_per_cycle >= device.clusters[0].flop_per_cycle // 2)
    context = 1 << (cost.llm_image_tokens + PROMPT_TEXT_TOKENS + ANSWER_TOKENS - 1).bit_length()
    bundle = {"text": chosen.text.name, "mmproj": chosen.mmproj.name, "chosen": chosen.why,
              "image_size": image_size, "image_tokens": cost.llm_image_tokens,
              "image_resize": header.fields.get("impq.image_resize", "squash"), "threads": threads,
              "context": context, "flash_attn": chosen.flash_attn, "device_profile": device.name,
              "phone_estimate": estimate, "band": PHONE_FIT.band, "vision_kernels": vision_kernels(cost),
              "sha256": {p.name: sha256_file(p) for p in (chosen.text, chosen.mmproj)},
              "bytes": {p.name: p.stat().st_size for p in (chosen.text, chosen.mmproj)},
              "accuracy": chosen.accuracy, "original_accuracy": chosen.original_accuracy}
    with atomic_output(Path(out)) as tmp:
        tmp.mkdir(parents=True)
        shutil.copy(chosen.text, tmp / chosen.text.name)
        shutil.copy(chosen.mmproj, tmp / chosen.mmproj.name)
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(json.loads(settings), sort_keys=False))
        (tmp / "bundle.json").write_text(json.dumps(bundle, indent=2) + "\n")
        (tmp / "PHONE.md").write_text(phone_md(bundle))
    return {**bundle, "out": str(out)}


def _range(figure: dict, digits: int = 1) -> str:
    return f"{figure['value']:.{digits}f} ({figure['low']:.{digits}f}-{figure['high']:.{digits}f})"


def phone_md(bundle: dict) -> str:
    text, mmproj, size = bundle["text"], bundle["mmproj"], bundle["image_size"]
    estimate = bundle["phone_estimate"]
    fa = "on" if bundle["flash_attn"] == "on" else "off"
    megabytes = sum(bundle["bytes"].values()) / 1e6
    resize = ("squashed to a square (the model was trained so; llama.cpp letterboxes a non-square image instead, "
              "so squash it first)" if bundle["image_resize"] == "squash" else "cropped to a square")
    return f"""# Running this model on a phone

Chosen: {bundle['chosen']}. Files ({megabytes:.1f} MB in all), copy both to the phone:

| file | bytes | sha256 |
|---|---|---|
""" + "".join(f"| {name} | {bundle['bytes'][name]} | {digest} |\n" for name, digest in bundle["sha256"].items()) + f"""
The mmproj takes {size}x{size} px images ({bundle['image_tokens']} image tokens), {resize}:
`magick photo.jpg -resize {size}x{size}! image.png` (ImageMagick; in Termux: `pkg install imagemagick`).

## llama.cpp in Termux (Android)

```sh
pkg install git cmake clang
git clone https://github.com/ggml-org/llama.cpp && cd llama.cpp
cmake -B build && cmake --build build --config Release -j --target llama-mtmd-cli
./build/bin/llama-mtmd-cli -m {text} --mmproj {mmproj} --image image.png \\
    -p "What is in the image?" --jinja -t {bundle['threads']} -fa {fa} -c {bundle['context']} -n 64
```

`-t {bundle['threads']}`: the {bundle['device_profile']}'s performance cores (threads on its efficiency cores
slow llama.cpp down). `-fa {fa}`: flash attention as the sweep measured it (or llama.cpp's CPU default where
nothing was measured). `--jinja`: the chat template the text GGUF carries. `-c {bundle['context']}`: the image's
{bundle['image_tokens']} tokens, the question and room for the answer.

## An app built on llama.rn (PocketPal-style)

| setting | value |
|---|---|
| model | {text} |
| multimodal projector (mmproj) | {mmproj} |
| context size | {bundle['context']} |
| threads | {bundle['threads']} |
| flash attention | {fa} |
| GPU layers | 0 (the estimate below is for the CPU) |

## What to expect on a {bundle['device_profile']}

A roofline estimate fitted on published llama.cpp phone measurements, each figure with its leave-one-out
range (impq's `bench/results/phone_fit.md`); not a measurement on a phone.

| figure | estimate (range) |
|---|---|
| image encode, s | {_range(estimate['image_encode_s'])} |
| time to first token, s | {_range(estimate['ttft_s'])} |
| prompt, tokens/s | {_range(estimate['prefill_tokens_per_s'])} |
| decode, tokens/s | {_range(estimate['decode_tokens_per_s'])} |

Image encoding follows the mmproj's tensor types: {bundle['vision_kernels']}.

The recipe that made these files is in recipe.yaml (also in the text GGUF's `impq.settings`).
"""
