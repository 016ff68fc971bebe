"""`impq bench` and the roofline phone model."""

from __future__ import annotations

import json
import math

import pytest

from impq.defaults import default_model_dir
from impq.recipe import export_with_recipe
from impq.measure.phone import Efficiency, ModelCost, estimate, fit_efficiency
from impq.models.layouts import read_spec


def test_bench_reports_positive_finite_figures(run_cli):
    status, out, err = run_cli("bench", "--runs", "2", "--warmup", "1", "--decode-tokens", "6", "--json")
    assert status == 0, err
    figures = json.loads(out)
    for key in ("image_encode_s", "prefill_s", "ttft_s", "prompt_tokens_per_s", "decode_tokens_per_s"):
        for stat in ("median", "min", "max"):
            assert math.isfinite(figures[key][stat]) and figures[key][stat] > 0, key
    assert figures["prompt_tokens"] > 144 and figures["peak_rss_mb"] > 0
    assert figures["text_gguf_mb"] > 1 and figures["mmproj_gguf_mb"] > 1


def test_roofline_hand_computed_case():
    cost = ModelCost(text_bytes_per_token=2e9, text_matmul_params=1e9, text_layers=2, text_hidden=100,
                     vision_matmul_params=1e8, vision_layers=1, vision_hidden=10, vision_tokens=4)
    est = estimate(cost, bandwidth_gbs=50, peak_gflops=100, eff=Efficiency(0.5, 0.25, 0.5), prompt_text_tokens=6)
    # decode: 2e9 bytes / (50e9 B/s * 0.5) = 0.08 s -> 12.5 tokens/s
    assert est.decode_tokens_per_s == pytest.approx(12.5)
    # prefill of 10 tokens: 2*1e9*10 + 2*2*2*100*10*10/2 = 2e10 + 4e4 FLOPs at 25 GFLOP/s = 0.8000016 s
    assert est.prefill_tokens_per_s == pytest.approx(10 / 0.8000016)
    # vision: 2*1e8*4 + 2*2*1*10*4*4 = 8e8 + 640 FLOPs at 50 GFLOP/s = 0.0160000128 s
    assert est.image_encode_s == pytest.approx(0.0160000128)
    assert est.ttft_s == pytest.approx(0.0160000128 + 0.8000016)


def test_fit_recovers_the_efficiency_it_came_from():
    cost = ModelCost(1e9, 5e8, 4, 256, 1e7, 4, 192, 144)
    eff = Efficiency(0.6, 0.3, 0.2)
    est = estimate(cost, 40, 200, eff, prompt_text_tokens=30)
    bench = {"decode_tokens_per_s": {"median": est.decode_tokens_per_s}, "prompt_tokens": 174,
             "prefill_s": {"median": est.ttft_s}, "image_encode_s": {"median": est.image_encode_s}}
    fitted = fit_efficiency(cost, bench, 40, 200)
    assert (fitted.decode, fitted.prefill, fitted.vision) == pytest.approx((0.6, 0.3, 0.2))


def test_model_cost_counts_the_exported_weights(tmp_path):
    spec = read_spec(default_model_dir())
    result = export_with_recipe(spec, tmp_path, "f16")
    cost = ModelCost.from_gguf_pair(result.text_path, result.mmproj_path)
    cfg = spec.text_config
    h, f, layers, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    assert cost.text_matmul_params == layers * (4 * h * h + 2 * h * f) + vocab * h   # blocks + output head
    assert cost.vision_tokens == 144 and cost.text_layers == layers


def test_llama_cpp_device_resolution(monkeypatch):
    """--device auto offloads everything where the build can, cpu nothing; --gpu-layers overrides; gpu on a build
    without a GPU backend is a one-line error naming the option."""
    import llama_cpp

    from impq.errors import ImpqError
    from impq.runtime.llamacpp import resolve_gpu_layers

    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: False)
    assert resolve_gpu_layers("auto") == 0 and resolve_gpu_layers("cpu") == 0
    assert resolve_gpu_layers("cpu", 7) == 7
    for device, layers, needle in (("gpu", None, "--device gpu"), ("tpu", None, "--device tpu"),
                                   ("auto", -2, "--gpu-layers -2")):
        with pytest.raises(ImpqError, match=needle):
            resolve_gpu_layers(device, layers)
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: True)
    assert resolve_gpu_layers("auto") == -1 and resolve_gpu_layers("gpu") == -1 and resolve_gpu_layers("cpu") == 0


def test_bench_records_where_llama_cpp_ran(run_cli):
    """On this CPU build every layer asked for still runs on the CPU, and the record says so."""
    import llama_cpp

    code, out, err = run_cli("bench", "--runs", "1", "--warmup", "0", "--decode-tokens", "2", "--gpu-layers", "-1",
                             "--json")
    assert code == 0, err
    backend = json.loads(out)["backend"]
    on_gpu = bool(llama_cpp.llama_supports_gpu_offload())
    assert backend["device"] == ("gpu" if on_gpu else "cpu") and backend["gpu_layers"] == (-1 if on_gpu else 0)
    assert backend["repack"] is True                      # the F16 export needs no probe
    code, _, err = run_cli("bench", "--device", "gpu")
    if not on_gpu:
        assert code == 2 and err.startswith("impq: error: --device gpu") and len(err.strip().splitlines()) == 1
