"""Atomic output: every artifact is written under a temporary name and renamed only when complete."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import ImpqError


def ensure_writable_dir(path: Path) -> Path:
    """Create `path` if needed and prove it is writable, before any long work starts."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".impq-probe-"):
            pass
    except OSError as err:
        raise ImpqError(path, f"output folder is not writable ({err.strerror or err})") from None
    return path


@contextlib.contextmanager
def atomic_output(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it to `final` on success, delete it on any failure or interrupt.
    The caller may create a file or a folder there; a folder replaces an earlier folder at `final` whole."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if tmp.is_dir() and final.is_dir():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _process_alive(pid: str) -> bool:
    if not pid.isdigit():
        return True                                   # not a staging folder impq names: leave it
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:                           # another user's live process
        return True
    return True


@contextlib.contextmanager
def artifact_set(out_dir: Path, last: str) -> Iterator[Path]:
    """Yield a staging folder inside `out_dir` for all the files of one artifact. When the block completes, each is
    moved into `out_dir` (replacing a stale set of the same names), the one named `last`, which marks a set as
    complete, after the others; on any failure or interrupt the staging folder and everything in it is removed."""
    for stale in out_dir.glob(".impq-stage-*"):        # left by a killed run: its process is gone
        if not _process_alive(stale.name.removeprefix(".impq-stage-")):
            shutil.rmtree(stale, ignore_errors=True)
    stage = out_dir / f".impq-stage-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
        (out_dir / last).unlink(missing_ok=True)      # a stale set stops looking complete before any file moves
        for entry in sorted(stage.iterdir(), key=lambda p: p.name == last):
            final = out_dir / entry.name
            if entry.is_dir() and final.is_dir():
                shutil.rmtree(final)
            os.replace(entry, final)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def sha256_files(paths: list[Path], chunk: int = 1 << 20) -> str:
    """Digest of several files' bytes, in the given order (the checkpoint's provenance id)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    return digest.hexdigest()

