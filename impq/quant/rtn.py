"""Round-to-nearest onto a grid, with the grid's importance-weighted scale search (importance = the
calibration inputs' mean square per column, the diagonal of GPTQ's Hessian)."""

from __future__ import annotations

import torch

from .grids import BlockParams, Grid


def rtn(weight: torch.Tensor, hessian: torch.Tensor | None, grid: Grid) -> tuple[torch.Tensor, BlockParams]:
    importance = None if hessian is None else torch.diagonal(hessian).clamp_min(1e-8)
    params = grid.fit(weight, importance)
    return grid.codes(weight, params), params
