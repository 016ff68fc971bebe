"""`impq sensitivity`: per tensor group (tensors that read one input), the mean KLD when only that group is
quantized, per candidate type; JSON and PNG; bad input is one line and writes nothing."""

from __future__ import annotations

import json

import pytest

from impq.defaults import default_eval_data


def test_sensitivity_of_each_group_and_type(run_cli, models_dir, tmp_path):
    out = tmp_path / "out"
    status, stdout, err = run_cli("sensitivity", models_dir / "imp-phi2", "--types", "q2_k,q4_0,Q8_0", "--method",
                                  "rtn", "--data", default_eval_data(), "--limit", "6", "--nsamples", "4", "--out", out,
                                  "--json")
    assert status == 0, err
    record = json.loads(stdout)
    assert json.loads((out / "sensitivity.json").read_text()) == record
    assert (out / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    groups = record["groups"]
    # Phi-2's parallel block: q, k, v and fc1 read the same layernorm output; dense and fc2 read their own
    assert [g["kind"] for g in groups[:3]] == ["q_proj+k_proj+v_proj+fc1", "dense", "fc2"] and len(groups) == 6
    assert all(set(g["kld"]) == {"q2_k", "q4_0", "q8_0"} and min(g["kld"].values()) >= 0 for g in groups)
    assert groups[0]["written_as"] == {"q2_k": "Q4_0", "q4_0": "Q4_0", "q8_0": "Q8_0"}   # 64 wide: Q2_K's fallback
    # fewer bits move the distribution more, for every group
    assert all(g["kld"]["q4_0"] > g["kld"]["q8_0"] for g in groups)
    # the cheaper figures' rank correlation: over the 8-bit pairs (Q2_K falls back to the reference Q4_0 here)
    correlation = record["proxy_rank_correlation"]
    assert correlation["reference_type"] == "q4_0" and correlation["pairs"] == len(groups)
    assert -1 <= correlation["output_error"] <= 1 and -1 <= correlation["scaled_kld"] <= 1


@pytest.mark.parametrize("args,needle", [
    (["--types", "q9_9"], "q9_9"),
    (["--types", "q4_k", "--method", "awq"], "--method awq"),
    (["--types", ""], "at least one"),
])
def test_bad_sensitivity_input(run_cli, models_dir, tmp_path, args, needle):
    status, _, err = run_cli("sensitivity", "--out", tmp_path / "out", *args)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("impq: error: ") and needle in lines[0], err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_needs_measurement_data(run_cli, models_dir, tmp_path):
    status, _, err = run_cli("sensitivity", models_dir / "imp-phi2", "--out", tmp_path / "out")
    assert status == 2 and "--data" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout", ["imp-phi2", "imp-qwen2", "imp-phi3", "llava-siglip"])
def test_a_group_is_measured_from_its_own_layer(models_dir, layout):
    """The measurement runs layer i onward from the cached full-precision inputs: unchanged, that is the full
    model's distribution at every layer (KLD 0); a quantized group moves it."""
    from impq.calib import calibration_embeddings, read_calibration
    from impq.models.lmm import LMM
    from impq.measure.sensitivity import Reference, measure_sensitivity, read_measurement
    from impq.defaults import default_calib_data

    lmm = LMM.from_folder(models_dir / layout)
    measurements = read_measurement(lmm, default_eval_data(), 3)
    reference = Reference(lmm, measurements)
    assert all(abs(reference.mean_kld(i)) < 1e-9 for i in range(len(lmm.llm.model.layers)))
    calib = calibration_embeddings(lmm, read_calibration(default_calib_data()), 4, 512)
    scaled = measure_sensitivity(lmm, calib, measurements, ["q4_0", "q8_0"], "rtn", reference_type="q4_0")
    full = measure_sensitivity(lmm, calib, measurements, ["q4_0", "q8_0"], "rtn")
    for s, f in zip(scaled, full):
        assert s.measured == ["q4_0"] and f.measured == ["q4_0", "q8_0"]
        assert s.kld["q4_0"] == f.kld["q4_0"] > 0 and s.output_error == f.output_error
        # scaled by the output error: the 8-bit figure is the 4-bit one times their error ratio
        assert s.kld["q8_0"] == pytest.approx(f.kld["q4_0"] * f.output_error["q8_0"] / f.output_error["q4_0"])


def test_text_measurement_compares_every_position(models_dir, tmp_path):
    from impq.models.lmm import LMM
    from impq.measure.sensitivity import read_measurement

    text = tmp_path / "measure.txt"
    text.write_text("A first paragraph of plain text.\n\nAnd a second one, a little longer than the first.\n")
    lmm = LMM.from_folder(models_dir / "llava-siglip")
    measurements = read_measurement(lmm, text, 8)
    assert len(measurements) == 2 and all(m.first == 0 and m.embeds.shape[1] > 4 for m in measurements)
    assert [m.embeds.shape[1] for m in read_measurement(lmm, text, 1, from_end=True)] == [measurements[1].embeds.shape[1]]


def test_vision_side_sensitivity(run_cli, models_dir, tmp_path):
    """--vision: the tower's and projector's groups, measured through images."""
    out = tmp_path / "out"
    status, stdout, err = run_cli("sensitivity", models_dir / "llava-siglip", "--types", "q4_0,q8_0", "--method",
                                  "rtn", "--data", default_eval_data(), "--limit", "4", "--nsamples", "4",
                                  "--vision", "--out", out, "--json")
    assert status == 0, err
    groups = json.loads(stdout)["groups"]
    vision = [g for g in groups if g["kind"].startswith("vision:")]
    projector = [g for g in groups if g["kind"].startswith("projector:")]
    assert [g["kind"] for g in projector] == ["projector:0", "projector:2"]
    # the layers the selected feature needs (vision_feature_layer -2 of 3 stored: layers 0 and 1)
    assert sorted({g["layer"] for g in vision}) == [0, 1] and all(g["layer"] == 2 for g in projector)
    attention = [g for g in vision if "q_proj" in g["kind"]]
    assert len(attention) == 2 and all(sorted(t.split(".")[-2] for t in g["tensors"]) == ["k_proj", "q_proj", "v_proj"]
                                       for g in attention)
    for g in vision + projector:
        assert g["tensors"][0].startswith(("vision.vision_model.encoder.layers.", "projector."))
        if g["written_as"]["q4_0"] == "float":          # fc2 reads 120 columns: no 32-wide block fits, it stays float
            assert g["kind"] == "vision:fc2" and g["kld"]["q4_0"] == 0
        else:
            assert g["kld"]["q4_0"] > g["kld"]["q8_0"] > 0
    assert (out / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_vision_sensitivity_needs_images(run_cli, models_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("Some text.\n\nMore text here.\n")
    status, _, err = run_cli("sensitivity", models_dir / "llava-siglip", "--data", text, "--vision",
                             "--out", tmp_path / "out")
    assert status == 2 and "--vision" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
