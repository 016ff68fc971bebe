"""The safetensors target: a transformers folder whose LLM is in a GPTQ, AWQ or compressed-tensors layout on an
integer grid (export/safetensors_layouts.py), checked in PyTorch on the weights unpacked from the written files."""

from __future__ import annotations

from pathlib import Path

from ..export.safetensors_layouts import LAYOUTS
from ..export.safetensors_model import read_dequantized_llm, write_safetensors_model
from ..quant.grids import Grid
from .base import Written


class SafetensorsTarget:
    releases_model = False        # the check loads the written weights into the same model

    def check_exportable(self, spec, grid: Grid) -> None:
        """transformers writes any model the layouts read: nothing to check before the work."""

    def write(self, lmm, stage: Path, stem: str, recipe, result, digest: str, recorded: dict) -> Written:
        folder, bits = write_safetensors_model(lmm, stage / stem, LAYOUTS[recipe.target.layout], result.tensors,
                                               recorded, digest, recipe.method.damp, recipe.method.act_order)
        return Written({"safetensors": folder}, (folder / "model.safetensors").stat().st_size, 0, bits)

    def check(self, artifacts: dict, lmm, recipe, model_dir, n_items: int, on_status) -> dict:
        from ..measure.vqa import TorchAnswerer
        from ..verify import check_against_reference

        on_status("verifying the written safetensors in PyTorch")
        # what the files hold, in place of the released weights
        lmm.llm.load_state_dict(read_dequantized_llm(artifacts["safetensors"]), strict=False, assign=True)
        return {"runtime": "pytorch (weights unpacked from the written files)",
                **check_against_reference(lambda: TorchAnswerer(lmm), model_dir, n_items)}


SAFETENSORS = SafetensorsTarget()
