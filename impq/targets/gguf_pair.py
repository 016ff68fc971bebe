"""The GGUF pair target: a text GGUF (the LLM on its GGUF grids, embeddings and output head at --embeddings) and
an mmproj (vision tower and projector at --vision) that stock llama.cpp loads, checked in llama.cpp."""

from __future__ import annotations

from pathlib import Path

from ..export.gguf_file import QType, aligned, nbytes
from ..export.gguf_mmproj import mmproj_gguf_bytes, write_model_mmproj
from ..export.gguf_text import gguf_vocab, text_gguf_bytes, text_tensors, write_text_gguf
from ..models.lmm import DECODER
from ..quant.grids import Grid
from ..quant.plan import decoder_part
from .base import Written

class GGUFPairTarget:
    releases_model = True

    def check_exportable(self, spec, grid: Grid) -> None:
        """A model that cannot be exported fails before the long work."""
        gguf_vocab(spec.tokenizer, spec.text_config.vocab_size)
        text_tensors(spec, grid.qtype)

    def tensor_bytes(self, entry) -> int:
        """A decoder tensor's bytes at its planned grid (16 bits where it stays float), alignment padding included:
        what a budget counts."""
        return aligned(nbytes((entry.out_features, entry.in_features),
                              entry.grid.qtype if entry.grid is not None else QType.F16))

    def bytes_beside_decoder(self, spec, recipe, plan, digest: str, recorded: dict,
                             vision_types: dict[str, str] | None = None) -> int:
        """The text GGUF's bytes other than the decoder tensors' data, with `recorded` in its header: header and
        metadata, embedding, output head, norms and biases; and the whole mmproj where the budget includes the
        vision side."""
        pair = recipe.target
        decoder = decoder_part(plan)
        total = text_gguf_bytes(spec, pair.grid().qtype, digest, recorded, dict.fromkeys(decoder, QType.F16),
                                head_type=QType[pair.embeddings.upper()])
        if recipe.budget.includes_vision:
            types = _vision_types(plan) if vision_types is None else {n: QType[t.upper()] for n, t in
                                                                        vision_types.items()}
            total += mmproj_gguf_bytes(spec, QType[pair.vision.upper()], digest, recorded, types=types)
        return total - sum(aligned(nbytes((e.out_features, e.in_features), QType.F16)) for e in decoder.values())

    def write(self, lmm, stage: Path, stem: str, recipe, result, digest: str, recorded: dict) -> Written:
        spec, pair = lmm.spec, recipe.target
        text_path, mmproj_path = stage / f"{stem}.gguf", stage / f"mmproj-{stem}.gguf"
        state = {f"llm.{k}": v for k, v in lmm.llm.state_dict().items()}

        def source(name: str):
            """The model's tensor as quantization left it (AWQ folds its scales into norms), or, for one released
            to the meta device, the checkpoint's."""
            value = state[name]
            return spec.load(name) if value.is_meta else value

        write_text_gguf(spec, text_path, pair.grid().qtype, digest, recorded, quantized=result.tensors,
                        source=source, head_type=QType[pair.embeddings.upper()])
        write_model_mmproj(lmm, mmproj_path, QType[pair.vision.upper()], digest, recorded, result.tensors)
        decoder = [name for name in result.tensors if name.startswith(DECODER)]
        bits = 8 * sum(nbytes(spec.shape(name), result.tensors[name].grid.qtype) for name in decoder) / \
            sum(spec.numel(name) for name in decoder)
        return Written({"text_gguf": text_path, "mmproj_gguf": mmproj_path}, text_path.stat().st_size,
                       mmproj_path.stat().st_size, bits)

    def check(self, artifacts: dict, lmm, recipe, model_dir, n_items: int, on_status) -> dict:
        from ..measure.vqa import GGUFAnswerer
        from ..runtime.llamacpp import resolve_gpu_layers
        from ..verify import check_against_reference

        on_status("verifying in llama.cpp")
        # llama.cpp on the GPU where it can offload, unless the run was told to stay on the CPU
        gpu_layers = resolve_gpu_layers("cpu" if recipe.method.device == "cpu" else "auto")
        return {"runtime": "llama.cpp", **check_against_reference(
            lambda: GGUFAnswerer(artifacts["text_gguf"], artifacts["mmproj_gguf"], gpu_layers=gpu_layers),
            model_dir, n_items)}


def _vision_types(plan) -> dict:
    return {name: entry.grid.qtype for name, entry in plan.items()
            if not name.startswith(DECODER) and entry.grid is not None}


GGUF_PAIR = GGUFPairTarget()
