"""Vision reductions: a lower input resolution and 2x2 pooling of the projected tokens, computed the same way by
the PyTorch reference and by the exported mmproj.

Resolution: the learned position-embedding grid is resized to the new patch grid with bicubic interpolation,
`torch.nn.functional.interpolate(mode="bicubic", align_corners=False, antialias=False)` on the [dim, grid, grid]
table (the class token's row, for CLIP, is kept as it is): exactly what transformers' SigLIP and CLIP
`interpolate_pos_encoding` compute, so the reference and the mmproj's stored `v.position_embd` agree. At the
native size the table is returned unchanged.

Pooling: 2x2 average pooling with stride 2 over the token grid after the projector (token order row-major, as
the patches), which halves the grid side. In stock llama.cpp only the `ldpv2` projector graph pools, and its
grid is hard-coded at 24x24: a pooled mmproj exists only for a 24x24 patch grid (SigLIP patch 14 at 336 px).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ImpqError

LLAMA_CPP_POOL_GRID = 24           # tools/mtmd/models/llava.cpp, PROJECTOR_TYPE_LDPV2: n_patch = 24
TOKEN_REDUCTIONS = ("none", "pool2")


@dataclass(frozen=True)
class VisionReduction:
    image_size: int                # input side in pixels
    patch_size: int
    pool: bool = False             # 2x2 average pooling of the projected tokens

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_tokens(self) -> int:
        return (self.grid // 2) ** 2 if self.pool else self.grid ** 2

    @property
    def runs_in_llama_cpp(self) -> bool:
        return not self.pool or self.grid == LLAMA_CPP_POOL_GRID

    @property
    def label(self) -> str:
        return f"{self.image_size}px" + ("-pool2" if self.pool else "")


def vision_reduction(vision, image_size: int | None = None, token_reduction: str = "none") -> VisionReduction:
    """The reduction of a model's tower (a layouts.VisionSpec), checked: a size that is a multiple of the patch
    size and at most the native one; pooling only on an even grid."""
    native, patch = vision.image_size, vision.patch_size
    size = native if image_size is None else image_size
    if size <= 0 or size % patch or size > native:
        raise ImpqError(None, f"image size {size}: choose a multiple of the patch size {patch} from {patch} to the "
                              f"native {native}")
    if token_reduction not in TOKEN_REDUCTIONS:
        raise ImpqError(None, f"token reduction {token_reduction!r}: choose one of {', '.join(TOKEN_REDUCTIONS)}")
    reduction = VisionReduction(size, patch, token_reduction == "pool2")
    if reduction.pool and reduction.grid % 2:
        raise ImpqError(None, f"token reduction pool2 at {size} px: the {reduction.grid}x{reduction.grid} patch grid "
                              "is odd and cannot be pooled 2x2")
    return reduction


def interpolate_positions(table: torch.Tensor, grid: int, has_class_token: bool = False) -> torch.Tensor:
    """[n_positions, dim] position embeddings for a `grid` x `grid` patch grid (class token row first, if any)."""
    head, patches = (table[:1], table[1:]) if has_class_token else (table[:0], table)
    old = math.isqrt(patches.shape[0])
    if old == grid:
        return table
    square = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    resized = F.interpolate(square, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
    return torch.cat([head.float(), resized.permute(0, 2, 3, 1).reshape(grid * grid, -1)]).to(table.dtype)


def pool_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """[B, g*g, C] -> [B, (g/2)^2, C]: 2x2 average pooling, stride 2, of a row-major token grid."""
    batch, n, channels = tokens.shape
    grid = math.isqrt(n)
    square = tokens.reshape(batch, grid, grid, channels).permute(0, 3, 1, 2)
    return F.avg_pool2d(square, 2, 2).permute(0, 2, 3, 1).reshape(batch, -1, channels)
