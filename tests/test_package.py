"""impq package: a phone bundle from an artifact or a sweep, whose pair runs with the settings PHONE.md gives
(llama-cpp-python here), and bad input refused with one line and nothing written."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from PIL import Image

from impq.defaults import default_eval_data
from impq.recipe import sha256_file
from impq.measure.vqa import normalize_answer, read_vqa_jsonl
from impq.runtime.llamacpp import PairRunner


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """imp-tiny quantized as a user would (its vision side calibrated too)."""
    from impq.defaults import default_model_dir
    from impq.quantize import quantize_model
    from impq.recipe import Recipe

    out = tmp_path_factory.mktemp("artifact")
    quantize_model(default_model_dir(), out, Recipe.from_flags(type="q4_0", method="rtn", vision="q8_0",
                                                               nsamples=4), verify_items=0)
    return out


def test_a_bundle_from_an_artifact_runs_as_phone_md_says(artifact, run_cli, tmp_path):
    bundle_dir = tmp_path / "bundle"
    status, stdout, err = run_cli("package", artifact, "--out", bundle_dir, "--json")
    assert status == 0, err
    bundle = json.loads(stdout)
    text, mmproj = bundle_dir / bundle["text"], bundle_dir / bundle["mmproj"]
    assert sorted(p.name for p in bundle_dir.iterdir()) == sorted(
        [text.name, mmproj.name, "recipe.yaml", "bundle.json", "PHONE.md"])
    assert bundle["sha256"] == {p.name: sha256_file(p) for p in (text, mmproj)}
    assert {p.name: sha256_file(p) for p in (text, mmproj)} == {
        p.name: sha256_file(p) for p in artifact.glob("*.gguf")}
    recipe = yaml.safe_load((bundle_dir / "recipe.yaml").read_text())
    assert recipe["method"]["name"] == "rtn" and recipe["target"]["vision"] == "q8_0"
    phone = (bundle_dir / "PHONE.md").read_text()
    command = re.search(r"llama-mtmd-cli (.*?)-n 64", phone, re.S).group(1)
    assert f"-m {text.name} --mmproj {mmproj.name}" in command and "--jinja" in command
    threads = int(re.search(r"-t (\d+)", command).group(1))
    context = int(re.search(r"-c (\d+)", command).group(1))
    assert (threads, context) == (bundle["threads"], bundle["context"]) and context > bundle["image_tokens"]
    assert f"{bundle['image_size']}x{bundle['image_size']}" in phone
    assert f"| model | {text.name} |" in phone and f"| multimodal projector (mmproj) | {mmproj.name} |" in phone
    for figure in ("image_encode_s", "ttft_s", "decode_tokens_per_s"):
        value = bundle["phone_estimate"][figure]
        assert value["low"] <= value["value"] <= value["high"]
        assert f"{value['value']:.1f} ({value['low']:.1f}-{value['high']:.1f})" in phone
    # the pair, with PHONE.md's context and threads, answers an eval item as the model does
    item = read_vqa_jsonl(default_eval_data())[0]
    with PairRunner(text, mmproj, n_ctx=context, n_threads=threads) as runner:
        run = runner.run(Image.open(item.image), item.question, max_new_tokens=6)
        answer = runner.llama.detokenize([t for t in run.tokens if t != runner.eos_id]).decode()
    assert normalize_answer(answer) == normalize_answer(item.answer), (answer, item.answer)


def test_a_bundle_from_a_sweep_takes_the_fastest_point_within_the_drop(run_cli, tmp_path):
    sweep = tmp_path / "sweep"
    status, _, err = run_cli("sweep-resolution", "--resolutions", "168,84", "--types", "f16", "--limit", "8",
                             "--runs", "1", "--out", sweep)
    assert status == 0, err
    status, _, err = run_cli("package", sweep, "--out", tmp_path / "never")
    assert status == 2 and "--max-accuracy-drop" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "never").exists()
    status, stdout, err = run_cli("package", sweep, "--out", tmp_path / "bundle", "--max-accuracy-drop", "100",
                                  "--json")
    assert status == 0, err
    bundle = json.loads(stdout)
    points = json.loads((sweep / "sweep.json").read_text())["points"]
    fastest = min(points, key=lambda r: r["phone_ttft_s"])
    assert bundle["image_size"] == fastest["image_size"] == 84
    assert "84 px" in bundle["chosen"] and (tmp_path / "bundle" / "PHONE.md").is_file()
    status, stdout, err = run_cli("package", sweep, "--out", tmp_path / "strict", "--max-accuracy-drop", "0",
                                  "--json")
    assert status == 0, err
    original = next(r for r in points if r["original"])
    assert json.loads(stdout)["accuracy"] >= original["accuracy"]


def test_bad_package_input_is_one_line_and_writes_nothing(artifact, run_cli, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("no\n")
    for args, needle in (([empty], "not an artifact"), ([not_a_folder], "not an artifact"),
                         ([artifact, "--device-profile", "nokia-3310"], "nokia-3310"),
                         ([artifact, "--max-accuracy-drop", "1"], "not a sweep")):
        out = tmp_path / "out"
        status, _, err = run_cli("package", *args, "--out", out)
        lines = err.strip().splitlines()
        assert status == 2 and len(lines) == 1 and lines[0].startswith("impq: error: ") and needle in lines[0], err
        assert not out.exists()
