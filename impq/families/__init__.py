"""The registry of model families: one record per text family (the LLM) and per vision family (the tower).
Adding a family is adding a module with its record and listing it here; `check_records` (run by the tests) says
what a record lacks."""

from __future__ import annotations

import dataclasses

from .clip import CLIP
from .llama import LLAMA
from .phi2 import PHI2
from .phi3 import PHI3
from .qwen2 import QWEN2
from .record import ScaleGroup, TestCheckpoint, TestTokens, TextFamily, VisionFamily
from .siglip import SIGLIP
from .templates import MEDIA_MARKER

TEXT_FAMILIES: dict[str, TextFamily] = {f.name: f for f in (PHI2, QWEN2, PHI3, LLAMA)}
VISION_FAMILIES: dict[str, VisionFamily] = {f.name: f for f in (SIGLIP, CLIP)}
# every hub tower whose missing config values a record supplies
KNOWN_TOWERS = {name: values for f in VISION_FAMILIES.values() for name, values in f.hub_towers.items()}

__all__ = ["TEXT_FAMILIES", "VISION_FAMILIES", "KNOWN_TOWERS", "MEDIA_MARKER", "ScaleGroup", "TestCheckpoint",
           "TestTokens", "TextFamily", "VisionFamily", "text_family_of_imp", "text_family_of_llava", "vision_family_of",
           "check_records"]


def text_family_of_imp(model_type: str | None) -> TextFamily | None:
    """The family of an Imp/Bunny checkpoint's config.json model_type, or None."""
    return next((f for f in TEXT_FAMILIES.values() if model_type in f.imp_model_types), None)


def text_family_of_llava(text_type: str | None) -> TextFamily | None:
    """The family of a llava-hf checkpoint's text_config.model_type, or None."""
    return next((f for f in TEXT_FAMILIES.values() if text_type in f.llava_text_types), None)


def vision_family_of(has_class_token: bool) -> VisionFamily:
    """The tower family a checkpoint's vision tensors show: a class embedding or not."""
    return next(f for f in VISION_FAMILIES.values() if f.has_class_token == has_class_token)


def check_records() -> list[str]:
    """What the records lack or repeat: empty where every record is complete and each answers for itself."""
    problems = []
    for records in (TEXT_FAMILIES, VISION_FAMILIES):
        for name, record in records.items():
            for item in dataclasses.fields(record):
                value = getattr(record, item.name)
                if value is None and item.name not in ("imp_architecture", "name_marker"):
                    problems.append(f"{name}: {item.name} is not set")
                if isinstance(value, str) and not value:
                    problems.append(f"{name}: {item.name} is empty")
    for f in TEXT_FAMILIES.values():
        if not (f.imp_model_types or f.llava_text_types):
            problems.append(f"{f.name}: no checkpoint model_type names it")
        if bool(f.imp_model_types) != (f.imp_architecture is not None):
            problems.append(f"{f.name}: imp_model_types and imp_architecture go together")
        if f.tokenizer_kind not in ("bpe", "sentencepiece") or f.norm not in ("layer", "rms"):
            problems.append(f"{f.name}: tokenizer_kind {f.tokenizer_kind!r} or norm {f.norm!r} is unknown")
        if "<image>" not in f.prompt_template or "{question}" not in f.prompt_template:
            problems.append(f"{f.name}: the prompt template lacks <image> or {{question}}")
        if not f.awq_groups:
            problems.append(f"{f.name}: no AWQ scale groups")
    for key in ("imp_model_types", "llava_text_types", "gguf_arch"):
        seen = [v for f in TEXT_FAMILIES.values() for v in
                (getattr(f, key) if isinstance(getattr(f, key), tuple) else (getattr(f, key),))]
        if len(seen) != len(set(seen)):
            problems.append(f"two text families share a {key}")
    checkpoints = [c for f in TEXT_FAMILIES.values() for c in f.test_checkpoints]
    if len({c.name for c in checkpoints}) != len(checkpoints) or any(c.vision not in VISION_FAMILIES
                                                                      for c in checkpoints):
        problems.append("test checkpoints: a name is repeated or a vision family is unknown")
    if len({f.has_class_token for f in VISION_FAMILIES.values()}) != len(VISION_FAMILIES):
        problems.append("two vision families cannot be told apart by their class token")
    return problems
