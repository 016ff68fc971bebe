"""Shared fixtures: small random checkpoints in every real layout, built once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from impq.models.testing import TEST_LAYOUTS, make_model


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for layout in TEST_LAYOUTS:
        make_model(layout, root / layout)
    return root


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """Run `impq ARGS...` in-process; returns (exit status, stdout, stderr)."""
    from impq.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["impq", *map(str, args)])
        with pytest.raises(SystemExit) as exit_info:
            main()
        out = capsys.readouterr()
        return exit_info.value.code, out.out, out.err

    return run
