"""The probe that decides whether llama.cpp's weight repacking (extra buffer types, AMX) is safe on this machine:
its three outcomes (works, dies by a signal, cached), and a real run after a probe that crashed."""

from __future__ import annotations

import json
import sys

import llama_cpp.llama_cpp as llama_lib
import pytest

from impq.defaults import default_model_dir
from impq.recipe import export_with_recipe
from impq.models.layouts import read_spec
from impq.runtime import llamacpp_probe as probe

# llama-cpp-python's own function, taken at collection, before any test ran a model under a verdict
DEFAULT_PARAMS = llama_lib.llama_model_default_params
CRASHING_CHILD = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
WORKING_CHILD = [sys.executable, "-c", "pass"]


@pytest.fixture
def fresh_probe(tmp_path, monkeypatch):
    """An empty verdict cache, no verdict in force in this process, and llama.cpp's parameters restored after."""
    monkeypatch.setenv("IMPQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("IMPQ_LLAMACPP_REPACK", raising=False)
    monkeypatch.setattr(probe, "_in_use", None)
    monkeypatch.setattr(llama_lib, "llama_model_default_params", DEFAULT_PARAMS)
    return tmp_path / "cache"


def _child(monkeypatch, command: list[str]) -> list[str]:
    """Make the probe run `command` as its child; returns the list of the model paths it was asked to probe."""
    probed: list[str] = []

    def child_command(text_gguf):
        probed.append(str(text_gguf))
        return command

    monkeypatch.setattr(probe, "_child_command", child_command)
    return probed


def test_a_probe_that_dies_by_a_signal_turns_repacking_off_and_is_cached(fresh_probe, monkeypatch):
    probed = _child(monkeypatch, CRASHING_CHILD)
    verdict = probe.repack_verdict()
    assert verdict.extra_bufts is False
    assert verdict.detail == "the probe died by SIGSEGV"
    assert len(probed) == 1 and probed[0].endswith("-Q4_0.gguf")        # impq's own quantized model was written
    cached = json.loads((fresh_probe / f"llamacpp-repack-{probe.verdict_key()}.json").read_text())
    assert cached == {"extra_bufts": False, "detail": "the probe died by SIGSEGV", "key": probe.verdict_key()}


def test_a_probe_that_runs_keeps_repacking_on(fresh_probe, monkeypatch):
    _child(monkeypatch, WORKING_CHILD)
    verdict = probe.repack_verdict()
    assert (verdict.extra_bufts, verdict.detail) == (True, "the probe ran")
    assert probe.use_repacking(quantized=True) is True
    assert llama_lib.llama_model_default_params().use_extra_bufts is True


def test_a_cached_verdict_is_used_without_probing_and_is_per_library(fresh_probe, monkeypatch):
    probed = _child(monkeypatch, CRASHING_CHILD)
    first = probe.repack_verdict()
    assert probe.repack_verdict() == first and len(probed) == 1          # the second answer came from the cache
    # another llama.cpp build (or CPU) is another key: probed again
    monkeypatch.setattr(probe, "_library_identity", lambda: "llama-cpp-python 0.0.0 rebuilt")
    _child(monkeypatch, WORKING_CHILD)
    assert probe.repack_verdict().extra_bufts is True
    assert len(list(fresh_probe.glob("llamacpp-repack-*.json"))) == 2


def test_the_environment_overrides_the_probe_and_float_models_need_none(fresh_probe, monkeypatch):
    probed = _child(monkeypatch, CRASHING_CHILD)
    assert probe.use_repacking(quantized=False) is True                  # an F16 model runs no probe
    monkeypatch.setenv("IMPQ_LLAMACPP_REPACK", "off")
    assert probe.use_repacking(quantized=True) is False
    assert probed == []
    assert llama_lib.llama_model_default_params().use_extra_bufts is False


@pytest.fixture(scope="module")
def q4_0_pair(tmp_path_factory):
    out = tmp_path_factory.mktemp("q4_0")
    export_with_recipe(read_spec(default_model_dir()), out, "q4_0")
    return out


def test_a_run_after_a_crashing_probe_completes_with_repacking_off_and_one_notice(fresh_probe, monkeypatch,
                                                                                  run_cli, q4_0_pair):
    _child(monkeypatch, CRASHING_CHILD)
    code, out, err = run_cli("eval", q4_0_pair, "--limit", "4", "--json")
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("impq: note:")]
    assert len(notes) == 1 and "repacking" in notes[0] and "SIGSEGV" in notes[0]
    assert "GGML_NATIVE=OFF" in notes[0]                                 # the build that restores full speed
    report = json.loads(out)
    assert report["accuracy"] == 1.0
    assert report["backend"]["repack"] is False
    assert llama_lib.llama_model_default_params().use_extra_bufts is False
    # bench's timed process reads the cached verdict, and records it
    code, out, err = run_cli("bench", q4_0_pair, "--runs", "1", "--warmup", "0", "--decode-tokens", "2", "--json")
    assert code == 0, err
    assert json.loads(out)["backend"]["repack"] is False
    assert not [line for line in err.splitlines() if line.startswith("impq: note:")]   # said once per process
