"""The phone fit on published measurements: device peaks, reference costs, the fit and its leave-one-out band."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from impq.defaults import default_model_dir
from impq.recipe import export_with_recipe
from impq.measure.phone import DEVICES, Efficiency, KernelRates, ModelCost, estimate
from impq.measure.phone_fit import KERNEL_RATES, KINDS, PHONE_FIT, REFERENCES, Reference, decoder_cost, fit_phones
from impq.models.layouts import read_spec


def test_peak_counts_the_fastest_cores_the_threads_use():
    sd888 = DEVICES["snapdragon-888"]
    assert sd888.peak_gflops(1) == pytest.approx(2.84 * 32)
    assert sd888.peak_gflops(4) == pytest.approx(2.84 * 32 + 3 * 2.42 * 16)
    assert sd888.peak_gflops() == pytest.approx(2.84 * 32 + 3 * 2.42 * 16 + 4 * 1.8 * 8)
    assert sd888.peak_gflops(20) == sd888.peak_gflops()


def test_decoder_cost_matches_the_published_parameter_counts():
    # Qwen3-1.7B's model card: 1.7B parameters, 1.4B of them outside the (tied) embedding
    qwen = decoder_cost(28, 2048, 6144, 1024, 151936, True, "q4_0")
    head = 151936 * 2048
    assert qwen.text_matmul_params == pytest.approx(1.72e9, rel=0.01)
    assert qwen.text_matmul_params - head == pytest.approx(1.41e9, rel=0.01)
    # Q4_0 blocks everywhere but the tied head, which llama.cpp writes at Q6_K
    assert qwen.text_bytes_per_token == pytest.approx(((qwen.text_matmul_params - head) * 4.5 + head * 6.5625) / 8)
    q8 = decoder_cost(28, 2048, 6144, 1024, 151936, True, "q8_0")
    assert q8.text_bytes_per_token == pytest.approx(qwen.text_matmul_params * 8.5 / 8)
    # Q4_K_M: Q6_K for attn_v and ffn_down in 12 of 24 layers (layers 0-2, 21-23 and every third between)
    k_m = decoder_cost(24, 2048, 5632, 2048, 32000, False, "q4_k_m")
    plain = decoder_cost(24, 2048, 5632, 2048, 32000, False, "q4_0")
    extra = 12 * (2048 * 2048 + 2048 * 5632) * (6.5625 - 4.5) / 8
    assert k_m.text_bytes_per_token == pytest.approx(plain.text_bytes_per_token + extra)


def _synthetic(eff: Efficiency, device: str, cost: ModelCost) -> Reference:
    """A reference whose figures the roofline produces exactly at `eff`."""
    d = DEVICES[device]
    est = estimate(cost, d.bandwidth_gbs, d.peak_gflops(4), eff, prompt_text_tokens=100 - cost.llm_image_tokens)
    return Reference(device, "synthetic", cost, "test", decode_tokens_per_s=est.decode_tokens_per_s,
                     prompt_tokens_per_s=100 / (est.ttft_s - est.image_encode_s), prompt_tokens=100,
                     prompt_threads=4, image_encode_s=est.image_encode_s, image_threads=4)


def test_fit_recovers_a_known_efficiency_with_zero_leave_one_out_error():
    eff = Efficiency(0.3, 0.2, 0.1)
    cost = ModelCost(8e8, 1.3e9, 24, 2048, 3e8, 23, 1024, 64, pooled=True)
    refs = tuple(_synthetic(eff, device, cost) for device in ("snapdragon-888", "snapdragon-778g", "dimensity-9300"))
    fit = fit_phones(refs)
    assert dataclasses.astuple(fit.efficiency) == pytest.approx(dataclasses.astuple(eff))
    assert fit.band == pytest.approx({kind: 1.0 for kind in KINDS})
    assert all(abs(row["error_pct"]) < 1e-9 for rows in fit.leave_one_out.values() for row in rows)


def test_leave_one_out_predicts_each_reference_from_the_others():
    cost = ModelCost(8e8, 1.3e9, 24, 2048, 3e8, 23, 1024, 64, pooled=True)
    slow, fast = (_synthetic(Efficiency(e, e, e), "snapdragon-888", cost) for e in (0.1, 0.4))
    fit = fit_phones((slow, fast))
    assert fit.efficiency.decode == pytest.approx(0.2)                  # geometric mean of 0.1 and 0.4
    decode = fit.leave_one_out["decode"]
    assert decode[0]["error_pct"] == pytest.approx(300.0)               # slow predicted from fast: 4x
    assert decode[1]["error_pct"] == pytest.approx(-75.0)
    vision = fit.leave_one_out["vision"]                                # a time: the slow one is predicted 4x faster
    assert vision[0]["predicted"] == pytest.approx(vision[0]["measured"] / 4)
    assert fit.band["decode"] == pytest.approx(4.0)                     # both log errors are log 4


def test_the_shipped_fit_covers_six_device_model_points_with_sources():
    points = {(r.device, r.model) for r in REFERENCES}
    assert len(points) >= 6
    assert sum(r.decode_tokens_per_s is not None for r in REFERENCES) >= 6
    # PocketPal's Q4_0 and Q4_K_M prompt figures set the kernel rates, so only its Q8_0 one is a prompt reference
    assert sum(r.prompt_tokens_per_s is not None for r in REFERENCES) >= 4
    images = [r for r in REFERENCES if r.image_encode_s is not None]
    assert len(images) >= 4 and any(r.cost.vision_hidden == 1152 for r in images)     # a SigLIP tower among them
    assert all("https://" in r.source for r in REFERENCES)
    assert all(r.device in DEVICES for r in REFERENCES)
    for kind in KINDS:
        assert 1.0 < PHONE_FIT.band[kind] < 10 and math.isfinite(PHONE_FIT.band[kind])
        assert 0 < getattr(PHONE_FIT.efficiency, kind) < 1


def test_phone_estimate_is_the_roofline_at_the_fitted_efficiency_with_its_band():
    cost = ModelCost(1.6e9, 2.7e9, 32, 2560, 4e8, 26, 1152, 196)
    device = DEVICES["snapdragon-8-gen-3"]
    est = PHONE_FIT.estimate(cost, device, prompt_text_tokens=40)
    decode = est["decode_tokens_per_s"]
    assert decode["value"] == pytest.approx(PHONE_FIT.efficiency.decode * device.bandwidth_gbs * 1e9 / 1.6e9)
    assert decode["high"] == pytest.approx(decode["value"] * PHONE_FIT.band["decode"])
    assert decode["low"] == pytest.approx(decode["value"] / PHONE_FIT.band["decode"])
    for figure in est.values():
        assert figure["low"] < figure["value"] < figure["high"]


def test_estimate_command_prints_ranges(run_cli, tmp_path):
    pair = export_with_recipe(read_spec(default_model_dir()), tmp_path, "q8_0")
    status, out, err = run_cli("estimate", "--text", pair.text_path, "--mmproj", pair.mmproj_path,
                               "--device", "snapdragon-8-gen-3", "--json")
    assert status == 0, err
    row = json.loads(out)["estimates"]["snapdragon-8-gen-3"]
    assert row["ttft_s"]["low"] < row["ttft_s"]["value"] < row["ttft_s"]["high"]


def test_default_estimate_is_the_committed_imp_v1_5_3b_196_figure(run_cli):
    from impq.defaults import REPO

    status, out, err = run_cli("estimate", "--device", "snapdragon-8-gen-3", "--json")
    assert status == 0, err
    committed = json.loads((REPO / "bench" / "results" / "phone_fit.json").read_text())
    got = json.loads(out)["estimates"]["snapdragon-8-gen-3"]
    for figure, expected in committed["imp_v1_5_3b_estimates"]["196"].items():
        assert got[figure] == pytest.approx(expected), figure


def _tower(by_type: dict, weight_bytes: float = 0.0) -> ModelCost:
    return ModelCost(1e9, 1e9, 24, 2048, sum(by_type.values()), 26, 1152, 729,
                     vision_matmul_by_type=tuple(by_type.items()), vision_weight_bytes=weight_bytes)


def test_the_encode_estimate_follows_the_towers_tensor_types():
    eff, rates = Efficiency(0.3, 0.4, 0.1), KernelRates({"Q8_0": 1.0, "Q4_K": 0.5}, unmeasured=0.25, source="test")
    f16, q8, q4k, q5 = (_tower({t: 4e8}) for t in ("F16", "Q8_0", "Q4_K", "Q5_0"))
    attention = 2 * 2 * 26 * 1152 * 729 ** 2 / 0.1
    seconds = {name: cost.vision_s(100.0, eff, rates) * 100e9 - attention
               for name, cost in {"f16": f16, "q8": q8, "q4k": q4k, "q5": q5}.items()}
    matmul = 2 * 4e8 * 729
    assert seconds["f16"] == pytest.approx(matmul / 0.1)          # float matrices: the image efficiency
    assert seconds["q8"] == pytest.approx(matmul / 0.4)           # Q8_0: the prompt efficiency itself
    assert seconds["q4k"] == pytest.approx(matmul / (0.4 * 0.5))
    assert seconds["q5"] == pytest.approx(matmul / (0.4 * 0.25))  # unmeasured: the stated fallback rate
    mixed = _tower({"Q8_0": 3e8, "F16": 1e8})                     # fallbacks stay F16 and are costed as F16
    assert mixed.vision_s(100.0, eff, rates) * 100e9 - attention == pytest.approx(2 * 729 * (3e8 / 0.4 + 1e8 / 0.1))
    # the weights are read at least once per image: a tower whose bytes dominate is bandwidth-bound
    heavy = _tower({"Q8_0": 4e8}, weight_bytes=1e12)
    assert heavy.vision_s(100.0, eff, rates, bandwidth_gbs=50.0) == pytest.approx(1e12 / (50e9 * 0.3))


def test_a_quantized_mmproj_is_estimated_from_its_files_types(tmp_path):
    from impq.recipe import export_with_recipe as export

    spec = read_spec(default_model_dir())
    pairs = {t: export(spec, tmp_path / t, t, t) for t in ("f16", "q8_0")}
    costs = {t: ModelCost.from_gguf_pair(p.text_path, p.mmproj_path) for t, p in pairs.items()}
    assert dict(costs["f16"].vision_matmul_by_type).keys() == {"F16"}
    assert "Q8_0" in dict(costs["q8_0"].vision_matmul_by_type)
    assert costs["q8_0"].vision_weight_bytes < costs["f16"].vision_weight_bytes
    device = DEVICES["snapdragon-8-gen-3"]
    encode = {t: PHONE_FIT.estimate(c, device, 40)["image_encode_s"]["value"] for t, c in costs.items()}
    # the fit's quantized kernels are faster than its float ones: a Q8_0 tower encodes sooner
    assert PHONE_FIT.efficiency.prefill * KERNEL_RATES.rate("Q8_0") > PHONE_FIT.efficiency.vision
    assert encode["q8_0"] < encode["f16"]
