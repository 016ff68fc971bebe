"""The target protocol (impq.targets) and what a target's write returns."""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple, Protocol

from ..errors import ImpqError
from ..export.gguf_file import canonical_type_name
from ..quant.grids import Grid


class Written(NamedTuple):
    artifacts: dict[str, Path]      # role -> file or folder (text_gguf + mmproj_gguf, or safetensors)
    llm_bytes: int                  # the file holding the LLM
    vision_bytes: int               # the file holding the vision side, where it is its own (a budget may count it)
    bits_quantized: float           # bits per weight of the quantized tensors


class Target(Protocol):
    name: str
    # the layer loop may release the vision side and keep only the decoder (False: the check reuses the model)
    releases_model: bool

    def settings(self, cls, bits: int, type_name: str | None, layout: str | None, group_size: int | None,
                 embeddings: str | None, vision: str | None, values: dict): ...

    def grid(self, settings) -> Grid: ...

    def override_grids(self, settings) -> dict[str, Grid]: ...

    def label(self, settings) -> str: ...

    def stem(self, model_name: str, settings) -> str: ...

    def check_exportable(self, spec, grid: Grid) -> None: ...

    def write(self, lmm, stage: Path, stem: str, settings, result, digest: str, recorded: dict) -> Written: ...

    def check(self, artifacts: dict, lmm, settings, model_dir, n_items: int, on_status) -> dict: ...


def tensor_override(value: str, grids: dict) -> tuple[str, Grid]:
    """`REGEX=TYPE` (llama-quantize's --tensor-type) -> (pattern, grid); TYPE names one of `grids`."""
    pattern, sep, type_name = value.rpartition("=")
    if not sep or not pattern:
        raise ImpqError(None, f"--tensor-type {value!r}: write REGEX=TYPE, for example 'attn_v=q6_k'")
    try:
        re.compile(pattern)
    except re.error as err:
        raise ImpqError(None, f"--tensor-type {value!r}: not a regular expression ({err})") from None
    return pattern, grids[canonical_type_name(type_name, grids, "--tensor-type")]
