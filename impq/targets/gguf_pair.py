"""The GGUF pair target: a text GGUF (the LLM on its GGUF grids, embeddings and output head at --embeddings) and
an mmproj (vision tower and projector at --vision) that stock llama.cpp loads, checked in llama.cpp."""

from __future__ import annotations

from pathlib import Path

from ..errors import ImpqError
from ..export.gguf_file import QType, aligned, canonical_type_name, nbytes
from ..export.gguf_mmproj import mmproj_gguf_bytes, write_mmproj_gguf
from ..export.gguf_text import gguf_vocab, text_gguf_bytes, text_tensors, write_text_gguf
from ..quant.grids import GRIDS, Grid
from .base import Written, tensor_override

# --bits -> the GGUF grid used when --type is not given
DEFAULT_TYPE_FOR_BITS = {8: "q8_0", 6: "q6_k", 5: "q5_k", 4: "q4_k", 3: "q3_k", 2: "q2_k"}
UNQUANTIZED_TYPES = ("q8_0", "f16", "f32")   # GGUF choices for the token embedding, output head and vision side
SENSITIVITY_MODES = ("measured", "scaled")


class GGUFPairTarget:
    name = "gguf"
    releases_model = True

    def settings(self, cls, bits, type_name, layout, group_size, embeddings, vision, values):
        if layout is not None or group_size is not None:
            raise ImpqError(None, "--layout and --group-size apply to --format safetensors; GGUF types fix their blocks")
        for value in values.get("tensor_types") or []:
            tensor_override(value, GRIDS)      # each override is checked before any work
        for value in values.get("candidate_types") or []:
            canonical_type_name(value, GRIDS, "--candidate-types")
        if values.get("target_bpw") is not None and values.get("target_size") is not None:
            raise ImpqError(None, "--target-bpw and --target-size: give one budget")
        if values.get("sensitivity", "measured") not in SENSITIVITY_MODES:
            raise ImpqError(None, f"--sensitivity {values['sensitivity']}: choose one of {', '.join(SENSITIVITY_MODES)}")
        if values.get("budget_includes_vision") and values.get("target_size") is None:
            raise ImpqError(None, "--budget-includes-vision goes with --target-size")
        if values.get("target_size") is not None and values["target_size"] <= 0:
            raise ImpqError(None, f"--target-size {values['target_size']}: a positive number of bytes")
        if values.get("target_bpw") is not None and not 1.0 <= values["target_bpw"] <= 16.0:
            raise ImpqError(None, f"--target-bpw {values['target_bpw']}: choose a value between 1 and 16 bits")
        values.update({key: canonical_type_name(value, UNQUANTIZED_TYPES, f"--{key}")
                       for key, value in (("embeddings", embeddings), ("vision", vision)) if value is not None})
        if type_name is None:
            if bits not in DEFAULT_TYPE_FOR_BITS:
                raise ImpqError(None, f"--bits {bits}: the GGUF grids implemented hold "
                                      f"{', '.join(f'{b} ({t})' for b, t in DEFAULT_TYPE_FOR_BITS.items())} bits")
            type_name = DEFAULT_TYPE_FOR_BITS[bits]
        type_name = canonical_type_name(type_name, GRIDS, "--type")
        if GRIDS[type_name].bits != bits:
            raise ImpqError(None, f"--type {type_name} holds {GRIDS[type_name].bits} bits, not --bits {bits}")
        return cls(bits=bits, type=type_name, **values)

    def grid(self, settings) -> Grid:
        return GRIDS[settings.type]

    def override_grids(self, settings) -> dict[str, Grid]:
        return GRIDS

    def label(self, settings) -> str:
        if settings.target_bpw is not None:
            return f"MIX{settings.target_bpw:g}BPW"        # a per-group mix: no one type names the file
        if settings.target_size is not None:
            return f"MIX{settings.target_size / 1e6:.4g}MB"
        return settings.type.upper()

    def stem(self, model_name: str, settings) -> str:
        return f"{model_name}-{self.label(settings)}-{settings.method}"

    def check_exportable(self, spec, grid: Grid) -> None:
        """A model that cannot be exported fails before the long work."""
        gguf_vocab(spec.tokenizer, spec.text_config.vocab_size)
        text_tensors(spec, grid.qtype)

    def tensor_bytes(self, entry) -> int:
        """A decoder tensor's bytes at its planned grid (16 bits where it stays float), alignment padding included:
        what a budget counts."""
        return aligned(nbytes((entry.out_features, entry.in_features),
                              entry.grid.qtype if entry.grid is not None else QType.F16))

    def bytes_beside_decoder(self, spec, settings, plan, digest: str, recorded: dict) -> int:
        """The text GGUF's bytes other than the decoder tensors' data, with `recorded` in its header: header and
        metadata, embedding, output head, norms and biases; and the whole mmproj where the budget includes the
        vision side."""
        total = text_gguf_bytes(spec, self.grid(settings).qtype, digest, recorded, dict.fromkeys(plan, QType.F16),
                                head_type=QType[settings.embeddings.upper()])
        if settings.budget_includes_vision:
            total += mmproj_gguf_bytes(spec, QType[settings.vision.upper()], digest, recorded)
        return total - sum(aligned(nbytes((e.out_features, e.in_features), QType.F16)) for e in plan.values())

    def write(self, lmm, stage: Path, stem: str, settings, result, digest: str, recorded: dict) -> Written:
        spec = lmm.spec
        text_path, mmproj_path = stage / f"{stem}.gguf", stage / f"mmproj-{stem}.gguf"
        state = {f"llm.{k}": v for k, v in lmm.llm.state_dict().items()}

        def source(name: str):
            """The model's tensor as quantization left it (AWQ folds its scales into norms), or, for one released
            to the meta device, the checkpoint's."""
            value = state[name]
            return spec.load(name) if value.is_meta else value

        write_text_gguf(spec, text_path, GRIDS[settings.type].qtype, digest, recorded, quantized=result.tensors,
                        source=source, head_type=QType[settings.embeddings.upper()])
        write_mmproj_gguf(spec, mmproj_path, QType[settings.vision.upper()], digest, recorded)
        bits = 8 * sum(nbytes(spec.shape(name), q.grid.qtype) for name, q in result.tensors.items()) / \
            sum(spec.numel(name) for name in result.tensors)
        return Written({"text_gguf": text_path, "mmproj_gguf": mmproj_path}, text_path.stat().st_size,
                       mmproj_path.stat().st_size, bits)

    def check(self, artifacts: dict, lmm, settings, model_dir, n_items: int, on_status) -> dict:
        from ..measure.vqa import GGUFAnswerer
        from ..runtime.llamacpp import resolve_gpu_layers
        from ..verify import check_against_reference

        on_status("verifying in llama.cpp")
        # llama.cpp on the GPU where it can offload, unless the run was told to stay on the CPU
        gpu_layers = resolve_gpu_layers("cpu" if settings.device == "cpu" else "auto")
        return {"runtime": "llama.cpp", **check_against_reference(
            lambda: GGUFAnswerer(artifacts["text_gguf"], artifacts["mmproj_gguf"], gpu_layers=gpu_layers),
            model_dir, n_items)}


GGUF_PAIR = GGUFPairTarget()
