"""JSON Lines files as impq reads them (VQA data, calibration samples): every line an object, every problem a
one-line error naming the file and the line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from ..errors import ImpqError


def looks_like_jsonl(path: Path) -> bool:
    """A .jsonl file, or any file whose first non-empty line is a JSON object."""
    if not path.is_file():
        raise ImpqError(path, "is a folder, not a data file" if path.is_dir() else "data file not found")
    if path.suffix == ".jsonl":
        return True
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.strip():
                try:
                    return isinstance(json.loads(line), dict)
                except json.JSONDecodeError:
                    return False
    return False


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-empty line, in order; a line that is not a JSON object is an error
    naming it, raised when the reader reaches it (so the first bad line of any kind is the one reported)."""
    number = 0
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ImpqError(path, f"line {number}: not JSON ({err.msg})") from None
                if not isinstance(record, dict):
                    raise ImpqError(path, f"line {number}: expected a JSON object")
                yield number, record
    except UnicodeDecodeError:
        raise ImpqError(path, f"line {number + 1}: not UTF-8 text") from None


def jsonl_image(path: Path, number: int, value) -> Path:
    """A JSONL line's image path (relative to the JSONL's folder, or absolute), which must exist."""
    if not isinstance(value, str) or not value.strip():
        raise ImpqError(path, f"line {number}: 'image' must be a path")
    image = Path(value) if Path(value).is_absolute() else path.parent / value
    if not image.is_file():
        raise ImpqError(path, f"line {number}: image {image} not found")
    return image
