"""The text-model GGUF: llama.cpp architecture metadata, the tokenizer, the chat template and the LLM's tensors
(named through gguf's own TensorNameMap)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gguf
from gguf.vocab import SentencePieceVocab
import torch

from ..errors import ImpqError
from ..models.layouts import ModelSpec
from ..models.tokenizer import TextTokenizer
from .gguf_blocks import chosen_blocks
from .gguf_file import FILE_TYPES, PlannedTensor, QType, add_provenance, gguf_bytes, matrix_type, write_gguf

def _rotary_permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    # a family's permute_qk: llama.cpp's graph uses interleaved rotary pairs where HF stores q/k for rotate_half
    # (convert_hf_to_gguf does the same)
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _pre_tokenizer(raw: dict, path: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization regex (it decides how digits and spaces split)."""
    pre = raw.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for part in parts:
        if part.get("type") == "ByteLevel" and part.get("use_regex", True):
            return "gpt-2"
        if part.get("type") == "Split":
            regex = part.get("pattern", {}).get("Regex", "")
            if r"\p{N}{1,3}" in regex:
                return "llama-bpe"
            if r"\p{N}" in regex:
                return "qwen2"
    raise ImpqError(path, "unsupported pre-tokenizer: impq exports GPT-2-style byte-level BPE tokenizers "
                          "(Phi-2, Qwen, Llama-3 style) and SentencePiece (byte-fallback) ones")


@dataclass
class GGUFVocab:
    model: str                     # llama.cpp's tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    tokens: list[str]
    types: list[int]
    merges: list[str] = field(default_factory=list)    # gpt2 only
    pre: str | None = None                              # gpt2 only: the pre-tokenization regex's name
    scores: list[float] = field(default_factory=list)   # llama only: SentencePiece piece scores
    add_space_prefix: bool = False                      # llama only
    unk_id: int | None = None


def _padded(n_rows: int) -> tuple[list[str], list[int], list[float]]:
    # the token list must have exactly the embedding's row count: pad with unused entries
    return [f"[PAD{i}]" for i in range(n_rows)], [gguf.TokenType.UNUSED] * n_rows, [-1000.0] * n_rows


def gguf_vocab(tok: TextTokenizer, n_rows: int) -> GGUFVocab:
    """The tokenizer as llama.cpp's vocabulary, padded to the embedding's row count."""
    raw = tok.tokenizer_json
    model = raw.get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return _sentencepiece_vocab(tok, n_rows)
    if model.get("type") != "BPE":
        raise ImpqError(tok.path, f"unsupported tokenizer model {model.get('type')!r}: impq exports byte-level BPE "
                                  "(GPT-2 style) and SentencePiece (byte-fallback BPE) tokenizers")
    pre = _pre_tokenizer(raw, tok.path)
    vocab = tok.tokenizer.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= n_rows:
        raise ImpqError(tok.path, f"tokenizer has ids up to {max(vocab.values())} but the embedding has {n_rows} rows")
    special = {t["id"] for t in raw.get("added_tokens", []) if t.get("special")}
    added = {t["id"] for t in raw.get("added_tokens", [])}
    tokens, types, _ = _padded(n_rows)
    for text, idx in vocab.items():
        tokens[idx] = text
        types[idx] = (gguf.TokenType.CONTROL if idx in special else
                      gguf.TokenType.USER_DEFINED if idx in added else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return GGUFVocab("gpt2", tokens, types, merges=merges, pre=pre)


def _sentencepiece_vocab(tok: TextTokenizer, n_rows: int) -> GGUFVocab:
    """llama.cpp's "llama" vocabulary: the pieces, scores and types of the SentencePiece model (read by gguf-py's
    SentencePieceVocab, as convert_hf_to_gguf does), then tokenizer.json's added tokens (chat tokens, <image>)."""
    model_path = tok.path.parent / "tokenizer.model"
    if not model_path.is_file():
        raise ImpqError(tok.path, "SentencePiece-style tokenizer (byte-fallback BPE) without its tokenizer.model: "
                                  "llama.cpp's vocabulary needs the SentencePiece model's scores; copy the base "
                                  "model's tokenizer.model beside tokenizer.json")
    try:
        pieces = list(SentencePieceVocab(model_path.parent).sentencepiece_tokens())
    except Exception as err:  # sentencepiece raises RuntimeError/OSError on damaged models
        raise ImpqError(model_path, f"cannot read the SentencePiece model ({err})") from None
    vocab = tok.tokenizer.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= n_rows:
        raise ImpqError(tok.path, f"tokenizer has ids up to {max(vocab.values())} but the embedding has {n_rows} rows")
    tokens, types, scores = _padded(n_rows)
    for idx, (text, score, token_type) in enumerate(pieces):
        piece = text.decode("utf-8")
        if vocab.get(piece) != idx:
            raise ImpqError(model_path, f"piece {idx} {piece!r} is id {vocab.get(piece)} in tokenizer.json: the two "
                                        "files describe different vocabularies")
        tokens[idx], scores[idx], types[idx] = piece, score, token_type
    for added in _added_tokens(tok):
        if added["id"] >= len(pieces):
            tokens[added["id"]] = added["content"]
            types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    unk = next((i for i, (_, _, t) in enumerate(pieces) if t == gguf.TokenType.UNKNOWN), None)
    return GGUFVocab("llama", tokens, types, scores=scores, add_space_prefix=_adds_space_prefix(tok.tokenizer_json),
                     unk_id=unk)


def _added_tokens(tok: TextTokenizer) -> list[dict]:
    return [t for t in tok.tokenizer_json.get("added_tokens", []) if isinstance(t, dict) and "id" in t]


def _adds_space_prefix(raw: dict) -> bool:
    """Whether the tokenizer puts "▁" before the text: Llama-2/Phi-3's normalizer Prepend("▁"), or a Metaspace
    pre-tokenizer that prepends."""
    def steps(node: dict | None, key: str) -> list[dict]:
        node = node or {}
        return node.get(key, []) if node.get("type") == "Sequence" else [node]
    if any(n.get("type") == "Prepend" and n.get("prepend") == "\u2581" for n in steps(raw.get("normalizer"), "normalizers")):
        return True
    return any(n.get("type") == "Metaspace" and n.get("prepend_scheme", "always") != "never"
               for n in steps(raw.get("pre_tokenizer"), "pretokenizers"))


def add_tokenizer(writer: gguf.GGUFWriter, tok: TextTokenizer, vocab: GGUFVocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.model == "gpt2":
        writer.add_token_merges(vocab.merges)
    else:
        writer.add_token_scores(vocab.scores)
        writer.add_add_space_prefix(vocab.add_space_prefix)
        if vocab.unk_id is not None:
            writer.add_unk_token_id(vocab.unk_id)
    if tok.bos_id is not None:
        writer.add_bos_token_id(tok.bos_id)
    if tok.eos_id is not None:
        writer.add_eos_token_id(tok.eos_id)
    writer.add_add_bos_token(tok.add_bos)
    writer.add_add_eos_token(False)


def _add_hparams(writer: gguf.GGUFWriter, spec: ModelSpec) -> None:
    cfg = spec.text_config
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    rope = cfg.rope_parameters or {}
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    # phi2: the rotary dimension per head (32 for Phi-2), not the head size
    writer.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * head_dim))
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    family = spec.text_family
    if family.norm == "layer":
        writer.add_layer_norm_eps(cfg.layer_norm_eps)
    else:
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if family.sliding_window:
        writer.add_sliding_window(cfg.sliding_window or 0)
    if family.writes_vocab_size:
        writer.add_vocab_size(cfg.vocab_size)


def text_tensors(spec: ModelSpec, qtype: QType, quantized: dict | None = None,
                 head_type: QType = QType.Q8_0, source: Callable[[str], torch.Tensor] | None = None
                 ) -> list[PlannedTensor]:
    """The LLM's tensors; those in `quantized` (canonical name -> driver.QuantizedTensor) are written as the codes
    and block parameters an impq algorithm chose, the rest by the type policy from `source` (default: the
    checkpoint; a quantized model's own values when an algorithm changed norms or biases, as AWQ does)."""
    quantized = quantized or {}
    load = source or spec.load
    cfg = spec.text_config
    names = gguf.get_tensor_name_map(spec.text_family.gguf_arch, cfg.num_hidden_layers)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    planned = []
    for canonical in spec.tensors:
        if not canonical.startswith("llm."):
            continue
        hf_name = canonical[len("llm."):]
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ImpqError(spec.folder, f"no GGUF name for tensor '{hf_name}' in llama.cpp's {spec.family} architecture")
        shape = spec.shape(canonical)
        permute_heads = None
        if spec.text_family.permute_qk and re.search(r"self_attn\.[qk]_proj\.", hf_name):
            permute_heads = heads if ".q_proj." in hf_name else kv_heads
        if canonical in quantized:
            # llama.cpp's q/k row permutation applies to the packed rows
            rows = None if permute_heads is None else \
                lambda data, n=permute_heads: _rotary_permute(torch.from_numpy(data), n).numpy()
            planned.append(chosen_blocks(name, shape, quantized[canonical], canonical, rows))
            continue
        if len(shape) == 1:
            tensor_type = QType.F32
        elif qtype not in (QType.F32, QType.F16, QType.Q8_0) and name in ("token_embd.weight", "output.weight"):
            tensor_type = head_type        # documented default: 8-bit embeddings and output head in low-bit exports
        else:
            tensor_type = matrix_type(shape, qtype)
        produce: Callable[[], torch.Tensor] = lambda c=canonical: load(c)
        if permute_heads is not None:
            produce = lambda c=canonical, n=permute_heads: _rotary_permute(load(c), n)
        planned.append(PlannedTensor(name, tuple(shape), tensor_type, produce, canonical=canonical))
    return planned


def read_text_gguf_weights(spec: ModelSpec, path: Path) -> dict[str, torch.Tensor]:
    """The LLM's tensors as a text GGUF stores them, dequantized by gguf-py, by canonical name: the weights llama.cpp
    computes with, for measurements that must run in PyTorch (a reduction llama.cpp has no graph for)."""
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    cfg = spec.text_config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    weights = {}
    for planned in text_tensors(spec, QType.F16):
        tensor = stored[planned.name]
        values = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy()).reshape(planned.shape)
        if spec.text_family.permute_qk and re.search(r"self_attn\.[qk]_proj\.", planned.canonical):
            n = heads if ".q_proj." in planned.canonical else kv_heads     # undo _rotary_permute
            values = values.reshape(n, values.shape[0] // n // 2, 2, *values.shape[1:]).swapaxes(1, 2).reshape(
                values.shape)
        weights[planned.canonical] = values.float()
    return weights


def _text_metadata(spec: ModelSpec, qtype: QType, vocab: GGUFVocab, source_digest: str, settings: dict):
    def metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        marker = spec.text_family.name_marker      # llama.cpp keys some family rules on the model's name
        writer.add_name(spec.name if marker is None or re.search(marker[0], spec.name, re.I)
                        else spec.name + marker[1])
        writer.add_file_type(FILE_TYPES[qtype])
        if qtype not in (QType.F32, QType.F16):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_hparams(writer, spec)
        add_tokenizer(writer, spec.tokenizer, vocab)
        writer.add_chat_template(spec.chat_template)
        # the exact single-turn prompt, so that impq's runner feeds llama.cpp what the PyTorch reference sees
        writer.add_string("impq.prompt_template", spec.prompt_template)
        writer.add_string("impq.image_token", spec.image_token)
        add_provenance(writer, source_digest, settings)
    return metadata


def write_text_gguf(spec: ModelSpec, path: Path, qtype: QType, source_digest: str, settings: dict,
                    on_tensor=None, quantized: dict | None = None,
                    source: Callable[[str], torch.Tensor] | None = None, head_type: QType = QType.Q8_0) -> Path:
    tensors = text_tensors(spec, qtype, quantized, head_type, source)
    vocab = gguf_vocab(spec.tokenizer, spec.text_config.vocab_size)
    metadata = _text_metadata(spec, qtype, vocab, source_digest, settings)
    return write_gguf(path, spec.text_family.gguf_arch_name, metadata, tensors, on_tensor)


def text_gguf_bytes(spec: ModelSpec, qtype: QType, source_digest: str, settings: dict, types: dict[str, QType],
                    head_type: QType = QType.Q8_0) -> int:
    """The exact size of the text GGUF write_text_gguf would write with `types` (canonical name -> type) for the
    quantized tensors: what a size budget over the whole file counts."""
    tensors = [dataclasses.replace(t, qtype=types[t.canonical]) if t.canonical in types else t
               for t in text_tensors(spec, qtype, head_type=head_type)]
    vocab = gguf_vocab(spec.tokenizer, spec.text_config.vocab_size)
    return gguf_bytes(spec.text_family.gguf_arch_name,
                      _text_metadata(spec, qtype, vocab, source_digest, settings), tensors)
