"""Where impq's shipped defaults live: the embedded imp-tiny model and the shapes evaluation/calibration splits."""

from __future__ import annotations

from pathlib import Path

from .errors import ImpqError

PACKAGE = Path(__file__).resolve().parent
REPO = PACKAGE.parent


def default_model_dir() -> Path:
    """imp-tiny, trained by scripts/train_imp_tiny.py and shipped inside the package."""
    path = PACKAGE / "assets" / "imp-tiny"
    if not (path / "config.json").is_file():
        raise ImpqError(path, "the embedded imp-tiny model is missing from this installation")
    return path


def default_eval_data() -> Path:
    """The shapes evaluation split (700 items) shipped in the repository's eval/ folder."""
    path = REPO / "eval" / "shapes" / "eval.jsonl"
    if not path.is_file():
        raise ImpqError(path, "default evaluation data not found (a source checkout is needed); pass --data")
    return path


def default_calib_data() -> Path:
    path = REPO / "calib_data" / "shapes" / "calib.jsonl"
    if not path.is_file():
        raise ImpqError(path, "default calibration data not found (a source checkout is needed); pass --calib")
    return path
