"""Llama (and Mistral) backbones of transformers' LlavaForConditionalGeneration checkpoints."""

from __future__ import annotations

import gguf

from .clip import CLIP
from .qwen2 import LLAMA_STYLE_AWQ_GROUPS
from .record import TestCheckpoint, TestTokens, TextFamily
from .siglip import SIGLIP
from .templates import chat_template

PROMPT = "USER: <image>\n{question} ASSISTANT:"
LLAMA = TextFamily(
    name="llama", config_class_name="LlamaConfig", imp_model_types=(), imp_architecture=None,
    llava_text_types=("llama", "mistral"), gguf_arch=gguf.MODEL_ARCH.LLAMA, prompt_template=PROMPT,
    # no {{ bos_token }}: llama.cpp adds BOS itself (tokenizer.ggml.add_bos_token), as the PyTorch side does
    chat_template=chat_template(PROMPT, None, "content + ' '", "'USER: ' + content + ' '",
                                "'ASSISTANT: ' + content + eos_token", "'ASSISTANT:'"),
    awq_groups=LLAMA_STYLE_AWQ_GROUPS, tokenizer_kind="sentencepiece", add_bos=True, norm="rms",
    test_tokens=TestTokens(("<s>", "</s>", "<image>"), "<s>", "</s>", True),
    test_checkpoints=(TestCheckpoint("llava-clip", "llava-hf", CLIP.name),
                      TestCheckpoint("llava-siglip", "llava-hf", SIGLIP.name)),
    test_config=lambda kv_heads: dict(num_key_value_heads=max(1, kv_heads // 2),
                                                     rms_norm_eps=1e-5),
    # llama.cpp's LLAMA graph uses interleaved rotary pairs; HF stores q/k for rotate_half
    permute_qk=True, writes_vocab_size=True)
