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
