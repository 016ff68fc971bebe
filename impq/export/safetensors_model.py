"""A quantized model as safetensors: the LLM as a transformers causal-LM folder whose linear layers are stored in a
GPTQ, AWQ or compressed-tensors layout (config.json with `quantization_config`, model.safetensors, tokenizer),
plus the vision side that Imp adds: `vision.safetensors` (vision tower and projector, F16, impq's canonical
names) and `impq.json` (image token, prompt template, vision tower configuration).

transformers has no Imp model class and its LLaVA class cannot hold Phi-2's output-head bias, so the LLM is
the transformers model itself (PhiForCausalLM, Qwen2ForCausalLM, Phi3ForCausalLM, LlamaForCausalLM) and the
vision side travels beside it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import ImpqError
from ..fileio import atomic_output
from ..models.layouts import ModelSpec
from ..models.lmm import LMM
from ..quant.grids import IntegerGrid
from .safetensors_layouts import LAYOUTS, Layout

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "generation_config.json")


def write_safetensors_model(lmm: LMM, out: Path, layout: Layout, quantized: dict, settings: dict,
                            digest: str, damp: float, act_order: bool) -> tuple[Path, float]:
    """Write the folder `out` (atomically: a temporary folder renamed when complete). `quantized`: canonical
    name -> QuantizedTensor for the LLM's linear weights, each on its planned grid; `lmm` holds everything else.
    `settings`: the run's recipe (impq/recipe.py), recorded in impq.json; `damp` and `act_order`: the GPTQ options
    the layout's quantization_config states.
    Returns the folder and the stored bits per quantized weight (codes, scales, zero points, g_idx)."""
    spec: ModelSpec = lmm.spec
    llm_state = lmm.llm.state_dict()
    tied = getattr(spec.text_config, "tie_word_embeddings", False)
    tensors, not_quantized = {}, []
    grids: dict[IntegerGrid, list[str]] = {}
    packed_bits, quantized_weights = 0, 0
    for name, value in llm_state.items():
        if tied and name == "lm_head.weight":
            continue
        canonical = f"llm.{name}"
        if canonical in quantized:
            q = quantized[canonical]
            module = name.removesuffix(".weight")
            packed = layout.pack(q.codes, q.params, q.grid)
            grids.setdefault(q.grid, []).append(module)
            tensors.update({f"{module}.{suffix}": t for suffix, t in packed.items()})
            packed_bits += 8 * sum(t.numel() * t.element_size() for t in packed.values())
            quantized_weights += q.codes.numel()
            continue
        if name.endswith(".weight") and value.ndim == 2 and name != "model.embed_tokens.weight":
            not_quantized.append(name.removesuffix(".weight"))
        tensors[name] = value.to(torch.float16).contiguous()
    config = spec.text_config.to_dict()
    config.update(architectures=[type(lmm.llm).__name__], torch_dtype="float16", dtype="float16",
                  quantization_config=layout.config(grids, not_quantized, damp, act_order))
    vision = {f"vision.vision_model.{k}": v for k, v in lmm.vision.state_dict().items()}
    vision.update({f"projector.{k}": v for k, v in lmm.projector.state_dict().items()})
    vision = {k: v for k, v in vision.items() if k in spec.tensors}    # what the checkpoint holds, nothing made up
    manifest = {"impq_format": 1, "source_model": spec.name, "source_digest": digest, "layout": layout.name,
                "grids": sorted(g.name for g in grids), "image_token": spec.image_token,
                "image_token_index": spec.image_token_index,
                "prompt_template": spec.prompt_template, "vision_kind": spec.vision.kind,
                "vision_config": spec.vision.config.to_dict(), "projector": "mlp2x_gelu",
                "image_tokens": spec.vision.n_tokens, "recipe": settings}
    with atomic_output(out) as tmp:
        tmp.mkdir()
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        save_file({k: v.to(torch.float16).contiguous() for k, v in vision.items()}, tmp / "vision.safetensors",
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        (tmp / "impq.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        for name in TOKENIZER_FILES:
            if (spec.folder / name).is_file():
                shutil.copy2(spec.folder / name, tmp / name)
    return out, packed_bits / max(1, quantized_weights)


def read_dequantized_llm(folder: Path) -> dict[str, torch.Tensor]:
    """The LLM state dict a loader of this folder computes: every packed linear unpacked through its layout and
    dequantized on impq's grid (float32), the other tensors as stored."""
    config_path = Path(folder) / "config.json"
    try:
        quantization_config = json.loads(config_path.read_text())["quantization_config"]
        layout = LAYOUTS[quantization_config.get("quant_method")]
    except (OSError, KeyError, ValueError) as err:
        raise ImpqError(config_path, f"not a quantized safetensors model impq can read ({err})") from None
    stored = load_file(Path(folder) / "model.safetensors")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    state = {}
    for name, value in stored.items():
        module, _, suffix = name.rpartition(".")
        if suffix in layout.stored:
            modules.setdefault(module, {})[suffix] = value
        else:
            state[name] = value.float()
    try:
        grids = layout.grids_of(quantization_config, list(modules))
    except (KeyError, ImpqError) as err:
        raise ImpqError(config_path, f"quantization_config does not state every layer's grid ({err})") from None
    for module, tensors in modules.items():
        if module not in grids:
            raise ImpqError(config_path, f"no config group holds the packed layer {module!r}")
        codes, params = layout.unpack(tensors, grids[module])
        state[f"{module}.weight"] = grids[module].values(codes, params)
    return state
