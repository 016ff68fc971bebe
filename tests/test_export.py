"""What the exported files hold: depth conventions, tokenizer, metadata, sharded input, 4-bit exports."""

from __future__ import annotations

import hashlib
import json

import gguf
import numpy as np
import pytest
from PIL import Image

from impq.recipe import export_with_recipe
from impq.models.layouts import read_spec
from impq.models.lmm import LMM
from impq.models.testing import make_model
from impq.runtime.llamacpp import PairRunner
from impq.verify import default_images, verify_pair


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.mark.parametrize("layout,stored,run", [("imp-phi2", 3, 3), ("imp-llava-phi2", 3, 2), ("llava-siglip", 3, 2)])
def test_vision_depth_conventions(models_dir, tmp_path, layout, stored, run):
    """Imp's truncated tower (all stored layers run) and a full tower with select layer -2 (one fewer runs)."""
    spec = read_spec(models_dir / layout)
    assert (spec.vision.stored_layers, spec.vision.config.num_hidden_layers) == (stored, run)
    result = export_with_recipe(spec, tmp_path, "f16")
    reader = gguf.GGUFReader(result.mmproj_path)
    assert _field(reader, "clip.vision.block_count") == run
    assert _field(reader, "clip.vision.feature_layer") == [run]
    names = {t.name for t in reader.tensors}
    assert f"v.blk.{run - 1}.attn_q.weight" in names and f"v.blk.{run}.attn_q.weight" not in names
    assert not any(n.startswith("v.post_ln") for n in names)


def test_llamacpp_tokenizes_like_the_checkpoint(models_dir, tmp_path):
    spec = read_spec(models_dir / "imp-qwen2")
    result = export_with_recipe(spec, tmp_path, "f16")
    text = "What colour is 12345 circle?\n  Answer:<|im_end|> yes"
    with PairRunner(result.text_path, result.mmproj_path) as runner:
        ids = runner.llama.tokenize(text.encode(), add_bos=False, special=True)
    assert ids == spec.tokenizer.encode(text)


def test_metadata_and_provenance(models_dir, tmp_path):
    folder = models_dir / "imp-phi2"
    spec = read_spec(folder)
    result = export_with_recipe(spec, tmp_path, "f16")
    text = gguf.GGUFReader(result.text_path)
    digest = hashlib.sha256()
    for path in [folder / "config.json", folder / "model.safetensors"]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    assert _field(text, "impq.source_digest") == digest.hexdigest() == result.source_digest
    carried = json.loads(_field(text, "impq.settings"))           # the export's recipe: no method, F16
    assert carried["target"]["type"] == "f16" and carried["method"]["name"] == "none" and carried["schema_version"] == 2
    assert _field(text, "general.architecture") == "phi2"
    assert _field(text, "phi2.rope.dimension_count") == 8          # rotary dims per head, not the head size
    assert _field(text, "tokenizer.ggml.add_bos_token") is False
    assert len(_field(text, "tokenizer.ggml.tokens")) == spec.text_config.vocab_size
    assert "USER:" in _field(text, "tokenizer.chat_template")
    mmproj = gguf.GGUFReader(result.mmproj_path)
    assert _field(mmproj, "clip.projector_type") == "mlp"
    assert _field(mmproj, "clip.use_gelu") is True
    assert _field(mmproj, "clip.vision.projection_dim") == spec.text_config.hidden_size
    types = {t.name: t.tensor_type for t in mmproj.tensors}
    assert types["v.position_embd.weight"] == gguf.GGMLQuantizationType.F32
    assert not list(tmp_path.glob(".*tmp*"))


def test_sharded_checkpoint_with_index(tmp_path):
    folder = make_model("imp-qwen2", tmp_path / "sharded", shard_bytes=40_000)
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    export_with_recipe(read_spec(folder), tmp_path / "out", "f16")
    assert verify_pair(tmp_path / "out", folder, prompts=["What is in the image?"]).passed is True


def test_q4_0_export_loads_and_generates(models_dir, tmp_path):
    spec = read_spec(models_dir / "imp-phi2")
    result = export_with_recipe(spec, tmp_path, "q4_0")
    reader = gguf.GGUFReader(result.text_path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q4_0
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    mm_types = {t.name: t.tensor_type for t in gguf.GGUFReader(result.mmproj_path).tensors}
    assert mm_types["v.blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q4_0
    assert mm_types["v.blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16    # 120 columns: not 32-divisible
    assert mm_types["v.patch_embd.weight"] == gguf.GGMLQuantizationType.F16
    with PairRunner(result.text_path, result.mmproj_path) as runner:
        run = runner.run(Image.open(default_images()[0]), "What is in the image?", max_new_tokens=16)
    assert len(run.tokens) >= 1 and all(np.isfinite(l).all() for l in run.step_logits)
    assert run.n_prompt_tokens > spec.vision.n_tokens


def test_non_square_image_is_squashed_for_imp(models_dir):
    """Imp squashes (no crop, no letterbox): a 2:1 image's right half still reaches the model."""
    lmm = LMM(read_spec(models_dir / "imp-phi2"))
    base = np.full((60, 120, 3), 128, np.uint8)
    changed = base.copy()
    changed[:, 100:] = 255
    a = lmm.encode_image(Image.fromarray(base))
    b = lmm.encode_image(Image.fromarray(changed))
    assert a.shape == (lmm.spec.vision.n_tokens, lmm.spec.text_config.hidden_size)
    assert not np.allclose(a.numpy(), b.numpy())
