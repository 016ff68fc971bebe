"""What impq knows about one model family, as data: a text family (the LLM) or a vision family (the tower).
Every module that needs per-architecture knowledge asks a record (impq.families), never a family's name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import gguf


def _transformers_class(name: str) -> type:
    # by name: importing transformers' classes imports torch, which the timed llama.cpp process must not load
    import transformers

    return getattr(transformers, name)


@dataclass(frozen=True)
class ScaleGroup:
    """Linear layers that share one input, whose AWQ scales fold into the operation producing it."""
    prev: str                    # module whose output feeds the group
    prev_rows: str               # "all", or "last-half" / "last-third" of a fused linear's output rows
    linears: tuple[str, ...]


# a ViT encoder layer (SigLIP's and CLIP's share the names): layer_norm1 feeds q, k and v, v feeds out_proj,
# layer_norm2 feeds fc1; fc2 follows the activation and takes no folded scale
VIT_AWQ_GROUPS = (ScaleGroup("layer_norm1", "all", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                  ScaleGroup("self_attn.v_proj", "all", ("self_attn.out_proj",)),
                  ScaleGroup("layer_norm2", "all", ("mlp.fc1",)))


@dataclass(frozen=True)
class TestTokens:
    """The test-model builder's tokenizer: its special tokens, BOS and EOS, and whether BOS is added."""
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    add_bos: bool
    # None: no special swallows the whitespace after it; else every special but these does (Phi-3's chat tokens)
    rstrip_except: frozenset[str] | None = None


@dataclass(frozen=True)
class TestCheckpoint:
    """A checkpoint the test-model builder writes for a family (impq.models.testing)."""
    name: str                    # the test layout's name (TEST_LAYOUTS)
    naming: str                  # the checkpoint layout (models/layouts.py)
    vision: str                  # the vision family's name
    truncated_tower: bool = False    # Imp-style: only the tower layers that run are stored


@dataclass(frozen=True)
class TextFamily:
    name: str
    config_class_name: str                    # transformers' config class of the LLM
    imp_model_types: tuple[str, ...]          # config.json model_type of Imp/Bunny checkpoints (the first: Imp's)
    imp_architecture: str | None              # config.json architectures of an Imp checkpoint (None: not an Imp LLM)
    llava_text_types: tuple[str, ...]         # text_config.model_type values a llava-hf checkpoint may carry
    gguf_arch: gguf.MODEL_ARCH
    prompt_template: str                      # the single-turn prompt: <image> and {question} mark their places
    chat_template: str                        # the Jinja template the GGUF carries (families/templates.py)
    awq_groups: tuple[ScaleGroup, ...]        # quant/awq.py: where 1/s folds
    tokenizer_kind: str                       # "bpe" (byte-level) or "sentencepiece"
    add_bos: bool                             # when tokenizer_config.json does not say
    norm: str                                 # "layer" (LayerNorm, eps) or "rms" (RMSNorm, eps)
    test_tokens: TestTokens
    test_checkpoints: tuple[TestCheckpoint, ...]
    # the test-model builder's config values beyond the dimensions every family shares, from the KV head count
    test_config: Callable[[int], dict]
    # checkpoint config.json values -> transformers config values (old key names, values left implicit)
    config_values: Callable[[dict], dict] = lambda values: values
    permute_qk: bool = False                  # llama.cpp's graph wants q/k rows in interleaved rotary order
    sliding_window: bool = False              # the GGUF records the attention window
    writes_vocab_size: bool = False           # the GGUF records the vocabulary size
    # llama.cpp applies the family's special-token rules only when general.name matches (regex, suffix to add)
    name_marker: tuple[str, str] | None = None

    @property
    def gguf_arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    @property
    def config_class(self) -> type:
        return _transformers_class(self.config_class_name)


@dataclass(frozen=True)
class VisionFamily:
    name: str
    config_class_name: str                    # transformers' vision config and model classes
    model_class_name: str
    has_class_token: bool                     # CLIP prepends a class embedding (and a pre-layernorm); SigLIP not
    image_mean: tuple[float, float, float]    # when the checkpoint has no preprocessor_config.json
    image_std: tuple[float, float, float]
    layer_norm_eps: float                     # when the checkpoint does not say
    hidden_act: str
    hub_towers: dict[str, dict] = field(default_factory=dict)   # hub name -> what Imp's config.json leaves out
    model_overrides: dict = field(default_factory=dict)         # config values the tower module is built with
    awq_groups: tuple[ScaleGroup, ...] = ()   # quant/awq.py: where 1/s folds in an encoder layer
    # the test-model builder's extra config values, from the tower's hidden size
    test_config: Callable[[int], dict] = lambda hidden: {}

    @property
    def config_class(self) -> type:
        return _transformers_class(self.config_class_name)

    @property
    def model_class(self) -> type:
        return _transformers_class(self.model_class_name)
