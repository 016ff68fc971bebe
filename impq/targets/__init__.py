"""Targets: what an artifact is. A target answers, for a run's settings, which grid the decoder gets and which
grids a --tensor-type override may name, what the artifact's files are called, how they are written and how
they are checked against the full-precision model. impq/quantize.py calls the target of the run's format and
names no format itself; adding a format is adding a target here."""

from __future__ import annotations

from .base import Target, Written
from .gguf_pair import GGUF_PAIR
from .safetensors import SAFETENSORS

TARGETS: dict[str, Target] = {target.name: target for target in (GGUF_PAIR, SAFETENSORS)}
FORMATS = tuple(TARGETS)

__all__ = ["TARGETS", "FORMATS", "Target", "Written"]
