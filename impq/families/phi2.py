"""Phi-2 (Imp-v1-3b, Bunny-phi): in its phi-msft naming (transformer.h.N.mixer.Wqkv) or transformers' PhiForCausalLM
naming; parallel attention and MLP after one LayerNorm, partial rotary embedding."""

from __future__ import annotations

import gguf

from .record import ScaleGroup, TestCheckpoint, TestTokens, TextFamily
from .siglip import SIGLIP
from .templates import SYSTEM, chat_template

# phi-msft era config keys -> transformers PhiConfig keys
_MSFT_KEYS = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
              "n_inner": "intermediate_size", "n_positions": "max_position_embeddings",
              "layer_norm_epsilon": "layer_norm_eps", "activation_function": "hidden_act"}


def _config_values(values: dict) -> dict:
    for old, new in _MSFT_KEYS.items():
        if old in values:
            values.setdefault(new, values.pop(old))
    if values.get("intermediate_size") is None:
        values["intermediate_size"] = 4 * values["hidden_size"]
    if "rotary_dim" in values:
        head_dim = values["hidden_size"] // values["num_attention_heads"]
        values["partial_rotary_factor"] = values.pop("rotary_dim") / head_dim
    if values.get("hidden_act") == "gelu_new" or "hidden_act" not in values:
        values["hidden_act"] = "gelu_new"
    return values


PROMPT = f"{SYSTEM} USER: <image>\n{{question}} ASSISTANT:"     # Imp / Bunny (imp_llava/conversation.py)
PHI2 = TextFamily(
    name="phi2", config_class_name="PhiConfig", imp_model_types=("imp", "bunny-phi"), imp_architecture="ImpForCausalLM",
    llava_text_types=(), gguf_arch=gguf.MODEL_ARCH.PHI2, prompt_template=PROMPT,
    chat_template=chat_template(PROMPT, "default_system", "content", "' USER: ' + content",
                                "' ASSISTANT: ' + content + '</s>'", "' ASSISTANT:'"),
    # fc2 follows a GELU and cannot take a folded scale: it is left unscaled
    awq_groups=(ScaleGroup("input_layernorm", "all", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                      "mlp.fc1")),
                ScaleGroup("self_attn.v_proj", "all", ("self_attn.dense",))),
    tokenizer_kind="bpe", add_bos=False, norm="layer",
    test_tokens=TestTokens(("<|endoftext|>", "</s>", "<image>"), "<|endoftext|>", "</s>", False),
    test_checkpoints=(TestCheckpoint("imp-phi2", "imp-phi2-msft", SIGLIP.name, truncated_tower=True),
                      TestCheckpoint("imp-llava-phi2", "imp-llava", SIGLIP.name)),
    test_config=lambda kv_heads: dict(partial_rotary_factor=0.5, layer_norm_eps=1e-5,
                                                   hidden_act="gelu_new"),
    config_values=_config_values)
