"""Checkpoint layouts as tables: how config.json and tensor names of each supported layout map onto
transformers' own modules. Nothing here runs checkpoint code (no `trust_remote_code`).

Every tensor gets a *canonical* name: `llm.<name in the transformers CausalLM>`, `vision.<name in the
transformers vision model>` or `projector.<0|2>.<weight|bias>`. The PyTorch reference loads canonical names
into modules; the GGUF exporter maps canonical names through gguf's `TensorNameMap`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from ..errors import ImpqError
from ..fileio import sha256_files
from ..families import (KNOWN_TOWERS, TEXT_FAMILIES, VISION_FAMILIES, TextFamily, VisionFamily, text_family_of_imp,
                        text_family_of_llava, vision_family_of)
from .checkpoint import SafetensorsCheckpoint, read_json
from .tokenizer import TextTokenizer

SUPPORTED_LAYOUTS = (
    "imp-phi2-msft (Imp Phi-2, phi-msft names: transformer.h.N.mixer.Wqkv, transformer.mm_projector)",
    "imp-llava (Imp with Phi-2, Qwen2 or Phi-3 backbone, LLaVA names: model.layers, model.mm_projector)",
    "llava-hf (transformers LlavaForConditionalGeneration, Llama backbone, CLIP or SigLIP tower)",
)
LAYOUT_NAMES = ("imp-phi2-msft", "imp-llava", "llava-hf")

@dataclass(frozen=True)
class Source:
    """Where a canonical tensor's values live: a checkpoint key, optionally a row range of a fused tensor."""
    key: str
    rows: tuple[int, int] | None = None

    def shape(self, checkpoint: SafetensorsCheckpoint) -> tuple[int, ...]:
        shape = checkpoint.shape(self.key)
        return shape if self.rows is None else (self.rows[1] - self.rows[0], *shape[1:])


@dataclass
class VisionSpec:
    kind: str                      # the vision family's name (impq.families)
    config: PretrainedConfig       # num_hidden_layers = the layers that actually run
    stored_layers: int
    full_depth: int
    image_size: int
    patch_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    resize: str                    # "squash" (Imp) or "shortest_crop" (CLIP processors)
    has_class_token: bool

    @property
    def family(self) -> VisionFamily:
        return VISION_FAMILIES[self.kind]

    @property
    def n_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class ModelSpec:
    folder: Path
    name: str
    layout: str
    family: str                    # the text family's name (impq.families)
    text_config: PretrainedConfig
    vision: VisionSpec
    image_token: str
    image_token_index: int
    tensors: dict[str, Source]
    checkpoint: SafetensorsCheckpoint
    tokenizer: TextTokenizer = field(repr=False, default=None)
    raw_config: dict = field(repr=False, default_factory=dict)

    @property
    def text_family(self) -> TextFamily:
        return TEXT_FAMILIES[self.family]

    @property
    def prompt_template(self) -> str:
        return self.text_family.prompt_template

    @property
    def chat_template(self) -> str:
        return self.text_family.chat_template

    def prompt(self, question: str) -> str:
        return self.prompt_template.replace("{question}", question)

    def digest(self) -> str:
        """sha256 of config.json and the weight files: what names the checkpoint in caches and artifacts."""
        return sha256_files([self.folder / "config.json", *self.checkpoint.files])

    def shape(self, canonical: str) -> tuple[int, ...]:
        return self.tensors[canonical].shape(self.checkpoint)

    def numel(self, canonical: str) -> int:
        return math.prod(self.shape(canonical))

    def load(self, canonical: str) -> torch.Tensor:
        src = self.tensors[canonical]
        return self.checkpoint.load(src.key, src.rows)


# ---- tensor-name rules: (source regex, canonical template(s)); a list of templates splits fused rows evenly.
_VISION = r"(vision_model\.(?:embeddings|encoder|pre_layrnorm)\..*)"
# transformers 5 saves a LLaVA model's SigLIP tower without the `vision_model.` level that hub checkpoints have
_VISION_BARE = r"((?:embeddings|encoder|pre_layrnorm)\..*)"
_RULES = {
    "imp-phi2-msft": [
        (r"transformer\.embd\.wte\.weight", "llm.model.embed_tokens.weight"),
        (r"transformer\.h\.(\d+)\.ln\.(weight|bias)", r"llm.model.layers.\1.input_layernorm.\2"),
        (r"transformer\.h\.(\d+)\.mixer\.Wqkv\.(weight|bias)", [r"llm.model.layers.\1.self_attn.q_proj.\2",
                                                                 r"llm.model.layers.\1.self_attn.k_proj.\2",
                                                                 r"llm.model.layers.\1.self_attn.v_proj.\2"]),
        (r"transformer\.h\.(\d+)\.mixer\.out_proj\.(weight|bias)", r"llm.model.layers.\1.self_attn.dense.\2"),
        (r"transformer\.h\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"llm.model.layers.\1.mlp.\2.\3"),
        (r"lm_head\.ln\.(weight|bias)", r"llm.model.final_layernorm.\1"),
        (r"lm_head\.linear\.(weight|bias)", r"llm.lm_head.\1"),
        (r"transformer\.mm_projector\.([02])\.(weight|bias)", r"projector.\1.\2"),
        (r"transformer\.vision_tower\.vision_tower\." + _VISION, r"vision.\1"),
    ],
    "imp-llava": [
        (r"model\.mm_projector\.([02])\.(weight|bias)", r"projector.\1.\2"),
        (r"model\.vision_tower\.vision_tower\." + _VISION, r"vision.\1"),
        (r"model\.((?:embed_tokens|layers|norm|final_layernorm)\..*)", r"llm.model.\1"),
        (r"lm_head\.(weight|bias)", r"llm.lm_head.\1"),
    ],
    "llava-hf": [
        # transformers >= 4.52 names, then the older ones
        (r"model\.language_model\.(.*)", r"llm.model.\1"),
        (r"model\.vision_tower\." + _VISION, r"vision.\1"),
        (r"model\.vision_tower\." + _VISION_BARE, r"vision.vision_model.\1"),
        (r"model\.multi_modal_projector\.linear_1\.(weight|bias)", r"projector.0.\1"),
        (r"model\.multi_modal_projector\.linear_2\.(weight|bias)", r"projector.2.\1"),
        (r"lm_head\.(weight|bias)", r"llm.lm_head.\1"),
        (r"language_model\.model\.(.*)", r"llm.model.\1"),
        (r"language_model\.lm_head\.(weight|bias)", r"llm.lm_head.\1"),
        (r"vision_tower\." + _VISION, r"vision.\1"),
        (r"vision_tower\." + _VISION_BARE, r"vision.vision_model.\1"),
        (r"multi_modal_projector\.linear_1\.(weight|bias)", r"projector.0.\1"),
        (r"multi_modal_projector\.linear_2\.(weight|bias)", r"projector.2.\1"),
    ],
}
# Tensors a layout may hold that the model never uses (Imp drops SigLIP's post-layernorm and pooling head).
_UNUSED = re.compile(r".*((vision_model|vision_tower)\.(post_layernorm|head)\.|rotary_emb\.inv_freq)")


def detect_layout(config: dict, keys: list[str], config_path: Path) -> str:
    model_type = config.get("model_type")
    if model_type == "llava" or "LlavaForConditionalGeneration" in config.get("architectures", []):
        return "llava-hf"
    if text_family_of_imp(model_type) is not None:
        if any(k.startswith("transformer.h.") for k in keys):
            return "imp-phi2-msft"
        return "imp-llava"
    raise ImpqError(config_path, f"unknown architecture (model_type={model_type!r}, architectures="
                                 f"{config.get('architectures')}); supported layouts: " + "; ".join(SUPPORTED_LAYOUTS))


def _llava_default_text_type() -> str:
    from transformers import LlavaConfig

    return LlavaConfig().text_config.model_type


def _family(layout: str, config: dict) -> TextFamily:
    if layout == "llava-hf":
        text_config = config.get("text_config", {})
        # transformers' LlavaConfig builds its default text model where config.json names none
        text_type = text_config["model_type"] if "model_type" in text_config else _llava_default_text_type()
        family = text_family_of_llava(text_type)
        if family is None:
            names = sorted(t for f in TEXT_FAMILIES.values() for t in f.llava_text_types)
            raise ImpqError(None, f"llava-hf layout with a {text_type!r} text model is not supported "
                                  f"({', '.join(names)} only)")
        return family
    return text_family_of_imp(config["model_type"])


_CONFIG_DROP = {"model_type", "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype",
                "text_config", "vision_config"}


def _text_config(layout: str, family: TextFamily, config: dict) -> PretrainedConfig:
    if layout == "llava-hf":                   # the text model's config is nested
        values = dict(config.get("text_config", {}))
    else:
        values = {k: v for k, v in config.items() if k not in _CONFIG_DROP and not k.startswith("mm_")}
    values = family.config_values({k: v for k, v in values.items() if k not in _CONFIG_DROP})
    values.setdefault("pad_token_id", None)
    return family.config_class(**values)


def _vision_spec(layout: str, config: dict, ckpt: SafetensorsCheckpoint, tensors: dict[str, Source],
                 config_path: Path, preprocessor: dict) -> VisionSpec:
    def shape(name: str) -> tuple[int, ...]:
        if name not in tensors:
            raise ImpqError(config_path.parent, f"checkpoint has no vision tensor for '{name}'")
        return ckpt.shape(tensors[name].key)

    patch = shape("vision.vision_model.embeddings.patch_embedding.weight")
    hidden, patch_size = patch[0], patch[-1]
    n_positions = shape("vision.vision_model.embeddings.position_embedding.weight")[0]
    has_class = "vision.vision_model.embeddings.class_embedding" in tensors
    grid = math.isqrt(n_positions - (1 if has_class else 0))
    image_size = grid * patch_size
    stored = len({m.group(1) for name in tensors
                  if (m := re.match(r"vision\.vision_model\.encoder\.layers\.(\d+)\.", name))})
    intermediate = shape("vision.vision_model.encoder.layers.0.mlp.fc1.weight")[0]

    family = vision_family_of(has_class)
    given = dict(config.get("vision_config", {}))
    if layout == "llava-hf":
        select_layer = config.get("vision_feature_layer", -2)
        tower = {}
    else:
        select_layer = config.get("mm_vision_select_layer", -2)
        tower = KNOWN_TOWERS.get(config.get("mm_vision_tower", ""), {})
    if not isinstance(select_layer, int) or select_layer >= 0:
        raise ImpqError(config_path, f"vision select layer {select_layer!r} is not supported (a negative index)")
    heads = given.get("num_attention_heads", tower.get("num_attention_heads"))
    if heads is None:
        raise ImpqError(config_path, f"cannot tell the vision tower's head count for mm_vision_tower="
                                     f"{config.get('mm_vision_tower')!r}: add a vision_config with num_attention_heads")
    # Imp deletes the tower's layers after the selected one before saving (imp_llava clip_encoder.py), so a
    # checkpoint holds either the full tower or exactly the layers that run. Without a stated full depth,
    # the stored layers are taken to be the ones that run.
    full_depth = given.get("num_hidden_layers", tower.get("num_hidden_layers", stored - select_layer - 1))
    run_layers = full_depth + select_layer + 1
    if not 0 < run_layers <= stored:
        raise ImpqError(config_path.parent, f"vision tower stores {stored} layers but select layer {select_layer} "
                                            f"of a {full_depth}-layer tower needs {run_layers}")
    eps = given.get("layer_norm_eps", tower.get("layer_norm_eps", family.layer_norm_eps))
    act = given.get("hidden_act", family.hidden_act)
    vcfg = family.config_class(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=run_layers,
                               num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
                               layer_norm_eps=eps, hidden_act=act, num_channels=3)
    mean = tuple(preprocessor.get("image_mean", family.image_mean))
    std = tuple(preprocessor.get("image_std", family.image_std))
    resize = "squash" if layout != "llava-hf" else "shortest_crop"
    return VisionSpec(family.name, vcfg, stored, full_depth, image_size, patch_size, mean, std, resize, has_class)


def _map_tensors(layout: str, ckpt: SafetensorsCheckpoint) -> dict[str, Source]:
    rules = [(re.compile(pattern), target) for pattern, target in _RULES[layout]]
    mapped: dict[str, Source] = {}
    for key in ckpt.keys():
        for pattern, target in rules:
            match = pattern.fullmatch(key)
            if not match:
                continue
            if isinstance(target, list):
                rows = ckpt.shape(key)[0]
                part = rows // len(target)
                for i, tmpl in enumerate(target):
                    mapped[match.expand(tmpl)] = Source(key, (i * part, (i + 1) * part))
            else:
                mapped[match.expand(target)] = Source(key)
            break
        else:
            if not _UNUSED.match(key):
                raise ImpqError(ckpt.tensors[key].file, f"tensor '{key}' does not fit layout {layout}; supported "
                                                        "layouts: " + "; ".join(SUPPORTED_LAYOUTS))
    return mapped


def build_vision_model(family: VisionFamily, config: PretrainedConfig) -> nn.Module:
    """The vision transformer itself (embeddings, encoder, layernorms), whose tensors are `vision.vision_model.*`."""
    for key, value in family.model_overrides.items():
        setattr(config, key, value)
    tower = family.model_class(config)
    # older transformers wrap the transformer in `.vision_model`; 5.x does not
    return getattr(tower, "vision_model", tower)


def expected_shapes(spec_text_config: PretrainedConfig, vision: VisionSpec, projector_in: int) -> dict[str, tuple]:
    """Canonical name -> shape, from transformers' own modules built on the meta device (no memory)."""
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(spec_text_config)
        tower = build_vision_model(vision.family, vision.config)
    shapes = {f"llm.{k}": tuple(v.shape) for k, v in llm.state_dict().items()}
    shapes.update({f"vision.vision_model.{k}": tuple(v.shape) for k, v in tower.state_dict().items()})
    hidden = spec_text_config.hidden_size
    shapes.update({"projector.0.weight": (hidden, projector_in), "projector.0.bias": (hidden,),
                   "projector.2.weight": (hidden, hidden), "projector.2.bias": (hidden,)})
    return shapes


def read_spec(folder: str | Path) -> ModelSpec:
    """Inspect a checkpoint folder: detect its layout, map every tensor, check every shape. Loads no weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImpqError(folder, "model folder does not exist")
    config_path = folder / "config.json"
    config = read_json(config_path, "config.json")
    ckpt = SafetensorsCheckpoint(folder)
    layout = detect_layout(config, ckpt.keys(), config_path)
    family = _family(layout, config)
    try:
        text_config = _text_config(layout, family, config)
    except (TypeError, ValueError, KeyError) as err:
        raise ImpqError(config_path, f"cannot build the {family.name} text config ({err})") from None
    tensors = _map_tensors(layout, ckpt)
    preprocessor_path = folder / "preprocessor_config.json"
    preprocessor = read_json(preprocessor_path, "preprocessor config") if preprocessor_path.is_file() else {}
    vision = _vision_spec(layout, config, ckpt, tensors, config_path, preprocessor)
    # layers beyond the ones that run are never loaded nor exported
    tensors = {name: src for name, src in tensors.items()
               if not (m := re.match(r"vision\.vision_model\.encoder\.layers\.(\d+)\.", name))
               or int(m.group(1)) < vision.config.num_hidden_layers}

    shapes = expected_shapes(text_config, vision, vision.config.hidden_size)
    shapes = {name: want for name, want in shapes.items() if not _UNUSED.match(name)}
    if getattr(text_config, "tie_word_embeddings", False) and "llm.lm_head.weight" not in tensors:
        shapes.pop("llm.lm_head.weight", None)
    for name, want in shapes.items():
        if name not in tensors:
            raise ImpqError(folder, f"checkpoint lacks a tensor for '{name}' (layout {layout})")
        src = tensors[name]
        have = src.shape(ckpt)
        if tuple(have) != tuple(want):
            raise ImpqError(ckpt.tensors[src.key].file, f"tensor '{src.key}' has shape {list(have)}, "
                                                        f"expected {list(want)} from config.json")
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        raise ImpqError(ckpt.tensors[tensors[extra[0]].key].file,
                        f"tensor '{tensors[extra[0]].key}' has no place in a {layout} model built from config.json")

    image_token = "<image>"
    index = config.get("image_token_index", config.get("image_token_id"))
    if index is None:
        raise ImpqError(config_path, "config.json names no image_token_index: the model has no image token")
    tokenizer = TextTokenizer.from_folder(folder, family.add_bos)
    if tokenizer.tokenizer.token_to_id(image_token) not in (None, int(index)):
        raise ImpqError(tokenizer.path, f"tokenizer's {image_token} is id {tokenizer.tokenizer.token_to_id(image_token)} "
                                        f"but config.json says image_token_index={index}")
    return ModelSpec(folder, folder.resolve().name, layout, family.name, text_config, vision, image_token, int(index),
                     tensors, ckpt, tokenizer, config)
