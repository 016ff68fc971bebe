"""Targets: what an artifact is. The recipe's target section (impq/recipe.py) says which grid the decoder gets and
which grids an override may name; the target of its format writes the artifact's files and checks them against
the full-precision model. impq/quantize.py calls the target of the run's format and names no format itself;
adding a format is adding a section to the recipe and a target here."""

from __future__ import annotations

from ..recipe import GGUFPair, Safetensors
from .base import BudgetedTarget, Target, Written
from .gguf_pair import GGUF_PAIR
from .safetensors import SAFETENSORS

TARGETS: dict[str, Target] = {GGUFPair.format: GGUF_PAIR, Safetensors.format: SAFETENSORS}


def target_of(recipe) -> Target:
    return TARGETS[recipe.target.format]


__all__ = ["TARGETS", "BudgetedTarget", "Target", "Written", "target_of"]
