"""Export a checkpoint to the llama.cpp GGUF pair: `<name>-<TYPE>.gguf` and `mmproj-<name>-<TYPE>.gguf`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..fileio import artifact_set, ensure_writable_dir
from ..models.layouts import ModelSpec
from ..models.reduction import VisionReduction, vision_reduction
from .gguf_file import EXPORT_TYPES, canonical_type_name
from .gguf_mmproj import mmproj_tensors, write_mmproj_gguf
from .gguf_text import gguf_vocab, text_tensors, write_text_gguf


@dataclass
class ExportResult:
    text_path: Path
    mmproj_path: Path
    seconds: float
    source_digest: str


def pair_paths(out_dir: Path, spec: ModelSpec, type_name: str, reduction: VisionReduction | None = None
               ) -> tuple[Path, Path]:
    """`<name>-<TYPE>.gguf` and `mmproj-<name>-<TYPE>.gguf`; a reduced mmproj's name ends in its reduction
    (`-196px`, `-336px-pool2`)."""
    suffix = type_name.upper()
    reduced = reduction is not None and reduction != vision_reduction(spec.vision)
    return (out_dir / f"{spec.name}-{suffix}.gguf",
            out_dir / f"mmproj-{spec.name}-{suffix}{'-' + reduction.label if reduced else ''}.gguf")


def export_pair(spec: ModelSpec, out_dir: str | Path, type_name: str, mmproj_type: str, recipe: dict,
                on_tensor=None, reduction: VisionReduction | None = None) -> ExportResult:
    """The pair, carrying `recipe` (the export's recipe document, impq/recipe.py `export_recipe`) and the mmproj's
    reduction; `reduction` (models/reduction.py) writes the mmproj at a lower resolution or with pooled tokens."""
    type_name = canonical_type_name(type_name, EXPORT_TYPES, "--type")
    mmproj_type = canonical_type_name(mmproj_type, EXPORT_TYPES, "--mmproj-type")
    start = time.perf_counter()
    digest = spec.digest()
    settings = {**recipe, "vision_reduction": (reduction or vision_reduction(spec.vision)).label}
    text_path, mmproj_path = pair_paths(Path(out_dir), spec, type_name, reduction)
    text_qtype, mmproj_qtype = EXPORT_TYPES[type_name], EXPORT_TYPES[mmproj_type]
    # plan both files before writing either, so that a model that cannot be exported leaves nothing behind
    text_tensors(spec, text_qtype)
    gguf_vocab(spec.tokenizer, spec.text_config.vocab_size)
    mmproj_tensors(spec, mmproj_qtype, reduction)
    out_dir = ensure_writable_dir(Path(out_dir))
    # both files are written in a staging folder and moved in together: a pair is complete or absent
    with artifact_set(out_dir, mmproj_path.name) as stage:
        write_text_gguf(spec, stage / text_path.name, text_qtype, digest, settings, on_tensor)
        write_mmproj_gguf(spec, stage / mmproj_path.name, mmproj_qtype, digest, settings, on_tensor, reduction)
    return ExportResult(text_path, mmproj_path, time.perf_counter() - start, digest)
