"""The generated imp-v1-3b (Phi-2 2.7B + SigLIP so400m, random weights: speed only) as a Q4_0 text GGUF and an
F16 mmproj per vision reduction, written once under a work folder and shared by the speed benchmarks."""

from __future__ import annotations

from pathlib import Path

from impq.export.gguf_file import QType
from impq.export.gguf_mmproj import write_mmproj_gguf
from impq.export.gguf_text import write_text_gguf
from impq.models.layouts import ModelSpec, read_spec
from impq.models.reduction import vision_reduction
from impq.models.testing import make_model


def full_size_spec(work: Path) -> ModelSpec:
    folder = work / "imp-v1-3b-random"
    if not (folder / "model.safetensors.index.json").is_file():
        make_model("imp-phi2", folder, full_size=True)
    return read_spec(folder)


def full_size_pair(work: Path, spec: ModelSpec, image_size: int | None, token_reduction: str = "none"):
    """(text, mmproj, reduction) at one input size (None: native) and token reduction."""
    text = work / "reductions" / "imp-v1-3b-Q4_0.gguf"
    text.parent.mkdir(parents=True, exist_ok=True)
    if not text.is_file():
        write_text_gguf(spec, text, QType.Q4_0, "generated", {"type": "q4_0"})
    reduction = vision_reduction(spec.vision, image_size, token_reduction)
    mmproj = text.parent / f"mmproj-imp-v1-3b-F16-{reduction.label}.gguf"
    if not mmproj.is_file():
        write_mmproj_gguf(spec, mmproj, QType.F16, "generated", {}, reduction=reduction)
    return text, mmproj, reduction
