"""Phi-3 (Imp-v1.5-4B-Phi3, Bunny-phi3): fused qkv_proj and gate_up_proj, SentencePiece vocabulary, a sliding
attention window."""

from __future__ import annotations

import gguf

from .record import ScaleGroup, TestCheckpoint, TestTokens, TextFamily
from .siglip import SIGLIP
from .templates import SYSTEM, chat_template

PROMPT = f"<|system|>\n{SYSTEM}<|end|>\n<|user|>\n<image>\n{{question}}<|end|>\n<|assistant|>\n"
PHI3 = TextFamily(
    name="phi3", config_class_name="Phi3Config", imp_model_types=("imp_phi3", "bunny-phi3"),
    imp_architecture="ImpPhi3ForCausalLM", llava_text_types=(), gguf_arch=gguf.MODEL_ARCH.PHI3,
    prompt_template=PROMPT,
    chat_template=chat_template(PROMPT, "'<|system|>\\n' + default_system + '<|end|>\\n'",
                                "'<|system|>\\n' + content + '<|end|>\\n'", "'<|user|>\\n' + content + '<|end|>\\n'",
                                "'<|assistant|>\\n' + content + '<|end|>\\n'", "'<|assistant|>\\n'"),
    awq_groups=(ScaleGroup("input_layernorm", "all", ("self_attn.qkv_proj",)),
                ScaleGroup("self_attn.qkv_proj", "last-third", ("self_attn.o_proj",)),
                ScaleGroup("post_attention_layernorm", "all", ("mlp.gate_up_proj",)),
                ScaleGroup("mlp.gate_up_proj", "last-half", ("mlp.down_proj",))),
    tokenizer_kind="sentencepiece", add_bos=False, norm="rms",
    test_tokens=TestTokens(("<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|end|>", "<|user|>",
                            "<|assistant|>", "<image>"), "<s>", "<|end|>", True,
                           rstrip_except=frozenset({"<unk>", "<s>", "<|endoftext|>"})),
    test_checkpoints=(TestCheckpoint("imp-phi3", "imp-llava", SIGLIP.name),),
    test_config=lambda kv_heads: dict(num_key_value_heads=kv_heads, rms_norm_eps=1e-5,
                                                    sliding_window=None),
    sliding_window=True,
    # llama.cpp applies Phi-3's special-token whitespace rules only when the model's name says phi3
    name_marker=(r"phi-?3", "-phi3"))
