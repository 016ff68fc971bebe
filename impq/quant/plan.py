"""Which grid each quantized tensor gets: one plan, made once before the layer loop, that the driver and every
algorithm read (AWQ's scale groups and learned rounding take each tensor's own grid).

A tensor whose input width is not a multiple of its grid's block gets the nearest type that fits, as
llama.cpp's quantizer does (src/llama-quant.cpp: Q2_K and Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0),
and is quantized with the same algorithm; a width that not even the fallback's 32-wide blocks fill stays at the
export's float type. Every fallback is recorded, so the report can say which tensors differ from the request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..errors import ImpqError
from ..models.lmm import DECODER, decoder_name
from .grids import Grid

@dataclass(frozen=True)
class TensorPlan:
    grid: Grid | None        # None: kept at the export's float type
    requested: Grid
    in_features: int
    out_features: int

    @property
    def fallback(self) -> str | None:
        """How the tensor differs from the request, or None."""
        if self.grid is self.requested:
            return None
        if self.grid is None:
            return (f"{self.requested.name} -> float (16 bits): input width {self.in_features} is not a multiple of "
                    f"{self.requested.block}, nor of any fallback's block")
        return (f"{self.requested.name} -> {self.grid.name}: input width {self.in_features} is not a multiple of "
                f"{self.requested.block}")


Plan = dict[str, TensorPlan]       # canonical tensor name -> plan


def fitting_grid(grid: Grid, width: int) -> Grid | None:
    """`grid`, or its width fallback (repeatedly) until its blocks fill `width`; None where none does."""
    while grid is not None and width % grid.block:
        grid = grid.fallback
    return grid


def _plan(linears: dict[str, nn.Linear], grid: Grid | None, overrides, aliases: dict[str, str], matched: set,
          match=re.search) -> Plan:
    """`grid` (None: only the tensors an override names), or the grid of the last override whose regular expression
    matches (`match`) the tensor's canonical name or its alias, then the width fallback; `matched` collects the
    patterns that matched."""
    plan = {}
    for canonical, module in linears.items():
        requested = grid
        for pattern, override in overrides:
            if match(pattern, canonical) or match(pattern, aliases.get(canonical, "")):
                requested = override
                matched.add(pattern)
        if requested is not None:
            plan[canonical] = TensorPlan(fitting_grid(requested, module.in_features), requested,
                                         module.in_features, module.out_features)
    return plan


def _check_matched(overrides, matched: set) -> None:
    unmatched = [pattern for pattern, _ in overrides if pattern not in matched]
    if unmatched:
        raise ImpqError(None, f"--tensor-type {unmatched[0]!r} matches no quantized tensor (decoder linear layers, "
                              "by GGUF name such as blk.3.attn_v.weight or canonical name; vision blocks and "
                              "projector: v.blk.3.attn_q.weight, mm.0.weight)")


def decoder_part(plan: Plan) -> Plan:
    """The plan's decoder tensors (what a budget allocates and counts), without the vision side's."""
    return {name: entry for name, entry in plan.items() if name.startswith(DECODER)}


def decoder_linears(llm: nn.Module) -> dict[str, nn.Linear]:
    return {decoder_name(index, name): module for index, layer in enumerate(llm.model.layers)
            for name, module in layer.named_modules() if isinstance(module, nn.Linear)}


def plan_llm(llm: nn.Module, grid: Grid, overrides: list[tuple[str, Grid]] = (),
             aliases: dict[str, str] | None = None) -> Plan:
    """The plan for every linear layer of the decoder blocks: `grid`, or the grid of the last override whose regular
    expression matches the tensor (searched in its canonical name and in its alias, the GGUF name, as
    `llama-quantize --tensor-type` does), then the width fallback. An override that matches nothing is an error."""
    return plan_model(llm, {}, grid, None, overrides, aliases)


def plan_vision(vision_linears: dict[str, nn.Linear], grid: Grid) -> Plan:
    """The vision side alone on `grid`, with the width fallbacks: what an mmproj of one vision type is quantized
    onto."""
    return _plan(vision_linears, grid, (), {}, set())


def plan_model(llm: nn.Module, vision_linears: dict[str, nn.Linear], grid: Grid, vision_grid: Grid | None,
               overrides: list[tuple[str, Grid]] = (), aliases: dict[str, str] | None = None) -> Plan:
    """plan_llm's plan for the decoder, and for the vision tower's blocks and the projector (`vision_linears`, by
    canonical name; aliases: their mmproj names): `vision_grid`, or None to plan only the vision tensors an
    override names. An override names a vision tensor from the start of its name (v.blk.*, mm.*, vision.*,
    projector.*), so that a decoder pattern such as `attn_v` never reaches the tower. An override must match a
    tensor on one side or the other."""
    matched: set = set()
    plan = _plan(decoder_linears(llm), grid, overrides, aliases or {}, matched)
    plan.update(_plan(vision_linears, vision_grid, overrides, aliases or {}, matched, match=re.match))
    _check_matched(overrides, matched)
    return plan
