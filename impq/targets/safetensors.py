"""The safetensors target: a transformers folder whose LLM is in a GPTQ, AWQ or compressed-tensors layout on an
integer grid (export/safetensors_layouts.py), checked in PyTorch on the weights unpacked from the written files."""

from __future__ import annotations

from pathlib import Path

from ..errors import ImpqError
from ..export.safetensors_layouts import LAYOUTS
from ..export.safetensors_model import read_dequantized_llm, write_safetensors_model
from ..quant.grids import Grid
from .base import Written

DEFAULT_GROUP_SIZE = 128          # int<bits> with one scale per 128 input columns


class SafetensorsTarget:
    name = "safetensors"
    releases_model = False        # the check loads the written weights into the same model

    def settings(self, cls, bits, type_name, layout, group_size, embeddings, vision, values):
        if type_name is not None:
            raise ImpqError(None, "--type names a GGUF grid; with --format safetensors use --layout and --group-size")
        if values.get("target_bpw") is not None or values.get("target_size"):
            raise ImpqError(None, "--target-bpw and --target-size need --format gguf (for safetensors, give "
                                  "compressed-tensors per-layer widths with --tensor-type REGEX=int8)")
        if embeddings not in (None, "f16") or vision not in (None, "f16"):
            raise ImpqError(None, "--format safetensors keeps the embeddings, output head and vision side at f16")
        settings = cls(bits=bits, format=self.name, type=None, layout=layout or "compressed-tensors",
                       group_size=group_size or DEFAULT_GROUP_SIZE, embeddings="f16", **values)
        self.grid(settings)                     # bits and layout are checked before any work
        if settings.tensor_types and not LAYOUTS[settings.layout].mixed_widths:
            raise ImpqError(None, f"--tensor-type: the {settings.layout} layout holds one bit width per "
                                  "checkpoint; compressed-tensors holds several")
        settings.overrides()
        return settings

    def grid(self, settings) -> Grid:
        if settings.layout not in LAYOUTS:
            raise ImpqError(None, f"--layout {settings.layout}: choose one of {', '.join(LAYOUTS)}")
        if settings.group_size < 8 or settings.group_size % 8:
            raise ImpqError(None, f"--group-size {settings.group_size}: a positive multiple of 8")
        return LAYOUTS[settings.layout].grid(settings.bits, settings.group_size)

    def override_grids(self, settings) -> dict[str, Grid]:
        """int2 .. int8 at the run's group size, as far as the layout holds them."""
        layout = LAYOUTS[settings.layout]
        return {f"int{bits}": layout.grid(bits, settings.group_size) for bits in layout.bits}

    def label(self, settings) -> str:
        return f"W{settings.bits}G{settings.group_size}"

    def stem(self, model_name: str, settings) -> str:
        return f"{model_name}-{self.label(settings)}-{settings.method}-{settings.layout}"

    def check_exportable(self, spec, grid: Grid) -> None:
        """transformers writes any model the layouts read: nothing to check before the work."""

    def write(self, lmm, stage: Path, stem: str, settings, result, digest: str, recorded: dict) -> Written:
        folder, bits = write_safetensors_model(lmm, stage / stem, LAYOUTS[settings.layout], result.tensors,
                                               recorded, digest)
        return Written({"safetensors": folder}, (folder / "model.safetensors").stat().st_size, 0, bits)

    def check(self, artifacts: dict, lmm, settings, model_dir, n_items: int, on_status) -> dict:
        from ..measure.vqa import TorchAnswerer
        from ..verify import check_against_reference

        on_status("verifying the written safetensors in PyTorch")
        # what the files hold, in place of the released weights
        lmm.llm.load_state_dict(read_dequantized_llm(artifacts["safetensors"]), strict=False, assign=True)
        return {"runtime": "pytorch (weights unpacked from the written files)",
                **check_against_reference(lambda: TorchAnswerer(lmm), model_dir, n_items)}


SAFETENSORS = SafetensorsTarget()
