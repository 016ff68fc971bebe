"""Export a checkpoint to the llama.cpp GGUF pair: `<name>-<TYPE>.gguf` and `mmproj-<name>-<TYPE>.gguf`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImpqError
from ..fileio import ensure_writable_dir, sha256_files
from ..models.layouts import ModelSpec
from .gguf_file import EXPORT_TYPES
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
    if type_name not in EXPORT_TYPES:
        raise ImpqError(None, f"unknown export type {type_name!r}; choose one of {', '.join(EXPORT_TYPES)}")
    mmproj_type = mmproj_type or type_name
    if mmproj_type not in EXPORT_TYPES:
        raise ImpqError(None, f"unknown mmproj type {mmproj_type!r}; choose one of {', '.join(EXPORT_TYPES)}")
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
    write_text_gguf(spec, text_path, text_qtype, digest, settings, on_tensor)
    try:
        write_mmproj_gguf(spec, mmproj_path, mmproj_qtype, digest, settings, on_tensor)
    except BaseException:
        text_path.unlink(missing_ok=True)      # a pair is complete or absent
        raise
    return ExportResult(text_path, mmproj_path, time.perf_counter() - start, digest)
