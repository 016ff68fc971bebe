"""What the two GGUF exporters share: tensor type choice, encoding, provenance, and a streaming writer that
holds one tensor in memory at a time and renames the file into place only when it is complete."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch

from .. import __version__
from ..errors import ImpqError
from ..fileio import atomic_output

QType = gguf.GGMLQuantizationType
EXPORT_TYPES = {"f32": QType.F32, "f16": QType.F16, "q8_0": QType.Q8_0, "q4_0": QType.Q4_0}
FILE_TYPES = {QType.F32: gguf.LlamaFileType.ALL_F32, QType.F16: gguf.LlamaFileType.MOSTLY_F16,
              QType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, QType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
              QType.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1, QType.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
              QType.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1, QType.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_S,
              QType.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_S, QType.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K,
              QType.Q3_K: gguf.LlamaFileType.MOSTLY_Q3_K_S, QType.Q2_K: gguf.LlamaFileType.MOSTLY_Q2_K}


# llama-quantize's names for its fixed per-tensor mixes; the _S mixes are closest to impq's uniform K-quant types
_LLAMA_CPP_MIX = re.compile(r"(q[2-6]_k)_(xs|s|m|l)")


def canonical_type_name(value: str, choices, option: str) -> str:
    """A type name as users write it (Q4_0, q4_k, Q4_K_M: any case) -> impq's lower-case name among `choices`.
    llama.cpp's mix names get the uniform equivalent (the _S mixes) or a pointer to the options that mix types."""
    name = value.strip().lower()
    if name in choices:
        return name
    mix = _LLAMA_CPP_MIX.fullmatch(name)
    if mix and mix.group(2) == "s" and mix.group(1) in choices:
        return mix.group(1)
    if mix:
        raise ImpqError(None, f"{option} {value}: llama.cpp's {value.upper()} is a fixed mix of types; "
                              f"impq quantize writes one grid for the LLM's decoder layers (--type {mix.group(1)}, the "
                              f"{mix.group(1).upper()}_S file type), with --embeddings and --vision for the embedding/"
                              "output head and the mmproj; per-tensor mixes under a size budget are not in this version")
    raise ImpqError(None, f"{option} {value}: choose one of {', '.join(choices)}")


@dataclass
class PlannedTensor:
    name: str                                 # GGUF tensor name
    shape: tuple[int, ...]                    # PyTorch (row-major) shape of the values
    qtype: QType
    produce: Callable[[], torch.Tensor]       # loads and transforms the values when it is this tensor's turn
    packed: Callable[[], np.ndarray] | None = None   # the block bytes, when an impq algorithm already chose them
    canonical: str = ""                       # the tensor's canonical name in impq (see models/layouts.py)


def fits_blocks(shape: tuple[int, ...], qtype: QType) -> bool:
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return shape[-1] % block == 0


def matrix_type(shape: tuple[int, ...], requested: QType) -> QType:
    """The requested type where the row length fits its blocks; F16 otherwise (e.g. SigLIP's 4304-wide MLP)."""
    if requested in (QType.F32, QType.F16) or fits_blocks(shape, requested):
        return requested
    return QType.F16


def encode(values: torch.Tensor, qtype: QType) -> np.ndarray:
    array = values.detach().to(torch.float32).cpu().numpy()
    if qtype == QType.F32:
        return array
    if qtype == QType.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, qtype)


def nbytes(shape: tuple[int, ...], qtype: QType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def add_provenance(writer: gguf.GGUFWriter, source_digest: str, settings: dict) -> None:
    writer.add_string("impq.version", __version__)
    writer.add_string("impq.source_digest", source_digest)
    writer.add_string("impq.settings", json.dumps(settings, sort_keys=True))


def _start(path: Path, arch: str, add_metadata: Callable[[gguf.GGUFWriter], None],
           tensors: list[PlannedTensor]) -> gguf.GGUFWriter:
    """A writer at `path` with the header, metadata and tensor index written: the data comes next."""
    writer = gguf.GGUFWriter(path, arch)
    add_metadata(writer)
    for t in tensors:
        if t.qtype in (QType.F32, QType.F16):
            dtype = np.float32 if t.qtype == QType.F32 else np.float16
            writer.add_tensor_info(t.name, t.shape, np.dtype(dtype), nbytes(t.shape, t.qtype))
        else:
            byte_shape = (*t.shape[:-1], nbytes((t.shape[-1],), t.qtype))
            writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), nbytes(t.shape, t.qtype), t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    return writer


def aligned(size: int) -> int:
    """A tensor's bytes in the file: its data padded to GGUF's alignment."""
    return -(-size // gguf.GGUF_DEFAULT_ALIGNMENT) * gguf.GGUF_DEFAULT_ALIGNMENT


def gguf_bytes(arch: str, add_metadata: Callable[[gguf.GGUFWriter], None], tensors: list[PlannedTensor]) -> int:
    """The exact size write_gguf would give these tensors: the header written for real, the data counted."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="impq-size-") as scratch:
        writer = _start(Path(scratch) / "header.gguf", arch, add_metadata, tensors)
        writer.close()
        header = (Path(scratch) / "header.gguf").stat().st_size
    # the writer pads the header to the alignment when the first tensor's data comes, and each tensor after it
    return aligned(header) + sum(aligned(nbytes(t.shape, t.qtype)) for t in tensors)


def write_gguf(path: Path, arch: str, add_metadata: Callable[[gguf.GGUFWriter], None],
               tensors: list[PlannedTensor], on_tensor: Callable[[str], None] | None = None) -> Path:
    """Stream a GGUF file: header and tensor index first, then each tensor's data as it is produced."""
    with atomic_output(path) as tmp:
        writer = _start(tmp, arch, add_metadata, tensors)
        for t in tensors:
            if t.packed is not None:
                data = t.packed()
                if data.nbytes != nbytes(t.shape, t.qtype):
                    raise AssertionError(f"{t.name}: packed {data.nbytes} bytes, planned {nbytes(t.shape, t.qtype)}")
                writer.write_tensor_data(data)
            else:
                values = t.produce()
                if tuple(values.shape) != tuple(t.shape):
                    raise AssertionError(f"{t.name}: produced {tuple(values.shape)}, planned {t.shape}")
                writer.write_tensor_data(encode(values, t.qtype))
            if on_tensor:
                on_tensor(t.name)
        writer.close()
    return path
