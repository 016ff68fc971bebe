"""Qwen2 / Qwen1.5 (Imp-v1.5-2B-Qwen1.5, Bunny-qwen2): ChatML prompts, byte-level BPE, RMSNorm, SwiGLU."""

from __future__ import annotations

import gguf

from .record import ScaleGroup, TestCheckpoint, TestTokens, TextFamily
from .siglip import SIGLIP
from .templates import SYSTEM, chat_template

PROMPT = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n<image>\n{{question}}<|im_end|>\n"
          "<|im_start|>assistant\n")
# the attention and SwiGLU folds of a Llama-style decoder block (Qwen2 and Llama share them)
LLAMA_STYLE_AWQ_GROUPS = (
    ScaleGroup("input_layernorm", "all", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ScaleGroup("self_attn.v_proj", "all", ("self_attn.o_proj",)),
    ScaleGroup("post_attention_layernorm", "all", ("mlp.gate_proj", "mlp.up_proj")),
    ScaleGroup("mlp.up_proj", "all", ("mlp.down_proj",)))
QWEN2 = TextFamily(
    name="qwen2", config_class_name="Qwen2Config", imp_model_types=("imp_qwen2", "bunny-qwen2"),
    imp_architecture="ImpQwen2ForCausalLM", llava_text_types=(), gguf_arch=gguf.MODEL_ARCH.QWEN2,
    prompt_template=PROMPT,
    chat_template=chat_template(PROMPT, "'<|im_start|>system\\n' + default_system + '<|im_end|>\\n'",
                                "'<|im_start|>system\\n' + content + '<|im_end|>\\n'",
                                "'<|im_start|>user\\n' + content + '<|im_end|>\\n'",
                                "'<|im_start|>assistant\\n' + content + '<|im_end|>\\n'",
                                "'<|im_start|>assistant\\n'"),
    awq_groups=LLAMA_STYLE_AWQ_GROUPS, tokenizer_kind="bpe", add_bos=False, norm="rms",
    test_tokens=TestTokens(("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"), None, "<|im_end|>", False),
    test_checkpoints=(TestCheckpoint("imp-qwen2", "imp-llava", SIGLIP.name),),
    test_config=lambda kv_heads: dict(num_key_value_heads=kv_heads, rope_theta=1e6,
                                                     rms_norm_eps=1e-6))
