"""The per-tensor plan: each decoder tensor's grid, fixed before the layer loop, with llama.cpp's width fallbacks;
and the default path users take, `--bits 4` (Q4_K) through GPTQ and llama.cpp, on a model whose widths hold
256-wide blocks."""

from __future__ import annotations

import dataclasses
import json

import gguf
import pytest
from torch import nn

from impq.models.layouts import read_spec
from impq.models.lmm import LMM
from impq.models.testing import SMALL, make_model
from impq.quant.grids import GRIDS
from impq.quant.plan import plan_llm
from impq.runtime.llamacpp import PairRunner
from impq.verify import DEFAULT_PROMPTS, default_images

QT = gguf.GGMLQuantizationType


@pytest.mark.parametrize("requested,fallback", [("q4_k", "Q5_0"), ("q5_k", "Q5_1"), ("q6_k", "Q8_0"),
                                                ("q3_k", "Q4_0"), ("q2_k", "Q4_0"), ("q4_0", "Q4_0")])
def test_width_fallback_is_llama_cpps(models_dir, requested, fallback):
    """SMALL models are 64 wide (MLP 160): no 256-wide K-quant block fits, 32-wide blocks do."""
    lmm = LMM.from_folder(models_dir / "imp-phi2")
    plan = plan_llm(lmm.llm, GRIDS[requested])
    assert {entry.grid.name for entry in plan.values()} == {fallback}
    assert all((entry.fallback is None) == (requested == "q4_0") for entry in plan.values())
    if requested != "q4_0":
        assert "input width 64 is not a multiple of 256" in next(iter(plan.values())).fallback


def test_a_width_that_no_block_fills_stays_float():
    layer = nn.Module()
    layer.proj = nn.Linear(40, 8)
    llm = nn.Module()
    llm.model = nn.Module()
    llm.model.layers = nn.ModuleList([layer])
    entry = plan_llm(llm, GRIDS["q4_k"])["llm.model.layers.0.proj.weight"]
    assert entry.grid is None and "-> float" in entry.fallback


def _calib(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"image": str(i), "prompt": p}) for i in default_images()
                              for p in DEFAULT_PROMPTS) + "\n")
    return path


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_k_quant_on_narrow_widths_falls_back_and_runs(run_cli, models_dir, tmp_path, method):
    """Q4_K on 64-wide layers: written at Q5_0 (they stayed F16 before, and AWQ ended in a traceback), reported."""
    out = tmp_path / "out"
    status, stdout, err = run_cli("quantize", models_dir / "imp-phi2", "--bits", "4", "--method", method, "--calib",
                                  _calib(tmp_path), "--nsamples", "4", "--out", out, "--verify-items", "0", "--json")
    assert status == 0, err
    report = json.loads(next(out.glob("*.report.json")).read_text())
    assert set(report["tensor_types"].values()) == {"Q5_0"} and len(report["fallbacks"]) == len(report["layers"])
    text = next(p for p in out.glob("*.gguf") if not p.name.startswith("mmproj-"))
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(text).tensors}
    assert all(types[f"blk.{i}.{n}.weight"] == QT.Q5_0 for i in range(2) for n in ("attn_q", "ffn_up", "ffn_down"))
    assert report["bits_per_weight_quantized"] == pytest.approx(5.5)
    with PairRunner(text, next(out.glob("mmproj-*.gguf"))) as runner:
        assert runner.run(None, "hello", 2).tokens


def test_default_bits_4_is_q4_k_through_gptq_and_llama_cpp(run_cli, tmp_path):
    """The default path on a model whose every input width holds 256-wide blocks: every decoder tensor Q4_K, and
    the written pair agrees with the full-precision model in llama.cpp."""
    dims = dataclasses.replace(SMALL, hidden=256, intermediate=512, heads=4, kv_heads=4)
    model = make_model("imp-llava-phi2", tmp_path / "model", dims=dims)
    out = tmp_path / "out"
    status, stdout, err = run_cli("quantize", model, "--bits", "4", "--calib", _calib(tmp_path), "--nsamples", "6",
                                  "--out", out, "--json")
    assert status == 0, err
    summary = json.loads(stdout)
    assert summary["settings"]["target"]["type"] == "q4_k" and summary["settings"]["method"]["name"] == "gptq"
    assert set(summary["tensor_types"].values()) == {"Q4_K"} and summary["fallbacks"] == {}
    assert summary["bits_per_weight_quantized"] == pytest.approx(4.5)
    text = next(p for p in out.glob("*.gguf") if not p.name.startswith("mmproj-"))
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(text).tensors}
    spec = read_spec(model)
    assert all(types[f"blk.{i}.{n}.weight"] == QT.Q4_K for i in range(spec.text_config.num_hidden_layers)
               for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_up", "ffn_down"))
    assert summary["verification"]["runtime"] == "llama.cpp"
    assert summary["verification"]["top1_agreement"] >= 0.8 and summary["verification"]["mean_kld"] < 0.05


def test_tensor_type_overrides_last_match_wins(run_cli, models_dir, tmp_path):
    out = tmp_path / "out"
    status, _, err = run_cli("quantize", models_dir / "imp-phi2", "--type", "q4_0", "--method", "rtn", "--calib",
                             _calib(tmp_path), "--nsamples", "2", "--out", out, "--verify-items", "0",
                             "--tensor-type", r"attn_.*=q5_0", "--tensor-type", r"attn_v=Q8_0",
                             "--tensor-type", r"blk\.1\.ffn_down=q6_k")
    assert status == 0, err
    text = next(p for p in out.glob("*.gguf") if not p.name.startswith("mmproj-"))
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(text).tensors}
    assert [types[f"blk.0.{n}.weight"] for n in ("attn_q", "attn_k", "attn_v", "ffn_up", "ffn_down")] == \
        [QT.Q5_0, QT.Q5_0, QT.Q8_0, QT.Q4_0, QT.Q4_0]
    assert types["blk.1.ffn_down.weight"] == QT.Q8_0            # q6_k's width fallback, as llama.cpp's
    report = json.loads(next(out.glob("*.report.json")).read_text())
    assert list(report["fallbacks"]) == ["llm.model.layers.1.mlp.fc2.weight"]
    with PairRunner(text, next(out.glob("mmproj-*.gguf"))) as runner:
        assert runner.run(None, "hello", 2).tokens


@pytest.mark.parametrize("args,needle", [
    (["--tensor-type", "attn_zz=q8_0"], "attn_zz"),
    (["--tensor-type", "attn_v=q9_9"], "q9_9"),
    (["--tensor-type", "attn_v"], "REGEX=TYPE"),
    (["--tensor-type", "attn_v(=q8_0"], "regular expression"),
    # safetensors overrides name integer widths (compressed-tensors' mixed config groups)
    (["--format", "safetensors", "--tensor-type", "attn_v=q8_0"], "int2, int3, int4"),
])
def test_bad_overrides_are_one_line_errors(run_cli, models_dir, tmp_path, args, needle):
    status, _, err = run_cli("quantize", models_dir / "imp-phi2", "--calib", _calib(tmp_path), "--out",
                             tmp_path / "out", *args)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("impq: error: ") and needle in lines[0], err
    assert not (tmp_path / "out").exists()
