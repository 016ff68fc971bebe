"""Calibration samples -> the LLM's input embeddings, with each image's projected vision tokens spliced in,
so that the LLM's layers are calibrated on the activations they will see on the phone.

Accepted files: JSONL with {"image": path or null, "prompt": text} (the prompt goes into the model's
template after the image), JSONL in the VQA format ({"image", "question", "answer"}: the answer is appended
after the template, as in training), or a plain text file (one text-only sample per paragraph). A file whose
first non-empty line is a JSON object is JSONL whatever its name; every line of it must be a usable sample.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ImpqError
from .datasets.jsonl import jsonl_image, looks_like_jsonl, read_jsonl
from .models.lmm import LMM
from .models.preprocess import load_image


@dataclass(frozen=True)
class CalibSample:
    image: Path | None
    text: str            # for image samples: the question or prompt inside the template; else raw text
    answer: str | None


def read_calibration(path: str | Path) -> list[CalibSample]:
    path = Path(path)
    if not path.is_file():
        raise ImpqError(path, "calibration file not found")
    samples: list[CalibSample] = []
    if looks_like_jsonl(path):
        for number, record in read_jsonl(path):
            text = record.get("prompt", record.get("question"))
            if not isinstance(text, str) or not text.strip():
                raise ImpqError(path, f"line {number}: no non-empty 'prompt' (or 'question') text")
            answer = record.get("answer")
            if answer is not None and not isinstance(answer, str):
                raise ImpqError(path, f"line {number}: 'answer' must be text")
            image = None if record.get("image") is None else jsonl_image(path, number, record["image"])
            samples.append(CalibSample(image, text, answer))
    else:
        raw = path.read_text(encoding="utf-8", errors="replace")
        samples = [CalibSample(None, para.strip(), None) for para in raw.split("\n\n") if para.strip()]
    if not samples:
        raise ImpqError(path, "no calibration samples (need JSONL lines with an image path or null and a prompt, "
                              "or paragraphs of text)")
    return samples


def calibration_digest(path: str | Path, samples: list[CalibSample] | None = None) -> str:
    """The calibration set's identity: the file's bytes and those of every image it names (by file name, never by
    folder, so that the same data gives the same digest anywhere). `samples`: the file's, when already read."""
    from .fileio import sha256_files

    samples = read_calibration(path) if samples is None else samples
    return sha256_files([Path(path), *sorted({s.image for s in samples if s.image is not None})])


def _drawn(samples: list[CalibSample], nsamples: int, seed: int) -> list[CalibSample]:
    """The first `nsamples` of a seeded shuffle: the calibration the LLM and the vision side both use."""
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    return [samples[index] for index in order[:nsamples]]


@torch.no_grad()
def calibration_pixels(lmm: LMM, samples: list[CalibSample], nsamples: int, seed: int = 0) -> list[torch.Tensor]:
    """The drawn calibration samples' images as the vision tower takes them ([1, 3, S, S] each): what a calibrated
    vision side is quantized on."""
    return [lmm.pixels(load_image(s.image)) for s in _drawn(samples, nsamples, seed) if s.image is not None]


@torch.no_grad()       # no autograd graph: learned rounding trains the first block on these, step after step
def calibration_embeddings(lmm: LMM, samples: list[CalibSample], nsamples: int, seqlen: int,
                           seed: int = 0) -> list[torch.Tensor]:
    """Up to `nsamples` sequences of [1, <= seqlen, hidden] input embeddings, drawn with a seeded shuffle."""
    embed = lmm.llm.get_input_embeddings()
    out = []
    for sample in _drawn(samples, nsamples, seed):
        if sample.image is None:
            ids = lmm.tokenizer.encode(sample.text)
            embeds = embed(torch.tensor(ids, device=embed.weight.device)).unsqueeze(0)
        else:
            embeds = lmm.prompt_embeddings(load_image(sample.image), sample.text)
            if sample.answer:
                answer = lmm.tokenizer.encode(f" {sample.answer}") + [lmm.tokenizer.eos_id]
                embeds = torch.cat([embeds, embed(torch.tensor(answer, device=embed.weight.device)).unsqueeze(0)], dim=1)
        out.append(embeds[:, :seqlen])
    return out
