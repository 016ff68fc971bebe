"""Where impq's shipped defaults live: the embedded imp-tiny model and the shapes evaluation/calibration splits."""

from __future__ import annotations

from pathlib import Path

from .errors import ImpqError

PACKAGE = Path(__file__).resolve().parent
REPO = PACKAGE.parent
EMBEDDED_MODEL_DIR = PACKAGE / "assets" / "imp-tiny"


def is_embedded_model(model_dir: str | Path | None) -> bool:
    """Whether `model_dir` is the embedded imp-tiny (None: the default, which is)."""
    return model_dir is None or (Path(model_dir) / "config.json").resolve() == \
        (EMBEDDED_MODEL_DIR / "config.json").resolve()


def default_model_dir() -> Path:
    """imp-tiny, trained by scripts/train_imp_tiny.py and shipped inside the package."""
    path = EMBEDDED_MODEL_DIR
    if not (path / "config.json").is_file():
        raise ImpqError(path, "the embedded imp-tiny model is missing from this installation")
    return path


def default_eval_data() -> Path:
    """The shapes evaluation split (700 items) shipped in the repository's eval/ folder."""
    path = REPO / "eval" / "shapes" / "eval.jsonl"
    if not path.is_file():
        raise ImpqError(path, "default evaluation data not found (a source checkout is needed); pass --data")
    return path


def default_calib_data(model_dir: str | Path | None = None) -> Path:
    """The shapes calibration split for the embedded imp-tiny (no model, or imp-tiny itself); for any other
    checkpoint, the real photographs and plain English text of calib_data/photos/."""
    path = REPO / "calib_data" / ("shapes" if is_embedded_model(model_dir) else "photos") / "calib.jsonl"
    if not path.is_file():
        raise ImpqError(path, "default calibration data not found (a source checkout is needed); pass --calib")
    return path
