"""Streaming the decoder from the checkpoint: the same codes as the in-memory path, the same reference logits,
and a peak memory bounded by one block rather than the whole LLM (measured in a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from impq.calib import calibration_embeddings, read_calibration
from impq.defaults import default_calib_data
from impq.models.layouts import read_spec
from impq.models.lmm import LMM
from impq.models.testing import Dims, make_model
from impq.quant.driver import quantize_llm
from impq.quant.grids import GRIDS
from impq.quant.plan import plan_llm


def _embeddings(lmm, n=4, seqlen=256):
    return calibration_embeddings(lmm, read_calibration(default_calib_data(lmm.spec.folder)), n, seqlen)


@pytest.mark.parametrize("layout, method, type_name", [("imp-phi2", "gptq", "q4_k"), ("imp-qwen2", "awq", "q4_0"),
                                                       ("imp-phi3", "signround", "q4_0")])
def test_streaming_gives_the_in_memory_codes_bit_for_bit(models_dir, layout, method, type_name):
    spec = read_spec(models_dir / layout)
    whole, streamed = LMM(spec), LMM(spec, stream_decoder=True)
    assert all(p.is_meta for p in streamed.llm.model.layers.parameters())
    embeddings = _embeddings(whole)
    assert all(torch.equal(a, b) for a, b in zip(embeddings, _embeddings(streamed)))
    kept = quantize_llm(whole, embeddings, plan_llm(whole.llm, GRIDS[type_name]), method)
    got = quantize_llm(streamed, embeddings, plan_llm(streamed.llm, GRIDS[type_name]), method)
    assert got.tensors.keys() == kept.tensors.keys() and kept.tensors
    for name, q in kept.tensors.items():
        assert torch.equal(got.tensors[name].codes, q.codes), name
        assert torch.equal(got.tensors[name].params.scale, q.params.scale), name
    # what the export reads besides the codes (norms, biases, AWQ's folded scales) is the same too
    kept_state, got_state = whole.llm.state_dict(), streamed.llm.state_dict()
    for name, value in kept_state.items():
        if f"llm.{name}" not in kept.tensors:
            assert torch.equal(got_state[name], value), name


def test_streamed_reference_logits_equal_the_whole_model(models_dir):
    from impq.verify import DEFAULT_PROMPTS, default_images
    from impq.models.preprocess import load_image

    spec = read_spec(models_dir / "imp-phi2")
    whole, streamed = LMM(spec), LMM(spec, stream_decoder=True)
    image = load_image(default_images()[0])
    embeddings = [streamed.prompt_embeddings(image, prompt) for prompt in DEFAULT_PROMPTS[:2]]
    logits = streamed.next_token_logits(embeddings)
    for prompt, got in zip(DEFAULT_PROMPTS[:2], logits):
        assert torch.allclose(got, whole.generate(image, prompt, 1).logits[0], atol=1e-5)
    assert all(p.is_meta for p in streamed.llm.model.layers.parameters())      # released again


MEMORY_DIMS = Dims(hidden=256, layers=64, heads=4, kv_heads=4, intermediate=1024, v_hidden=64, v_intermediate=120,
                   v_heads=2, v_layers_stored=3, image_size=84, patch=14)

PEAK = """
import gc, json, sys
from impq.calib import calibration_embeddings, read_calibration
from impq.defaults import default_calib_data
from impq.models.layouts import read_spec
from impq.models.lmm import LMM
from impq.quant.driver import quantize_llm
from impq.quant.grids import GRIDS
from impq.quant.plan import plan_llm
from impq.memory import map_large_allocations

# every tensor over 128 kB gets its own mapping and goes back to the system when freed, as impq quantize
# arranges for a full-size model's; glibc's heap would otherwise keep this small model's freed blocks resident
map_large_allocations(128 << 10)

def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

spec = read_spec(sys.argv[1])
lmm = LMM(spec, stream_decoder=sys.argv[2] == "stream")
embeddings = calibration_embeddings(lmm, read_calibration(default_calib_data(spec.folder)), 4, 128)
plan = plan_llm(lmm.llm, GRIDS["q4_0"])
gc.collect()
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")      # resets VmHWM, the peak, to the current RSS
result = quantize_llm(lmm, embeddings, plan, "gptq", release_weights=True)
print(json.dumps({"before": before, "peak": status("VmHWM:"), "tensors": len(result.tensors)}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_streaming_peak_memory_is_bounded_by_a_block_not_the_model(tmp_path):
    folder = make_model("imp-phi2", tmp_path / "deep", dims=MEMORY_DIMS)
    h, f, layers = MEMORY_DIMS.hidden, MEMORY_DIMS.intermediate, MEMORY_DIMS.layers
    block_weights = 4 * h * h + 2 * h * f                       # Phi-2: q, k, v, dense, fc1, fc2
    decoder_f32 = 4 * layers * block_weights
    # codes (int8, one byte a weight) of every block, then per block its float32 weights a few times over
    # (the module, GPTQ's working copy, the quantized values) and its Hessians in float64 and float32
    hessians = (5 * h * h + f * f) * (8 + 4)
    bound = layers * block_weights + 4 * 4 * block_weights + 2 * hessians + (48 << 20)
    assert bound < decoder_f32                  # the test tells streaming from holding the decoder

    def run(mode):
        done = subprocess.run([sys.executable, "-c", PEAK, str(folder), mode], capture_output=True, text=True,
                              check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    streamed, whole = run("stream"), run("whole")
    assert streamed["tensors"] == whole["tensors"] == 6 * layers
    assert streamed["peak"] - streamed["before"] < bound
    # the in-memory path holds the whole float32 decoder before the loop even starts
    assert whole["peak"] - streamed["peak"] > decoder_f32 / 2


def test_streamed_quantize_writes_the_in_memory_gguf_byte_for_byte(tmp_path, monkeypatch):
    import impq.quantize as quantize
    from impq.defaults import default_model_dir
    from impq.quantize import quantize_model
    from impq.recipe import Recipe

    settings = Recipe.from_flags(bits=4, method="gptq", calib=str(default_calib_data()))   # a K-quant
    streamed = quantize_model(default_model_dir(), tmp_path / "streamed", settings, verify_items=0)
    monkeypatch.setattr(quantize, "LMM", lambda spec, stream_decoder: LMM(spec))
    whole = quantize_model(default_model_dir(), tmp_path / "whole", settings, verify_items=0)
    for key in ("text_gguf", "mmproj_gguf"):
        assert open(streamed.artifacts[key], "rb").read() == open(whole.artifacts[key], "rb").read(), key
