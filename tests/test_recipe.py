"""Recipes: a run writes its recipe, the recipe re-run from another folder gives every file bit for bit, no
machine path is in any artifact, `impq reproduce --check` fails when one byte differs, and bad recipes are
one-line errors that write nothing."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from impq.defaults import REPO
from impq.verify import DEFAULT_PROMPTS, default_images

SCHEMA_1 = REPO / "tests" / "golden" / "recipes-schema-1"   # recipe files as impq wrote them before schema 2


def _inputs(root, models_dir):
    """A checkpoint and a calibration set (JSONL + images by relative path) under `root`."""
    model = shutil.copytree(models_dir / "imp-phi2", root / "model")
    (root / "images").mkdir()
    lines = []
    for image in default_images():
        shutil.copy(image, root / "images" / image.name)
        lines += [json.dumps({"image": f"images/{image.name}", "prompt": p}) for p in DEFAULT_PROMPTS]
    (root / "calib.jsonl").write_text("\n".join(lines) + "\n")
    return model, root / "calib.jsonl"


def _quantize(run_cli, monkeypatch, cwd, *args):
    monkeypatch.chdir(cwd)
    status, out, err = run_cli("quantize", *args, "--verify-items", "0", "--json")
    assert status == 0, err
    return json.loads(out)


@pytest.fixture
def first_run(run_cli, monkeypatch, models_dir, tmp_path):
    model, calib = _inputs(tmp_path / "a", models_dir)
    summary = _quantize(run_cli, monkeypatch, tmp_path / "a", model, "--type", "q4_0", "--method", "gptq", "--calib",
                        calib, "--nsamples", "6", "--tensor-type", "attn_v=q8_0", "--out", tmp_path / "a" / "out")
    return tmp_path, summary


def test_a_recipe_rerun_from_another_folder_gives_the_same_bytes(run_cli, monkeypatch, models_dir, first_run):
    tmp_path, summary = first_run
    recipe_path = tmp_path / "a" / "out" / "model-Q4_0-gptq.recipe.yaml"
    recipe = yaml.safe_load(recipe_path.read_text())
    assert recipe["schema_version"] == 2 and recipe["model"] == "model" and recipe["calibration"]["data"] == "calib.jsonl"
    assert recipe["overrides"] == ["attn_v=q8_0"] and recipe["resolved"]["device"] == "cpu"
    assert recipe["resolved"]["tensor_types"]["llm.model.layers.0.self_attn.v_proj.weight"] == "Q8_0"
    assert set(recipe["resolved"]["versions"]) == {"impq", "torch", "transformers", "gguf", "llama-cpp-python"}
    assert set(recipe["outputs"]) == {"model-Q4_0-gptq.gguf", "mmproj-model-Q4_0-gptq.gguf"}
    for name in recipe["outputs"]:                               # no machine path in any artifact's bytes
        data = (tmp_path / "a" / "out" / name).read_bytes()
        assert str(tmp_path).encode() not in data and b"/work/" not in data

    model, calib = _inputs(tmp_path / "b", models_dir)
    _quantize(run_cli, monkeypatch, tmp_path / "b", model, "--recipe", recipe_path, "--calib", calib,
              "--out", tmp_path / "b" / "out")
    for name in recipe["outputs"]:
        assert (tmp_path / "b" / "out" / name).read_bytes() == (tmp_path / "a" / "out" / name).read_bytes(), name
    rerun = yaml.safe_load((tmp_path / "b" / "out" / recipe_path.name).read_text())
    assert rerun["outputs"] == recipe["outputs"] and rerun["resolved"]["flags_over_recipe"] == []


def test_flags_beside_a_recipe_override_it_and_are_recorded(run_cli, monkeypatch, first_run):
    tmp_path, _ = first_run
    recipe_path = tmp_path / "a" / "out" / "model-Q4_0-gptq.recipe.yaml"
    _quantize(run_cli, monkeypatch, tmp_path, tmp_path / "a" / "model", "--recipe", recipe_path, "--calib",
              tmp_path / "a" / "calib.jsonl", "--type", "q5_0", "--out", tmp_path / "c")
    rerun = yaml.safe_load(next((tmp_path / "c").glob("*.recipe.yaml")).read_text())
    assert rerun["target"]["type"] == "q5_0"
    assert rerun["method"]["name"] == "gptq" and rerun["overrides"] == ["attn_v=q8_0"]
    assert rerun["resolved"]["flags_over_recipe"] == ["type"]


def test_reproduce_check_passes_then_fails_on_one_byte(run_cli, first_run):
    tmp_path, _ = first_run
    out = tmp_path / "a" / "out"
    args = ("reproduce", out, "--model", tmp_path / "a" / "model", "--calib", tmp_path / "a" / "calib.jsonl",
            "--check", "--json")
    status, stdout, err = run_cli(*args)
    assert status == 0, err
    assert json.loads(stdout)["identical"] is True
    text = out / "model-Q4_0-gptq.gguf"
    data = bytearray(text.read_bytes())
    data[len(data) // 2] ^= 0x01
    text.write_bytes(bytes(data))
    status, stdout, err = run_cli(*args)
    assert status == 1
    rows = {r["file"]: r for r in json.loads(stdout)["files"]}
    assert rows["model-Q4_0-gptq.gguf"]["present_matches"] is False and rows["model-Q4_0-gptq.gguf"]["rerun_matches"]
    assert rows["mmproj-model-Q4_0-gptq.gguf"]["present_matches"] is True
    assert "model-Q4_0-gptq.gguf" in err


BAD_SCHEMA_2 = [
    (lambda r: r["target"].update(type="q9_9"), "q9_9"),
    (lambda r: r.update(schema_version=3), "schema_version 3 is newer"),
    (lambda r: r["method"].update(colour="red"), "'colour'"),
    (lambda r: r.update(overrides=["attn_zz=q8_0"]), "attn_zz"),
    # a key at the wrong level, and values the command line would refuse: the same rules
    (lambda r: r.update(tensor_types=["attn_v=q6_k"]), "'tensor_types' is unknown at the top level"),
    (lambda r: r["calibration"].update(nsamples=0), "nsamples 0: at least 1"),
    (lambda r: r["calibration"].update(nsamples="8"), "nsamples '8': expected int"),
    (lambda r: r["method"].update(act_order="yes"), "act_order 'yes': expected bool"),
    (lambda r: r.update(overrides="attn_v=q6_k"), "tensor_types 'attn_v=q6_k': expected list"),
    (lambda r: r["target"].update(format="onnx"), "'onnx'"),
    (lambda r: r.update(budget={"target_bpw": 4.5, "target_size": 1000}), "give one budget"),
    (lambda r: r.update(budget={"sensitivity": "scaled"}), "a budget needs --target-bpw or --target-size"),
]
# the schema-1 layout (a flat `quantize` section), read through the migration under the same rules
BAD_SCHEMA_1 = [
    (lambda r: r["quantize"].update(type="q9_9"), "q9_9"),
    (lambda r: r.update(schema_version=3), "schema_version 3 is newer"),
    (lambda r: r["quantize"].update(colour="red"), "'colour'"),
    (lambda r: r["quantize"].update(tensor_types=["attn_zz=q8_0"]), "attn_zz"),
    (lambda r: r.update(tensor_types=["attn_v=q6_k"]), "'tensor_types' is unknown at the top level"),
    (lambda r: r["quantize"].update(nsamples=0), "nsamples 0: at least 1"),
    (lambda r: r["quantize"].update(nsamples="8"), "nsamples '8': expected int"),
    (lambda r: r["quantize"].update(act_order="yes"), "act_order 'yes': expected bool"),
    (lambda r: r["quantize"].update(tensor_types="attn_v=q6_k"), "tensor_types 'attn_v=q6_k': expected list"),
]


@pytest.mark.parametrize("schema,change,needle", [(2, *case) for case in BAD_SCHEMA_2] +
                         [(1, *case) for case in BAD_SCHEMA_1])
def test_bad_recipes_are_one_line_errors(run_cli, monkeypatch, first_run, schema, change, needle):
    tmp_path, _ = first_run
    source = tmp_path / "a" / "out" / "model-Q4_0-gptq.recipe.yaml" if schema == 2 else SCHEMA_1 / "imp-tiny.yaml"
    recipe = yaml.safe_load(source.read_text())
    change(recipe)
    bad = tmp_path / "bad.recipe.yaml"
    bad.write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path)
    status, _, err = run_cli("quantize", tmp_path / "a" / "model", "--recipe", bad, "--calib",
                             tmp_path / "a" / "calib.jsonl", "--out", tmp_path / "never")
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("impq: error: ") and needle in lines[0], err
    assert not (tmp_path / "never").exists()


def test_shipped_imp_tiny_recipe_is_the_readme_job():
    from impq.defaults import REPO, default_model_dir
    from impq.recipe import Recipe, recipe_run

    model, settings = recipe_run(REPO / "recipes" / "imp-tiny.yaml", None, None, {})
    assert model == default_model_dir()
    assert settings == Recipe.from_flags(bits=4, method="gptq") == Recipe()


@pytest.mark.parametrize("recipe,layout,tensors", [
    ("phi2-q4_k_m.yaml", "imp-llava-phi2", ["self_attn.v_proj", "mlp.fc2"]),
    ("qwen2-q4_k_m.yaml", "imp-qwen2", ["self_attn.v_proj", "mlp.down_proj"]),
    ("phi3-q4_k_m.yaml", "imp-phi3", ["self_attn.qkv_proj", "mlp.down_proj"]),
])
def test_shipped_family_recipes_plan_llama_cpps_q4_k_m_rule(models_dir, recipe, layout, tensors):
    from impq.defaults import REPO
    from impq.export.gguf_file import QType
    from impq.export.gguf_text import text_tensors
    from impq.models.layouts import read_spec
    from impq.models.lmm import LMM
    from impq.quant.plan import plan_llm
    from impq.recipe import recipe_run

    model, settings = recipe_run(REPO / "recipes" / recipe, models_dir / layout, None, {})
    spec = read_spec(model)
    aliases = {t.canonical: t.name for t in text_tensors(spec, QType.F16)}
    plan = plan_llm(LMM(spec).llm, settings.grid(), settings.tensor_overrides(), aliases)
    for layer in (0, 1):                                 # both layers of a 2-layer model are "more bits" layers
        for name in tensors:
            entry = plan[f"llm.model.layers.{layer}.{name}.weight"]
            assert entry.requested.name == "Q6_K" and entry.grid.name == "Q8_0"   # 64 wide: Q6_K's fallback
    others = [e for n, e in plan.items() if not any(t in n for t in tensors)]
    assert others and all(e.requested.name == "Q4_K" for e in others)


def test_a_recipe_that_is_not_yaml_is_one_line(run_cli, monkeypatch, first_run):
    tmp_path, _ = first_run
    bad = tmp_path / "broken.recipe.yaml"
    bad.write_text("schema_version: 1\nquantize:\n  method: gptq\n  type: [q4_0\n  nsamples: 8\n")
    monkeypatch.chdir(tmp_path)
    status, _, err = run_cli("quantize", tmp_path / "a" / "model", "--recipe", bad, "--calib",
                             tmp_path / "a" / "calib.jsonl", "--out", tmp_path / "never")
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith(f"impq: error: {bad}: recipe is not valid YAML")
    assert "line 5" in lines[0], err
    assert not (tmp_path / "never").exists()


def test_reproduce_check_compares_the_calibration_digest(run_cli, first_run):
    tmp_path, _ = first_run
    out = tmp_path / "a" / "out"
    recipe_path = out / "model-Q4_0-gptq.recipe.yaml"
    edited = tmp_path / "edited"
    shutil.copytree(out, edited)
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["resolved"]["calibration_digest"] = "0" * 64
    (edited / recipe_path.name).write_text(yaml.safe_dump(recipe, sort_keys=False))
    status, stdout, err = run_cli("reproduce", edited, "--model", tmp_path / "a" / "model", "--calib",
                                  tmp_path / "a" / "calib.jsonl", "--check", "--json")
    assert status == 1
    assert json.loads(stdout)["calibration_matches"] is False
    lines = err.strip().splitlines()
    assert lines == ["impq: reproduce: not the recipe's bytes: the calibration digest"], err


@pytest.mark.parametrize("name", ["imp-tiny", "phi2-q4_k_m", "qwen2-q4_k_m", "phi3-q4_k_m"])
def test_each_shipped_recipe_is_its_schema_1_file_migrated(name):
    from impq.recipe import read_document, recipe_of

    old, new = SCHEMA_1 / f"{name}.yaml", REPO / "recipes" / f"{name}.yaml"
    assert read_document(old)["schema_version"] == 1 and read_document(new)["schema_version"] == 2
    assert recipe_of(read_document(old), old, None) == recipe_of(read_document(new), new, None)


@pytest.mark.parametrize("name", ["gptq-q4_k-override", "safetensors-gptq", "mix-bpw4.5", "signround-q4_0"])
def test_schema_1_recipe_files_from_before_schema_2_reproduce_byte_for_byte(name, tmp_path):
    """`impq reproduce --check` on recipe files that impq wrote before schema 2 (a --tensor-type override, a
    safetensors layout, a --target-bpw budget, learned rounding): every output's sha256, recorded by that impq,
    comes out of this one, the recipe the artifact carries included."""
    import os
    import subprocess
    import sys

    from test_golden_artifacts import REPRODUCIBLE

    recipe = tmp_path / f"{name}.recipe.yaml"
    recipe.write_bytes((SCHEMA_1 / recipe.name).read_bytes())
    env = {**os.environ, **REPRODUCIBLE, "IMPQ_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", "from impq.cli import main; main()", "reproduce", str(recipe),
                           "--check", "--json"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["identical"] and result["files"] and all(f["rerun_matches"] for f in result["files"])


def test_a_recipe_checks_itself_when_built_and_round_trips_through_its_document(tmp_path):
    import dataclasses

    from impq.defaults import default_calib_data, default_model_dir
    from impq.errors import ImpqError
    from impq.recipe import (Budget, Calibration, Method, Recipe, Safetensors, calibration_path, export_recipe,
                             recipe_of)

    for build, needle in [(lambda: Calibration(nsamples=0), "nsamples 0: at least 1"),
                          (lambda: Method(name="sgd"), "--method sgd"),
                          (lambda: Method(compute_dtype="float8"), "--compute-dtype float8"),
                          (lambda: Recipe(target=Safetensors(layout="gptq"), overrides=["mlp=int8"]), "one bit width"),
                          (lambda: Recipe(target=Safetensors(), budget=Budget(target_bpw=4.5)), "need --format gguf"),
                          (lambda: Recipe(calibration=None), "needs a calibration section"),
                          (lambda: Recipe(overrides=["attn_v=q9_9"]), "q9_9")]:
        with pytest.raises(ImpqError, match=needle):
            build()
    with pytest.raises(dataclasses.FrozenInstanceError):
        Recipe().seed = 1

    model = default_model_dir()
    calib = default_calib_data(model)
    for recipe in [Recipe(), export_recipe("q4_0", "f16"),
                   Recipe.from_flags(format="safetensors", layout="awq", bits=4, group_size=64, damp=0.02),
                   Recipe.from_flags(type="q3_k", target_size=10 ** 6, budget_includes_vision=True, seed=3,
                                     tensor_types=["attn_v=q6_k"], candidate_types=["Q3_K", "q4_k"])]:
        document = recipe.document(model)
        assert "/" not in json.dumps(document)                         # no machine path
        read = recipe_of(json.loads(json.dumps(document)), tmp_path / "x.yaml", None)
        assert read == recipe
        if recipe.calibration is not None:
            assert calibration_path(read, model) == calib


def test_the_command_lines_defaults_are_the_recipes(run_cli, monkeypatch, tmp_path):
    """`impq quantize` with no flags runs Recipe(): the CLI states no default of its own."""
    import impq.quantize
    from impq.errors import ImpqError
    from impq.recipe import Recipe

    ran = []

    def capture(model_dir, out_dir, recipe, **kwargs):
        ran.append(recipe)
        raise ImpqError(None, "captured")

    monkeypatch.setattr(impq.quantize, "quantize_model", capture)
    status, _, err = run_cli("quantize", "--out", tmp_path / "never")
    assert status == 2 and "captured" in err
    assert ran == [Recipe()]
