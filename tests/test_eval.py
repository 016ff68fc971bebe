"""`impq eval`: the same answers through PyTorch and llama.cpp for the shipped model, and clean bad-input errors."""

from __future__ import annotations

import json

import pytest

from impq.defaults import default_eval_data, default_model_dir
from impq.recipe import export_with_recipe
from impq.measure.vqa import TorchAnswerer, evaluate, load_answerer, read_vqa_jsonl
from impq.models.layouts import read_spec


@pytest.fixture(scope="module")
def tiny_f16(tmp_path_factory):
    out = tmp_path_factory.mktemp("imp-tiny-f16")
    export_with_recipe(read_spec(default_model_dir()), out, "f16")
    return out


def test_pytorch_and_llamacpp_give_identical_answers(tiny_f16):
    items = read_vqa_jsonl(default_eval_data())[:20]
    torch_report = evaluate(TorchAnswerer(default_model_dir()), items, model="torch", dataset="eval")
    gguf_report = evaluate(load_answerer(tiny_f16), items, model="gguf", dataset="eval",
                           reference=TorchAnswerer(default_model_dir()))
    assert [r["prediction"] for r in torch_report.items] == [r["prediction"] for r in gguf_report.items]
    # well above chance (about a third over the seven question types)
    assert torch_report.accuracy == gguf_report.accuracy and torch_report.accuracy >= 0.5
    assert gguf_report.top1_agreement == 1.0 and gguf_report.mean_kld < 1e-3


def test_eval_cli_json_and_results_file(run_cli, tiny_f16, tmp_path):
    results = tmp_path / "results.json"
    status, out, err = run_cli("eval", tiny_f16, "--limit", "7", "--json", "--results", results)
    assert status == 0, err
    summary = json.loads(out)
    assert summary["n_items"] == 7 and set(summary["per_type"]) == {
        "color", "shape", "count", "exist", "position", "size", "digit"}
    assert len(json.loads(results.read_text())["items"]) == 7


def _dataset(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _image(tmp_path):
    from PIL import Image
    Image.new("RGB", (32, 32)).save(tmp_path / "img.png")
    return "img.png"


@pytest.mark.parametrize("case,needle", [
    ("not-json", "line 2: not JSON"),
    ("missing-image", "line 1: image"),
    ("no-answer", "line 1: missing or non-text 'answer'"),
    ("empty", "empty dataset"),
])
def test_bad_datasets(run_cli, tmp_path, case, needle):
    image = _image(tmp_path)
    good = json.dumps({"image": image, "question": "q?", "answer": "a"})
    lines = {"not-json": [good, "{this is not json"],
             "missing-image": [json.dumps({"image": "nope.png", "question": "q?", "answer": "a"})],
             "no-answer": [json.dumps({"image": image, "question": "q?"})],
             "empty": [""]}[case]
    data = _dataset(tmp_path, lines)
    status, _, err = run_cli("eval", "--data", data, "--limit", "1")
    assert status == 2, err
    assert len(err.strip().splitlines()) == 1 and str(data) in err and needle in err, err
