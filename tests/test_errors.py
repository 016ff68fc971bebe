"""Bad input: one line on stderr naming the file and the problem, exit status 2, nothing half-written."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from impq.recipe import export_with_recipe
from impq.models.layouts import read_spec


@pytest.fixture
def model(models_dir, tmp_path):
    """A private copy of the small imp-phi2 checkpoint that a test may damage."""
    return shutil.copytree(models_dir / "imp-phi2", tmp_path / "model")


def _assert_clean_failure(result, must_name, out_dir=None):
    status, stdout, stderr = result
    assert status == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("impq: error: ") and str(must_name) in lines[0], lines[0]
    assert "Traceback" not in stderr
    if out_dir is not None and out_dir.exists():
        assert list(out_dir.iterdir()) == [], list(out_dir.iterdir())


def test_missing_config(run_cli, model, tmp_path):
    (model / "config.json").unlink()
    out = tmp_path / "out"
    _assert_clean_failure(run_cli("export", model, "--out", out), model / "config.json", out)


def test_unknown_architecture(run_cli, model, tmp_path):
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "bert"
    (model / "config.json").write_text(json.dumps(config))
    result = run_cli("export", model, "--out", tmp_path / "out")
    _assert_clean_failure(result, model / "config.json", tmp_path / "out")
    assert "unknown architecture" in result[2] and "imp-phi2-msft" in result[2]


def test_truncated_safetensors(run_cli, model, tmp_path):
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    result = run_cli("export", model, "--out", tmp_path / "out")
    _assert_clean_failure(result, weights, tmp_path / "out")
    assert "truncated" in result[2]


def test_corrupt_safetensors_header(run_cli, model, tmp_path):
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    data[8:8 + header_len] = b"{" * header_len
    weights.write_bytes(bytes(data))
    result = run_cli("export", model, "--out", tmp_path / "out")
    _assert_clean_failure(result, weights, tmp_path / "out")
    assert "corrupt" in result[2]


def test_tensor_with_wrong_shape(run_cli, model, tmp_path):
    weights = model / "model.safetensors"
    tensors = load_file(weights)
    key = "transformer.h.1.mlp.fc1.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1], dtype=torch.float16)
    save_file(tensors, weights)
    result = run_cli("export", model, "--out", tmp_path / "out")
    _assert_clean_failure(result, weights, tmp_path / "out")
    assert key in result[2] and "shape" in result[2]


def test_missing_tokenizer(run_cli, model, tmp_path):
    (model / "tokenizer.json").unlink()
    result = run_cli("export", model, "--out", tmp_path / "out")
    _assert_clean_failure(result, model / "tokenizer.json", tmp_path / "out")


def test_config_without_image_token(run_cli, model, tmp_path):
    config = json.loads((model / "config.json").read_text())
    del config["image_token_index"]
    (model / "config.json").write_text(json.dumps(config))
    _assert_clean_failure(run_cli("export", model, "--out", tmp_path / "out"), model / "config.json", tmp_path / "out")


def test_unreadable_image(run_cli, models_dir, tmp_path):
    export_with_recipe(read_spec(models_dir / "imp-phi2"), tmp_path / "pair", "f16")
    image = tmp_path / "not-an-image.png"
    image.write_text("this is text, not a PNG")
    result = run_cli("verify", tmp_path / "pair", "--reference", models_dir / "imp-phi2", "--image", image)
    _assert_clean_failure(result, image)
    assert "unreadable image" in result[2]


def test_output_folder_not_writable(run_cli, models_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "out"                      # a folder inside a regular file cannot exist, even for root
    _assert_clean_failure(run_cli("export", models_dir / "imp-phi2", "--out", out), out)


def test_interrupted_export_leaves_nothing(models_dir, tmp_path):
    spec = read_spec(models_dir / "imp-phi2")
    seen = []

    def interrupt(name):
        seen.append(name)
        if len(seen) == 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_with_recipe(spec, tmp_path, "f16", on_tensor=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_mmproj_removes_the_text_model_too(models_dir, tmp_path):
    spec = read_spec(models_dir / "imp-phi2")
    names = []

    def interrupt(name):
        names.append(name)
        if name.startswith("v."):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_with_recipe(spec, tmp_path, "f16", on_tensor=interrupt)
    assert any(not n.startswith(("v.", "mm.")) for n in names)   # the text model was complete before
    assert list(tmp_path.iterdir()) == []


def test_verify_without_a_pair(run_cli, models_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    _assert_clean_failure(run_cli("verify", tmp_path / "empty", "--reference", models_dir / "imp-phi2"),
                          tmp_path / "empty")


def test_unknown_export_type(run_cli, models_dir, tmp_path):
    result = run_cli("export", models_dir / "imp-phi2", "--out", tmp_path / "out", "--type", "q3_z")
    assert result[0] == 2 and "q3_z" in result[2]
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
