"""Export a checkpoint to the llama.cpp GGUF pair: `<name>-<TYPE>.gguf` and `mmproj-<name>-<TYPE>.gguf`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..fileio import artifact_set, ensure_writable_dir, sha256_files
from ..models.layouts import ModelSpec
from .gguf_file import EXPORT_TYPES, canonical_type_name
from .gguf_mmproj import mmproj_tensors, write_mmproj_gguf
from .gguf_text import gguf_vocab, text_tensors, write_text_gguf


@dataclass
class ExportResult:
    text_path: Path
    mmproj_path: Path
    seconds: float
    source_digest: str


def pair_paths(out_dir: Path, name: str, type_name: str) -> tuple[Path, Path]:
    suffix = type_name.upper()
    return out_dir / f"{name}-{suffix}.gguf", out_dir / f"mmproj-{name}-{suffix}.gguf"


def export_pair(spec: ModelSpec, out_dir: str | Path, type_name: str = "f16", mmproj_type: str | None = None,
                on_tensor=None) -> ExportResult:
    type_name = canonical_type_name(type_name, EXPORT_TYPES, "--type")
    mmproj_type = canonical_type_name(mmproj_type or type_name, EXPORT_TYPES, "--mmproj-type")
    out_dir = ensure_writable_dir(Path(out_dir))
    start = time.perf_counter()
    digest = sha256_files([spec.folder / "config.json", *spec.checkpoint.files])
    settings = {"type": type_name, "mmproj_type": mmproj_type, "layout": spec.layout, "family": spec.family,
                "source": str(spec.folder.resolve())}
    text_path, mmproj_path = pair_paths(out_dir, spec.name, type_name)
    text_qtype, mmproj_qtype = EXPORT_TYPES[type_name], EXPORT_TYPES[mmproj_type]
    # plan both files before writing either, so that a model that cannot be exported leaves nothing behind
    text_tensors(spec, text_qtype)
    gguf_vocab(spec.tokenizer, spec.text_config.vocab_size)
    mmproj_tensors(spec, mmproj_qtype)
    # both files are written in a staging folder and moved in together: a pair is complete or absent
    with artifact_set(out_dir, mmproj_path.name) as stage:
        write_text_gguf(spec, stage / text_path.name, text_qtype, digest, settings, on_tensor)
        write_mmproj_gguf(spec, stage / mmproj_path.name, mmproj_qtype, digest, settings, on_tensor)
    return ExportResult(text_path, mmproj_path, time.perf_counter() - start, digest)
