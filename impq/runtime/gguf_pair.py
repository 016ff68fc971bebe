"""Finding and checking the two files of a GGUF pair (text model + mmproj) before llama.cpp opens them.

Any pair can be named: impq's own (`<name>.gguf` beside `mmproj-<name>.gguf`) or a published repository's (several
text quantizations beside one `mmproj-<model>-f16.gguf`). Files are told apart by their header (an mmproj's
architecture is "clip"), not by their names. Every file is read with gguf-py's reader first, and every tensor's
data must lie inside the file: llama.cpp on a damaged file can crash the process instead of reporting it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf

from ..errors import ImpqError
from ..families import TEXT_FAMILIES

MMPROJ_ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ]      # llama.cpp names every mmproj "clip"
# the text architectures impq exports and runs: its families' (impq.families)
TEXT_ARCHS = tuple(family.gguf_arch_name for family in TEXT_FAMILIES.values())
FLOAT_TYPES = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16)


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    arch: str
    fields: dict                 # key -> value, for the few keys impq reads
    quantized: bool = False      # some tensor is stored in a block-quantized type (not F32/F16/BF16)

    @property
    def is_mmproj(self) -> bool:
        return self.arch == MMPROJ_ARCH


def read_gguf_header(path: Path, keys: tuple[str, ...] = ()) -> GGUFHeader:
    """gguf-py's reader over the whole file: header, metadata, tensor index, and each tensor's byte range."""
    if not path.is_file():
        raise ImpqError(path, "GGUF file not found")
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # the reader raises ValueError, struct.error, IndexError... on damaged files
        raise ImpqError(path, f"not a readable GGUF file ({type(err).__name__}: {err})") from None
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise ImpqError(path, f"truncated GGUF file: tensor '{tensor.name}' ends at byte {end} but the file has "
                                  f"{size} bytes")
    arch_field = reader.fields.get("general.architecture")
    if arch_field is None:
        raise ImpqError(path, "GGUF file has no general.architecture")
    fields = {key: reader.fields[key].contents() for key in keys if key in reader.fields}
    quantized = any(t.tensor_type not in FLOAT_TYPES for t in reader.tensors)
    return GGUFHeader(path, str(arch_field.contents()), fields, quantized)


def require_text_arch(header: GGUFHeader, what: str) -> GGUFHeader:
    """impq's PyTorch reference and phone cost model cover the decoder architectures it exports, no others."""
    if header.arch not in TEXT_ARCHS:
        raise ImpqError(header.path, f"architecture {header.arch!r}: impq {what} only {', '.join(TEXT_ARCHS)} text "
                                     f"models")
    return header


def _check_role(header: GGUFHeader, want_mmproj: bool) -> Path:
    if header.is_mmproj != want_mmproj:
        what = "an mmproj (architecture clip)" if header.is_mmproj else f"a text model (architecture {header.arch})"
        raise ImpqError(header.path, f"is {what}; expected {'an mmproj' if want_mmproj else 'a text model'}")
    return header.path


def resolve_pair(folder: Path | None = None, text: Path | None = None,
                 mmproj: Path | None = None) -> tuple[Path, Path]:
    """(text GGUF, mmproj GGUF): the files named by --text/--mmproj, completed from `folder` (or, for the side not
    named, from the named file's folder), which must then hold exactly one candidate for that side."""
    if text is not None:
        text = _check_role(read_gguf_header(Path(text)), want_mmproj=False)
    if mmproj is not None:
        mmproj = _check_role(read_gguf_header(Path(mmproj)), want_mmproj=True)
    if text is not None and mmproj is not None:
        return text, mmproj
    folder = Path(folder) if folder is not None else (text or mmproj).parent if (text or mmproj) else None
    if folder is None:
        raise ImpqError(None, "name a folder holding one GGUF pair, or the files with --text and --mmproj")
    if not folder.is_dir():
        raise ImpqError(folder, "GGUF pair folder does not exist")
    headers = [read_gguf_header(p) for p in sorted(folder.glob("*.gguf"))]
    texts = [text] if text is not None else [h.path for h in headers if not h.is_mmproj]
    mmprojs = [mmproj] if mmproj is not None else [h.path for h in headers if h.is_mmproj]
    for found, flag in ((texts, "--text"), (mmprojs, "--mmproj")):
        if not found:
            raise ImpqError(folder, f"no {'text model' if flag == '--text' else 'mmproj'} GGUF in this folder "
                                    f"(found {len(headers)} GGUF files); name it with {flag} FILE")
        if len(found) > 1:
            raise ImpqError(folder, f"{len(found)} {'text model' if flag == '--text' else 'mmproj'} GGUF files: "
                                    f"{', '.join(p.name for p in found)}; choose one with {flag} FILE")
    return texts[0], mmprojs[0]
