"""GPTQ (Frantar et al., 2022) onto an exact grid: columns are quantized one at a time and each column's
rounding error is spread over the columns not yet quantized, through the inverse Hessian of the layer's
calibration inputs. Block parameters come from the grid's importance-weighted search: on the running
(error-updated) weights when a block starts, or on the original weights ("static groups", required with
act-order since a GGUF block is 32 consecutive columns)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..errors import ImpqError
from .grids import BlockParams, Grid


LAZY = 32                    # columns per chunk of a block's error updates (see below)


class GPTQFit(NamedTuple):
    codes: torch.Tensor
    params: BlockParams


class NotPositiveDefinite(ImpqError):
    """The damped Hessian has no Cholesky factor even at the strongest damping tried: a one-line error wherever GPTQ
    runs (the layer loop names the tensor; the sensitivity measurement reports it as it is)."""


def inverse_factor(H: torch.Tensor, damp: float, retries: int = 4) -> torch.Tensor:
    """The upper Cholesky factor of (H + damping)^-1, the damping a fraction `damp` of H's mean diagonal. Where a
    factorization fails (a Hessian of a few massive channels can be indefinite to float32 precision), it is tried
    again with ten times the damping, up to `retries` times, as AutoGPTQ and llm-compressor do."""
    if not torch.isfinite(H).all():
        raise NotPositiveDefinite(None, "GPTQ: the Hessian is not finite (its calibration inputs are not)")
    eye = damp * torch.mean(torch.diagonal(H)) * torch.eye(H.shape[0], device=H.device)
    for attempt in range(retries + 1):
        factor, info = torch.linalg.cholesky_ex(H + eye * 10 ** attempt)
        if int(info) == 0:
            inverse, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(factor), upper=True)
            if int(info) == 0:
                return inverse
    raise NotPositiveDefinite(None, f"GPTQ: the Hessian is not positive definite even at damping "
                                    f"{damp * 10 ** retries:g}")


def gptq(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, *, block_size: int = 128,
         damp: float = 0.01, act_order: bool = False, static_groups: bool = False) -> GPTQFit:
    rows, cols = weight.shape
    W = weight.clone().float()
    H = hessian.clone().float()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    importance = torch.diagonal(H).clamp_min(1e-8).clone()
    g, sub = grid.block, grid.sub
    fitted: dict[int, BlockParams] = {}          # fitted block index -> its parameters
    if act_order or static_groups:
        whole = grid.fit(W, importance)
        fitted = {b: whole.columns(b * g, (b + 1) * g, cols) for b in range(cols // g)}
    perm = torch.argsort(torch.diagonal(H), descending=True) if act_order else torch.arange(cols, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = inverse_factor(H, damp)
    codes = torch.zeros(rows, cols, dtype=torch.int32, device=W.device)
    block_size = max(g, block_size // g * g)
    # Within a block, each column's error reaches the block's later columns in chunks of `lazy` columns: a
    # column's own update stays inside its chunk, and one product carries the chunk's errors to the rest of the
    # block (the same sums as a rank-1 update per column, as GPTQ's lazy batches do across blocks). A k-quant's
    # 256-column blocks updated column by column read and wrote all 256 columns once per column: at Phi-2's
    # width, 27 GB of memory traffic per matrix. `lazy` divides g, so a block of g columns is fitted only once
    # every earlier chunk's errors have reached it.
    lazy = math.gcd(LAZY, g)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, device=W.device), Hinv[i1:i2, i1:i2]
        for c1 in range(0, i2 - i1, lazy):
            c2 = min(c1 + lazy, i2 - i1)
            for i in range(c1, c2):
                col = int(perm[i1 + i])
                b = col // g
                if b not in fitted:
                    # columns b*g .. b*g+g-1 are W1[:, i:i+g] here (no permutation, blocks aligned to g)
                    fitted[b] = grid.fit(W1[:, i:i + g], importance[b * g:(b + 1) * g])
                params, j = fitted[b], (col % g) // sub
                q, value = grid.column(W1[:, i], params.scale[:, j],
                                       None if params.minimum is None else params.minimum[:, j])
                codes[:, col] = q
                err = (W1[:, i] - value) / Hinv1[i, i]
                W1[:, i:c2] -= err.unsqueeze(1) * Hinv1[i, i:c2].unsqueeze(0)
                Err1[:, i] = err
            W1[:, c2:].addmm_(Err1[:, c1:c2], Hinv1[c1:c2, c2:], alpha=-1)
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)     # in place: no [rows, cols] temporary
    return GPTQFit(codes, BlockParams.concat([fitted[b] for b in range(cols // g)]))
