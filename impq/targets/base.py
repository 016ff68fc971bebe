"""The target protocol (impq.targets) and what a target's write returns. What a target is made of (a GGUF pair's
types, a safetensors layout, bits and group size) is the recipe's target section (impq/recipe.py), which also
answers which grid the decoder gets and which grids an override may name; a target here writes and checks it."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Protocol

from ..quant.grids import Grid


class Written(NamedTuple):
    artifacts: dict[str, Path]      # role -> file or folder (text_gguf + mmproj_gguf, or safetensors)
    llm_bytes: int                  # the file holding the LLM
    vision_bytes: int               # the file holding the vision side, where it is its own (a budget may count it)
    bits_quantized: float           # bits per weight of the quantized tensors


class Target(Protocol):
    # the layer loop may release the vision side and keep only the decoder (False: the check reuses the model)
    releases_model: bool

    def check_exportable(self, spec, grid: Grid) -> None: ...

    def write(self, lmm, stage: Path, stem: str, recipe, result, digest: str, recorded: dict) -> Written: ...

    def check(self, artifacts: dict, lmm, recipe, model_dir, n_items: int, on_status) -> dict: ...


class BudgetedTarget(Target, Protocol):
    """A target whose recipe section can take a size budget (`budgets`): it counts the bytes the budget spends."""

    def tensor_bytes(self, entry) -> int:
        """A decoder tensor's bytes at its planned grid."""

    def bytes_beside_decoder(self, spec, recipe, plan, digest: str, recorded: dict,
                             vision_types: dict[str, str] | None = None) -> int:
        """The artifact's bytes other than the decoder tensors' data, with `recorded` in it (a --target-size);
        `vision_types`: the vision side's tensors at these types instead of the plan's."""
