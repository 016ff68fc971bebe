"""Visual question answering accuracy, through PyTorch (a checkpoint folder) or llama.cpp (a GGUF pair folder),
and next-token divergence from a full-precision reference on the same prompts.

Dataset format: JSONL, one item a line: {"image": path (relative to the JSONL's folder, or absolute),
"question": text, "answer": text, "type": optional text}. Answers are compared after lower-casing and
stripping spaces and final punctuation (exact match, as in GQA-style one-word evaluation).
"""

from __future__ import annotations

import string
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from ..errors import ImpqError
from ..datasets.jsonl import jsonl_image, read_jsonl
from ..models.preprocess import load_image
from .divergence import Divergence


@dataclass(frozen=True)
class VQAItem:
    image: Path
    question: str
    answer: str
    type: str
    line: int


def read_vqa_jsonl(path: str | Path) -> list[VQAItem]:
    path = Path(path)
    if not path.is_file():
        raise ImpqError(path, "dataset file not found")
    items = []
    for number, record in read_jsonl(path):
        for key in ("image", "question", "answer"):
            if not isinstance(record.get(key), str):
                raise ImpqError(path, f"line {number}: missing or non-text '{key}' field")
        image = jsonl_image(path, number, record["image"])
        items.append(VQAItem(image, record["question"], record["answer"], str(record.get("type", "all")), number))
    if not items:
        raise ImpqError(path, "empty dataset: no items")
    return items


def first_per_type(items: list[VQAItem], n: int) -> list[VQAItem]:
    """The first `n` items of each question type, grouped by type in order of first appearance."""
    groups: dict[str, list[VQAItem]] = defaultdict(list)
    for item in items:
        if len(groups[item.type]) < n:
            groups[item.type].append(item)
    return [item for group in groups.values() for item in group]


def normalize_answer(text: str) -> str:
    return text.strip().lower().strip(string.punctuation + " ")


class Answerer(Protocol):
    def answer(self, image: Image.Image, question: str, max_new_tokens: int) -> tuple[str, np.ndarray]:
        """(generated answer text, next-token logits after the prompt)."""


class TorchAnswerer:
    """The PyTorch reference forward of a checkpoint folder (or an LMM already built), optionally with a vision
    reduction (another input resolution, pooled tokens: see models/reduction.py)."""

    def __init__(self, model, image_size: int | None = None, token_reduction: str = "none"):
        from ..models.lmm import LMM      # torch is imported only for this backend
        from ..models.reduction import vision_reduction

        self.lmm = model if isinstance(model, LMM) else LMM.from_folder(model)
        self.reduction = vision_reduction(self.lmm.spec.vision, image_size, token_reduction)

    def answer(self, image, question, max_new_tokens):
        gen = self.lmm.generate(image, question, max_new_tokens, reduction=self.reduction)
        tokens = [t for t in gen.tokens if t != self.lmm.tokenizer.eos_id]
        return self.lmm.tokenizer.decode(tokens), gen.logits[0].numpy()


class GGUFAnswerer:
    """An emitted GGUF pair in llama.cpp."""

    def __init__(self, text_path: str | Path, mmproj_path: str | Path, n_threads: int | None = None,
                 gpu_layers: int = 0, template: str | None = None):
        from ..runtime.llamacpp import PairRunner

        self.runner = PairRunner(text_path, mmproj_path, n_threads=n_threads, gpu_layers=gpu_layers,
                                 template=template)

    def __enter__(self) -> "GGUFAnswerer":
        return self

    def __exit__(self, *exc) -> None:
        self.runner.close()

    @property
    def backend(self) -> dict:
        return self.runner.backend

    def answer(self, image, question, max_new_tokens):
        run = self.runner.run(image, question, max_new_tokens)
        tokens = [t for t in run.tokens if t != self.runner.eos_id]
        text = self.runner.llama.detokenize(tokens).decode("utf-8", errors="replace")
        return text, run.prompt_logits


def load_answerer(path: str | Path | None, image_size: int | None = None, n_threads: int | None = None,
                  text: Path | None = None, mmproj: Path | None = None, token_reduction: str = "none",
                  gpu_layers: int = 0, template: str | None = None) -> Answerer:
    """A checkpoint folder (config.json) runs in PyTorch; a GGUF pair (a folder holding one, or --text/--mmproj)
    runs in llama.cpp."""
    files_named = text is not None or mmproj is not None
    if not files_named and (Path(path) / "config.json").is_file():
        return TorchAnswerer(path, image_size, token_reduction)
    if not files_named and not (Path(path).is_dir() and any(Path(path).glob("*.gguf"))):
        raise ImpqError(path, "neither a checkpoint folder (config.json) nor a folder holding a GGUF pair")
    if image_size or token_reduction != "none":
        raise ImpqError(path or text or mmproj, "--image-size and --token-reduction apply to checkpoints; a GGUF "
                                                "pair's reduction is in its mmproj")
    from ..runtime.gguf_pair import resolve_pair
    return GGUFAnswerer(*resolve_pair(path, text, mmproj), n_threads=n_threads, gpu_layers=gpu_layers,
                        template=template)


@dataclass
class EvalReport:
    model: str
    dataset: str
    n_items: int
    accuracy: float
    per_type: dict
    mean_kld: float | None = None
    top1_agreement: float | None = None
    backend: dict | None = None                   # where llama.cpp ran (device, offloaded layers, repacking)
    items: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(answerer: Answerer, items: list[VQAItem], *, model: str, dataset: str,
             reference: Answerer | None = None, max_new_tokens: int = 6, on_item=None) -> EvalReport:
    per_type: dict[str, list[bool]] = defaultdict(list)
    divergence = Divergence() if reference is not None else None
    records = []
    for item in items:
        image = load_image(item.image)
        text, logits = answerer.answer(image, item.question, max_new_tokens)
        correct = normalize_answer(text) == normalize_answer(item.answer)
        per_type[item.type].append(correct)
        # the image by file name and JSONL line: no path of this machine in a results file
        records.append({"image": item.image.name, "line": item.line, "question": item.question, "answer": item.answer,
                        "prediction": normalize_answer(text), "correct": correct, "type": item.type})
        if divergence is not None:
            _, ref_logits = reference.answer(image, item.question, 1)
            same = divergence.add(ref_logits, logits)
            records[-1].update(kld=divergence.klds[-1], same_top1=same)     # shards of a sweep merge from these
        if on_item:
            on_item(records[-1])
    n_correct = sum(r["correct"] for r in records)
    return EvalReport(
        model, dataset, len(records), n_correct / len(records),
        {t: {"n": len(v), "accuracy": sum(v) / len(v)} for t, v in sorted(per_type.items())},
        divergence.mean_kld if divergence else None, divergence.top1_agreement if divergence else None,
        getattr(answerer, "backend", None), records)
