"""AWQ (Lin et al., 2023): per-input-channel scales s, searched per group of linear layers that share an input,
so that quantizing W*s loses less of the outputs on salient channels; 1/s is folded into the operation that
produces the group's input, so that before quantization the model computes exactly what it did.

Where 1/s can be folded (each text family's awq_groups, impq.families): a layer norm before q/k/v (and fc1 too
in a parallel block), the value projection's rows before the output projection (when every head has its own
value), the up projection's rows before the down projection (SwiGLU multiplies them elementwise). A linear after
a GELU cannot take a folded scale and is left unscaled.

After scaling, AWQ's clipping search shrinks each row's largest magnitudes per grid block where that lowers the
layer's output error on the sampled inputs (query and key projections excepted, as in AWQ: their errors are
amplified by the attention softmax and the search on outputs misjudges them).
"""

from __future__ import annotations

import torch
from torch import nn

from ..families import ScaleGroup
from .error import output_error
from .grids import Grid


def usable_groups(family_groups: tuple[ScaleGroup, ...], layer: nn.Module) -> list[ScaleGroup]:
    """A family's groups (its record's awq_groups) whose fold is exact for this layer: a value-to-output fold needs
    as many value heads as heads."""
    groups = []
    attn = layer.self_attn
    heads = attn.config.num_attention_heads
    kv_heads = getattr(attn.config, "num_key_value_heads", None) or heads
    for group in family_groups:
        if ("v_proj" in group.prev or group.prev_rows == "last-third") and kv_heads != heads:
            continue
        groups.append(group)
    return groups


def _rows(module: nn.Module, prev_rows: str) -> slice:
    n = module.weight.shape[0]
    return {"all": slice(0, n), "last-half": slice(n // 2, n), "last-third": slice(2 * n // 3, n)}[prev_rows]


@torch.no_grad()
def apply_scales(layer: nn.Module, group: ScaleGroup, scales: torch.Tensor) -> None:
    """Multiply the group's input channels by `scales` and fold 1/scales into the previous operation."""
    prev = layer.get_submodule(group.prev)
    rows = _rows(prev, group.prev_rows)
    if isinstance(prev, nn.Linear):
        prev.weight[rows] /= scales.unsqueeze(1).to(prev.weight.dtype)
    else:
        prev.weight[rows] /= scales.to(prev.weight.dtype)
    if getattr(prev, "bias", None) is not None:
        prev.bias[rows] /= scales.to(prev.bias.dtype)
    for name in group.linears:
        linear = layer.get_submodule(name)
        linear.weight.mul_(scales.unsqueeze(0).to(linear.weight.dtype))


SEARCH_ROWS = 128     # output rows of each linear that score a scale candidate


def sampled_rows(weight: torch.Tensor, count: int = SEARCH_ROWS) -> torch.Tensor:
    """Every k-th row, about `count` of them. A grid fits each row on its own, so the sample's error is exactly
    those rows' share of the whole: the search ranks candidates on it at a fraction of the cost."""
    return weight[::max(1, -(-weight.shape[0] // count))]


@torch.no_grad()
def search_scales(layer: nn.Module, group: ScaleGroup, x_mean: torch.Tensor, hessian: torch.Tensor,
                  grids: dict[str, Grid | None], n_grid: int = 20) -> tuple[torch.Tensor, float]:
    """Scales s = mean|x|^alpha, alpha on a grid in [0, 1), minimising the group's output error after quantizing
    each W*s onto its own grid (`grids`: linear name -> grid; one group can span tensors of different grids, and a
    tensor planned at no grid keeps its float weights), scored on sampled rows of each W. `x_mean`: the group's
    input mean |x| per channel; `hessian`: its mean x^T x; both over every calibration token.
    Returns (scales, best alpha)."""
    hessian = hessian.float()
    second_moment = torch.diagonal(hessian).clamp_min(1e-10)
    x_mean = x_mean.float().clamp_min(1e-5)
    names = [name for name in group.linears if grids[name] is not None]
    weights = [sampled_rows(layer.get_submodule(name).weight.float()) for name in names]
    best = (None, float("inf"), 0.0)
    for k in range(n_grid):
        alpha = k / n_grid
        s = x_mean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        importance = second_moment / s.pow(2)       # the scaled weights see inputs x / s
        loss = 0.0
        for name, w in zip(names, weights):
            grid, scaled = grids[name], w * s
            params = grid.fit(scaled, importance)
            # per output row, so that each linear weighs by its mean output error, as AWQ's loss does
            loss += output_error(grid.values(grid.codes(scaled, params), params) / s - w, hessian) / w.shape[0]
        if loss < best[1]:
            best = (s, loss, alpha)
    return best[0], best[2]


CLIP_RATIOS = [1.0 - 0.025 * k for k in range(21)]      # clip the block's largest magnitude to 100 % ... 50 %
REFINE_STEPS = [0.0, -0.025, 0.025, -0.05, 0.05]
NOT_CLIPPED = ("q_proj", "k_proj", "qkv_proj")


@torch.no_grad()
def search_clip(name: str, weight: torch.Tensor, hessian: torch.Tensor, grid: Grid) -> torch.Tensor:
    """`weight` with each (row, block) clipped to the ratio of its largest magnitude that minimises the block's
    share of the output error, d_b H_bb d_b^T with H_bb the block's diagonal block of the inputs' mean x^T x
    (the sum over calibration tokens of (x_b d_b^T)^2, every token counted). Every ratio is scored with the
    grid's fitted parameters shrunk to it (one fit for all 21); only the clips next to each block's choice are
    then refitted and scored as the final quantization will be (five fits, where refitting every ratio took 21)."""
    if name.split(".")[-1] in NOT_CLIPPED:
        return weight
    hessian = hessian.float()
    rows, cols = weight.shape
    width = grid.sub                     # the unit that has its own scale
    n = cols // width
    blocks_h = hessian.reshape(n, width, n, width).diagonal(dim1=0, dim2=2).permute(2, 0, 1)   # [blocks, w, w]
    peak = weight.reshape(rows, n, width).abs().amax(-1)                                     # [rows, blocks]
    importance = torch.diagonal(hessian).clamp_min(1e-10)

    def block_errors(values: torch.Tensor) -> torch.Tensor:                                  # [rows, blocks]
        delta = (weight - values).reshape(rows, n, width)
        return torch.einsum("rbw,bwv,rbv->rb", delta, blocks_h, delta)

    def clipped(ratio: torch.Tensor) -> torch.Tensor:
        limit = (peak * ratio).unsqueeze(-1)
        return weight.reshape(rows, n, width).clamp(-limit, limit).reshape(rows, cols)

    def best_of(candidates) -> torch.Tensor:
        """Each block's ratio of the lowest error among (ratio [rows, blocks], error) pairs, the first on ties."""
        best_ratio, best_error = next(candidates)
        for ratio, error in candidates:
            best_ratio = torch.where(error < best_error, ratio, best_ratio)
            best_error = torch.minimum(error, best_error)
        return best_ratio

    fitted = grid.fit(weight, importance)

    def shrunk(ratio: float) -> torch.Tensor:
        params = grid.shrink(fitted, ratio)
        return block_errors(grid.values(grid.codes(weight, params), params))

    def refitted(ratio: torch.Tensor) -> torch.Tensor:
        candidate = clipped(ratio)
        params = grid.fit(candidate, importance)
        return block_errors(grid.values(grid.codes(candidate, params), params))

    coarse = best_of((torch.full_like(peak, ratio), shrunk(ratio)) for ratio in CLIP_RATIOS)
    near = [(coarse + step).clamp(CLIP_RATIOS[-1], 1.0) for step in REFINE_STEPS]
    return clipped(best_of((ratio, refitted(ratio)) for ratio in near))
