"""The command line end to end: make a model, export it, verify it; --help and --json on every command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.parametrize("command", [[], ["testing", "make-model"], ["inspect"], ["export"], ["verify"]])
def test_help(command):
    done = subprocess.run([sys.executable, "-m", "impq.cli", *command, "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Usage" in done.stdout


def test_make_export_verify_json(run_cli, tmp_path):
    status, _, err = run_cli("testing", "make-model", "--layout", "imp-llava-phi2", "--out", tmp_path / "model")
    assert status == 0, err
    status, out, err = run_cli("inspect", tmp_path / "model", "--json")
    assert status == 0 and json.loads(out)["layout"] == "imp-llava"
    status, out, err = run_cli("export", tmp_path / "model", "--out", tmp_path / "gguf", "--type", "f16", "--json")
    assert status == 0, err
    exported = json.loads(out)
    assert exported["text_gguf"].endswith("model-F16.gguf") and exported["mmproj_gguf"].endswith("mmproj-model-F16.gguf")
    status, out, err = run_cli("verify", tmp_path / "gguf", "--reference", tmp_path / "model", "--json")
    assert status == 0, err
    report = json.loads(out)
    assert report["passed"] is True and report["generations_matched"] == "6/6"


def test_verify_exits_nonzero_on_disagreement(run_cli, tmp_path):
    run_cli("testing", "make-model", "--layout", "imp-phi2", "--out", tmp_path / "a")
    run_cli("testing", "make-model", "--layout", "imp-phi2", "--out", tmp_path / "b", "--seed", "5")
    run_cli("export", tmp_path / "b", "--out", tmp_path / "gguf")
    status, out, _ = run_cli("verify", tmp_path / "gguf", "--reference", tmp_path / "a", "--json")
    assert status == 1 and json.loads(out)["passed"] is False
