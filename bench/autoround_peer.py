"""AutoRound (the `auto-round` package, learned rounding) as the peer in the quantization benchmarks: it tunes a
checkpoint's LLM (imp-tiny's, or the real LM's of run_quant_real_lm.py) on the same calibration sequences as impq
(images + text, or text alone) and writes the GGUF with its own exporter.

Bench-only glue, kept out of the package. What it has to work around in auto-round 0.16.1, and why:
- Imp keeps its image settings (`image_token_index`, `mm_*`) in the LLM config; auto-round reads any config key
  containing "image" as a multimodal model and then looks the Phi-2 architecture up among vision projectors
  ("PhiForCausalLM is not supported by AutoRound's bundled llama.cpp conversion"). The LLM is saved without them.
- auto-round calibrates from token ids. The image tokens are not token ids, so a hook on the embedding layer
  swaps each calibration sequence's embeddings for impq's (image features spliced into the prompt): the blocks
  see exactly the activations impq calibrates on. It drops sequences shorter than `seqlen`, so all are cut to
  the shortest one.
- Its converter names the pre-tokenizer by hashing a test string's encoding against the models it knows and
  stops on imp-tiny's GPT-2-style tokenizer; it is told "gpt-2" (the vocabulary is replaced just below anyway).
- impq's runtime reads the prompt template and image settings from impq's metadata, so the tensors of
  auto-round's file (bit for bit) are copied under the metadata of impq's F16 export of the same model.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

IMP_CONFIG_PREFIXES = ("image", "mm_")
# auto-round's format names for impq's GGUF types. The K types exist only as llama.cpp's presets; "_s" is the
# smallest, and its exporter applies the preset's mixing whatever the layer config says (Q4_K_S: attn_v of the
# first 4 blocks at Q5_K, all 4 of imp-tiny's), so its Q4_K file is slightly larger than the others'.
FORMATS = {"q4_0": "gguf:q4_0", "q4_1": "gguf:q4_1", "q4_k": "gguf:q4_k_s", "q3_k": "gguf:q3_k_s",
           "q2_k": "gguf:q2_k_s"}


def _calibration_loader(lmm, calib: Path, nsamples: int, seqlen: int, pad_id: int | None):
    """(token-id batches for auto-round, {first id: embeddings}) for impq's calibration sequences."""
    from impq.calib import calibration_embeddings, read_calibration

    embeds = calibration_embeddings(lmm, read_calibration(calib), nsamples, seqlen)
    length = min(e.shape[1] for e in embeds)
    # auto-round takes pad ids (or, with no pad token, a run of repeated ids at the end) as padding and leaves them
    # out of the attention and the loss: all-zero filler had it tune each block on the first position alone (a
    # broken Q4_0 file of SmolLM2). The filler ids are distinct neighbours, never the pad id.
    usable = [i for i in range(lmm.spec.text_config.vocab_size) if i != pad_id]
    filler = [usable[(len(embeds) + j) % len(usable)] for j in range(length - 1)]
    by_key, batches = {}, []
    for index, sequence in enumerate(embeds):
        # the first id identifies the sequence; the rest only set the length (their embeddings are replaced)
        key = usable[index]
        by_key[key] = sequence[:, :length].detach()
        batches.append({"input_ids": torch.tensor([[key, *filler]], dtype=torch.long)})
    return batches, by_key, length


def _save_llm(lmm, tokenizer, folder: Path):
    from transformers import AutoModelForCausalLM

    config = lmm.llm.config
    for key in [k for k in config.to_dict() if k.startswith(IMP_CONFIG_PREFIXES)]:
        delattr(config, key)
    lmm.llm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def _accept_gpt2_pre_tokenizer(hparams: dict) -> None:
    from auto_round.export.export_to_gguf.llama_cpp_conversion import get_conversion

    get_conversion(hparams=hparams)  # imports (and caches) the converter package as `conversion`
    sys.modules["conversion.base"].TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"


def _copy_under_impq_metadata(autoround_gguf: Path, impq_gguf: Path, target: Path) -> None:
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    ours = gguf.GGUFReader(impq_gguf)
    metadata = {}
    for field in ours.fields.values():
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        metadata[field.name] = MetadataDetails(field.types[0], field.contents(), sub_type=sub_type)
    theirs = gguf.GGUFReader(autoround_gguf)
    arch = theirs.fields[gguf.Keys.General.ARCHITECTURE].contents()
    copy_with_new_metadata(theirs, gguf.GGUFWriter(target, arch=arch), metadata, [])


def autoround_gguf(model_dir: Path, calib: Path, type_name: str, impq_f16_text: Path, out: Path, nsamples: int,
                   iters: int, seqlen: int = 512, stem: str = "imp-tiny") -> Path:
    """Quantize the checkpoint's LLM with AutoRound onto `type_name`; the text GGUF, under impq's metadata."""
    from auto_round import AutoRound
    from transformers import PreTrainedTokenizerFast

    from impq.models.lmm import LMM

    lmm = LMM.from_folder(model_dir)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(lmm.spec.tokenizer.path))
    batches, by_key, length = _calibration_loader(lmm, calib, nsamples, seqlen, tokenizer.pad_token_id)
    llm = _save_llm(lmm, tokenizer, out / "llm-hf")
    del lmm
    llm.get_input_embeddings().register_forward_hook(
        lambda module, args, output: torch.cat([by_key[int(row[0])] for row in args[0]]).to(output.dtype))
    _accept_gpt2_pre_tokenizer(llm.config.to_dict())
    # token embedding and output head at Q8_0, as in every other file of the benchmark
    layer_config = {"lm_head": "gguf:q8_0", "model.embed_tokens": "gguf:q8_0"}
    start = time.perf_counter()
    rounder = AutoRound(llm, tokenizer, iters=iters, nsamples=len(batches), seqlen=length, dataset=batches,
                        layer_config=layer_config, device_map="cpu")
    rounder.quantize_and_save(str(out / "autoround"), format=FORMATS[type_name])
    written = next((out / "autoround").rglob("*.gguf"))
    target = out / f"{stem}-{type_name.upper()}-autoround.gguf"
    _copy_under_impq_metadata(written, impq_f16_text, target)
    print(f"autoround {type_name}: {time.perf_counter() - start:.1f} s", flush=True)
    return target
