"""Checkpoints with random weights in each real layout: real config.json schema, real tensor names, a real
byte-level BPE tokenizer. Small ones drive the tests; `full_size=True` writes imp-v1-3b's real dimensions
(SigLIP so400m + Phi-2 2.7B) for speed and memory benchmarks, streamed to disk one tensor at a time.

Weights have realistic scales (std 1/sqrt(fan_in)): with tiny random weights many conversion bugs keep the
top-1 token and only show in the logits (see shared/reference/gguf-llamacpp.md).
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM

from ..families import TEXT_FAMILIES, VISION_FAMILIES
from ..fileio import atomic_output, ensure_writable_dir
from .layouts import build_vision_model


_CORPUS = """\
A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed,
and polite answers to the user's questions. What is in the image? Describe the picture in one word.
What color is the circle? The circle is red. The square is blue. The triangle is green. How many shapes are there?
There are three shapes. Is there a star in the image? Yes. No. Where is the small square? It is left of the circle.
The quick brown fox jumps over the lazy dog. Numbers like 12, 345 and 6789 split into digits; letters A, B, C.
A photo of a cat sitting on a mat next to a cup of coffee, taken on a sunny morning in the garden.
User questions ask about objects, colors, counts, positions, text and small details inside the picture.
"""

# text the SentencePiece test vocabulary also covers: repeated spaces and non-ASCII words. Lines hold no newline, as
# in Llama-2's training text: "\n" is left to byte fallback (<0x0A>), as in the real vocabularies.
_SPM_EXTRA = ["Two  spaces,   three spaces.", "Café crème, naïve façade, 東京 and Zürich."]


def _add_specials(tok: Tokenizer, family: str) -> Tokenizer:
    # some families' chat tokens strip the whitespace after them (llama.cpp applies the same rule to Phi-3's)
    tokens = TEXT_FAMILIES[family].test_tokens
    keep = tokens.rstrip_except
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False, rstrip=keep is not None and t not in keep)
                            for t in tokens.specials])
    return tok


def build_tokenizer(family: str, vocab_size: int = 320, corpus: list[str] | None = None) -> Tokenizer:
    """A GPT-2-style byte-level BPE trained (deterministically) on a small text; specials appended last."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=[])
    tok.train_from_iterator(corpus or _CORPUS.splitlines(), trainer)
    return _add_specials(tok, family)


def build_sentencepiece_tokenizer(family: str, vocab_size: int = 420) -> tuple[Tokenizer, bytes]:
    """A SentencePiece BPE model trained with Llama-2's settings (byte fallback, digits split, whitespace kept,
    "▁" word boundary), and its tokenizer.json as transformers' LlamaConverter writes it (legacy normalizer):
    (the tokenizers Tokenizer with the family's specials added, the tokenizer.model bytes)."""
    import io

    import sentencepiece
    from transformers.convert_slow_tokenizer import generate_merges

    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS.splitlines() + _SPM_EXTRA), model_writer=proto, model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    processor = sentencepiece.SentencePieceProcessor(model_proto=proto.getvalue())
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    tok = Tokenizer(models.BPE(vocab, generate_merges(vocab), unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return _add_specials(tok, family), proto.getvalue()


@dataclass(frozen=True)
class Dims:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    v_hidden: int
    v_intermediate: int
    v_heads: int
    v_layers_stored: int
    image_size: int
    patch: int
    vocab_rows: int | None = None   # None: the tokenizer's size rounded up to a multiple of 32


SMALL = Dims(hidden=64, layers=2, heads=4, kv_heads=4, intermediate=160, v_hidden=64, v_intermediate=120,
             v_heads=2, v_layers_stored=3, image_size=84, patch=14)
IMP_V1_3B = Dims(hidden=2560, layers=32, heads=32, kv_heads=32, intermediate=10240, v_hidden=1152,
                 v_intermediate=4304, v_heads=16, v_layers_stored=26, image_size=384, patch=14, vocab_rows=51200)

# test layout -> (text family, its TestCheckpoint): every family record's test checkpoints
_TEST_CHECKPOINTS = {c.name: (f.name, c) for f in TEXT_FAMILIES.values() for c in f.test_checkpoints}

TEST_LAYOUTS = tuple(_TEST_CHECKPOINTS)

# canonical name -> checkpoint name, per naming (the inverse of layouts._RULES)
_WRITE_NAMES = {
    "imp-phi2-msft": [
        (r"llm\.model\.embed_tokens\.weight", "transformer.embd.wte.weight"),
        (r"llm\.model\.layers\.(\d+)\.input_layernorm\.(\w+)", r"transformer.h.\1.ln.\2"),
        (r"llm\.model\.layers\.(\d+)\.self_attn\.dense\.(\w+)", r"transformer.h.\1.mixer.out_proj.\2"),
        (r"llm\.model\.layers\.(\d+)\.mlp\.(fc\d)\.(\w+)", r"transformer.h.\1.mlp.\2.\3"),
        (r"llm\.model\.final_layernorm\.(\w+)", r"lm_head.ln.\1"),
        (r"llm\.lm_head\.(\w+)", r"lm_head.linear.\1"),
        (r"projector\.(.*)", r"transformer.mm_projector.\1"),
        (r"vision\.(.*)", r"transformer.vision_tower.vision_tower.\1"),
    ],
    "imp-llava": [
        (r"llm\.model\.(.*)", r"model.\1"),
        (r"llm\.lm_head\.(.*)", r"lm_head.\1"),
        (r"projector\.(.*)", r"model.mm_projector.\1"),
        (r"vision\.(.*)", r"model.vision_tower.vision_tower.\1"),
    ],
    "llava-hf": [
        (r"llm\.model\.(.*)", r"model.language_model.\1"),
        (r"llm\.lm_head\.(.*)", r"lm_head.\1"),
        (r"projector\.0\.(.*)", r"model.multi_modal_projector.linear_1.\1"),
        (r"projector\.2\.(.*)", r"model.multi_modal_projector.linear_2.\1"),
        (r"vision\.(.*)", r"model.vision_tower.\1"),
    ],
}


def _text_config(family: str, d: Dims, vocab_rows: int, special_ids: dict):
    common = dict(hidden_size=d.hidden, num_hidden_layers=d.layers, num_attention_heads=d.heads,
                  intermediate_size=d.intermediate, vocab_size=vocab_rows, max_position_embeddings=2048,
                  bos_token_id=special_ids.get("bos"), eos_token_id=special_ids.get("eos"), pad_token_id=None,
                  tie_word_embeddings=False)
    record = TEXT_FAMILIES[family]
    return record.config_class(**common, **record.test_config(d.kv_heads))


def _vision_config(kind: str, d: Dims):
    family = VISION_FAMILIES[kind]
    return family.config_class(hidden_size=d.v_hidden, intermediate_size=d.v_intermediate,
                               num_attention_heads=d.v_heads, num_hidden_layers=d.v_layers_stored,
                               image_size=d.image_size, patch_size=d.patch, layer_norm_eps=family.layer_norm_eps,
                               hidden_act=family.hidden_act, **family.test_config(d.v_hidden))


def _init_std(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of a realistic random init for a tensor of this name and shape."""
    if name.endswith("bias"):
        return 0.0, 0.05
    if len(shape) == 1 and "class_embedding" not in name:
        return 1.0, 0.1                                   # norm weights
    if "embed_tokens" in name or "position_embedding" in name or "class_embedding" in name:
        return 0.0, 0.5
    fan_in = math.prod(shape[1:])
    scale = 4.0 if "lm_head" in name else 1.0             # spread the logits so that top-1 is rarely a near-tie
    return 0.0, scale / math.sqrt(fan_in)


def realistic_init(model: torch.nn.Module, seed: int = 0) -> None:
    """Fill every parameter of a generated module with _init_std's realistic random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            mean, std = _init_std(name, tuple(param.shape))
            param.copy_(torch.randn(param.shape, generator=gen) * std + mean)


class _StreamingSafetensors:
    """Writes one safetensors shard tensor by tensor. The safetensors library needs every tensor in memory at
    once; a 2.7B-parameter checkpoint must not, so the (simple, documented) format is written here directly."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...]]]):
        offsets, header = 0, {}
        for key, shape in entries:
            size = math.prod(shape) * 2
            header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offsets, offsets + size]}
            offsets += size
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.handle = open(path, "wb")
        self.handle.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, tensor: torch.Tensor) -> None:
        self.handle.write(tensor.to(torch.float16).contiguous().numpy().tobytes())

    def close(self) -> None:
        self.handle.close()


def _plan(naming: str, family: str, text_cfg, vision_cfg, kind: str) -> list[tuple[str, tuple[int, ...], list]]:
    """[(checkpoint key, shape, [canonical parts])]; q/k/v are fused into one Wqkv for phi-msft."""
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(text_cfg)
        tower = build_vision_model(VISION_FAMILIES[kind], vision_cfg)
    canonical = [(f"llm.{k}", tuple(v.shape)) for k, v in llm.state_dict().items()]
    canonical += [(f"vision.vision_model.{k}", tuple(v.shape)) for k, v in tower.state_dict().items()]
    h, vh = text_cfg.hidden_size, vision_cfg.hidden_size
    canonical += [("projector.0.weight", (h, vh)), ("projector.0.bias", (h,)),
                  ("projector.2.weight", (h, h)), ("projector.2.bias", (h,))]
    rules = [(re.compile(p), t) for p, t in _WRITE_NAMES[naming]]
    plan: list[tuple[str, tuple[int, ...], list]] = []
    fused: dict[str, int] = {}
    for name, shape in canonical:
        if naming == "imp-phi2-msft" and (m := re.fullmatch(r"llm\.model\.layers\.(\d+)\.self_attn\.[qkv]_proj\.(\w+)", name)):
            key = f"transformer.h.{m.group(1)}.mixer.Wqkv.{m.group(2)}"
            if key in fused:
                entry = plan[fused[key]]
                plan[fused[key]] = (key, (entry[1][0] + shape[0], *shape[1:]), entry[2] + [(name, shape)])
            else:
                fused[key] = len(plan)
                plan.append((key, shape, [(name, shape)]))
            continue
        for pattern, template in rules:
            if m := pattern.fullmatch(name):
                plan.append((m.expand(template), shape, [(name, shape)]))
                break
        else:
            raise AssertionError(f"no checkpoint name for {name}")
    return plan


def make_model(layout: str, out: str | Path, *, full_size: bool = False, seed: int = 0,
               shard_bytes: int = 2 << 30, progress=None, dims: Dims | None = None, tokenizer: Tokenizer | None = None,
               values: Callable[[str], torch.Tensor] | None = None) -> Path:
    """Write a checkpoint folder of `layout` (one of TEST_LAYOUTS) to `out`: random weights, or `values(canonical
    name)` (a trained model's tensors, see layouts.py for the canonical names)."""
    family, checkpoint = _TEST_CHECKPOINTS[layout]
    naming, kind, truncated_tower = checkpoint.naming, checkpoint.vision, checkpoint.truncated_tower
    dims = dims or (IMP_V1_3B if full_size else SMALL)
    out = ensure_writable_dir(Path(out))
    sentencepiece_model = None
    record = TEXT_FAMILIES[family]
    if tokenizer is None and record.tokenizer_kind == "sentencepiece":
        tokenizer, sentencepiece_model = build_sentencepiece_tokenizer(family)
    tokenizer = tokenizer or build_tokenizer(family)
    bos, eos, add_bos = record.test_tokens.bos, record.test_tokens.eos, record.test_tokens.add_bos
    n_tokens = tokenizer.get_vocab_size()
    vocab_rows = dims.vocab_rows or -(-n_tokens // 32) * 32
    ids = {"bos": tokenizer.token_to_id(bos) if bos else None, "eos": tokenizer.token_to_id(eos)}
    image_id = tokenizer.token_to_id("<image>")

    text_cfg = _text_config(family, dims, vocab_rows, ids)
    vision_cfg = _vision_config(kind, dims)
    plan = _plan(naming, family, text_cfg, vision_cfg, kind)

    if naming == "llava-hf":
        config = {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
                  "text_config": text_cfg.to_dict(), "vision_config": vision_cfg.to_dict(),
                  "image_token_index": image_id, "vision_feature_layer": -2,
                  "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu"}
    else:
        config = text_cfg.to_dict()
        config["model_type"] = record.imp_model_types[0]
        config["architectures"] = [record.imp_architecture]
        config.update(mm_projector_type="mlp2x_gelu", mm_hidden_size=dims.v_hidden, mm_vision_select_layer=-2,
                      mm_vision_select_feature="patch", image_aspect_ratio="square", image_token_index=image_id,
                      tokenizer_model_max_length=2048)
        if full_size:
            config["mm_vision_tower"] = "google/siglip-so400m-patch14-384"   # depth and heads from impq's table
        else:
            config["mm_vision_tower"] = "impq-testing/siglip-tiny"
            # truncated: Imp saved only the layers that run; otherwise the full tower is stored
            config["vision_config"] = {"num_attention_heads": dims.v_heads}
            if not truncated_tower:
                config["vision_config"]["num_hidden_layers"] = dims.v_layers_stored
        if naming == "imp-phi2-msft":
            config = _to_msft_keys(config, text_cfg)
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    tokenizer.save(str(out / "tokenizer.json"))
    if sentencepiece_model is not None:
        (out / "tokenizer.model").write_bytes(sentencepiece_model)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
        "add_bos_token": add_bos, "model_max_length": 2048, "chat_template": record.chat_template}, indent=2))
    if naming == "llava-hf":                  # transformers' processors read it; Imp takes the tower's defaults
        vision = VISION_FAMILIES[kind]
        (out / "preprocessor_config.json").write_text(json.dumps(
            {"image_mean": list(vision.image_mean), "image_std": list(vision.image_std),
             "size": {"shortest_edge": vision_cfg.image_size},
             "crop_size": {"height": vision_cfg.image_size, "width": vision_cfg.image_size}}, indent=2))
    _write_weights(out, plan, seed, shard_bytes, progress, values)
    return out


def _to_msft_keys(config: dict, text_cfg) -> dict:
    """The phi-msft config schema that imp-v1-3b's remote code reads."""
    keep = {k: v for k, v in config.items()
            if k.startswith("mm_") or k in ("model_type", "architectures", "image_token_index", "image_aspect_ratio",
                                            "tokenizer_model_max_length", "vision_config", "bos_token_id",
                                            "eos_token_id", "vocab_size", "tie_word_embeddings")}
    head_dim = text_cfg.hidden_size // text_cfg.num_attention_heads
    keep.update(n_embd=text_cfg.hidden_size, n_layer=text_cfg.num_hidden_layers, n_head=text_cfg.num_attention_heads,
                n_inner=text_cfg.intermediate_size, n_positions=text_cfg.max_position_embeddings,
                rotary_dim=int(text_cfg.rope_parameters["partial_rotary_factor"] * head_dim),
                layer_norm_epsilon=text_cfg.layer_norm_eps, activation_function="gelu_new")
    return keep


def _write_weights(out: Path, plan, seed: int, shard_bytes: int, progress, values) -> None:
    shards: list[list] = [[]]
    size = 0
    for entry in plan:
        nbytes = math.prod(entry[1]) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    gen = torch.Generator().manual_seed(seed)
    for name, shard in zip(names, shards):
        with atomic_output(out / name) as tmp:
            writer = _StreamingSafetensors(tmp, [(key, shape) for key, shape, _ in shard])
            try:
                for key, shape, parts in shard:
                    tensors = []
                    for part_name, part_shape in parts:
                        if values is not None:
                            tensors.append(values(part_name).detach().float())
                            continue
                        mean, std = _init_std(part_name, part_shape)
                        tensors.append(torch.randn(part_shape, generator=gen) * std + mean)
                    writer.write(torch.cat(tensors) if len(tensors) > 1 else tensors[0])
                    if progress:
                        progress(key)
            finally:
                writer.close()
    if len(shards) > 1:
        index = {"metadata": {}, "weight_map": {key: name for name, shard in zip(names, shards) for key, _, _ in shard}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
