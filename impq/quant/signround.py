"""Learned rounding (SignRound, Cheng et al., 2023, the algorithm behind AutoRound): tune, for every weight of a
decoder block, a rounding offset V in [-0.5, 0.5] (round up or down), and for every block of the grid a scale
multiplier in [0.5, 1.5], by signed gradient descent on the block's output error. As in AutoRound, the block
runs on the inputs the quantized blocks before it produce, and its target is what the full-precision model's
block outputs on the full-precision inputs: it learns to absorb the error the earlier blocks left as well as its
own. (The first version's targets, the full-precision block on the quantized inputs, ended at a mean KLD of
0.075 against AutoRound's 0.050 on SmolLM2-135M at Q4_0, as issue 12 measured.) Rounding uses the straight-through estimator.

It starts from given weights and block parameters, whose plain rounding is the start. The driver passes the
original weights with their plain (importance-weighted) fit, as AutoRound starts. Starting from GPTQ's
error-compensated weights instead left each block's own output error lower, yet the model's divergence much
higher: on SmolLM2-135M at Q4_0 the RTN start reached a KLD of 0.044 where GPTQ alone gave 0.11
(bench/results/quant_proxy_real_lm.jsonl), since a block trained against the accumulated error need not match
GPTQ's per-layer optimum. The tuning sees the first seven eighths of the calibration sequences; the block keeps
whichever rounding has the lowest output error on the last eighth, which the tuning never saw: the learned one or
a rival's (the driver passes GPTQ's), so it never ends above GPTQ there, and a tuning that fits its own sequences
(or diverges) cannot win. (The earlier guard scored on the tuned sequences too; issue 30 reports learned
rounding's whole-model KLD above GPTQ's with it, on SmolLM2 calibrated and evaluated on reference-manual text.)
With no rival, the start's plain rounding competes instead. The kept rounding's outputs on every input come
back with it: they are the next block's inputs, so no further pass computes them.

Written here rather than taken from auto-round because the result must land on impq's grids: the codes are the
grid's own rounding of w + V * scale with the grid's own parameters, so the k-quants' integer sub-block scales
(which cannot move freely) keep their fitted values and only the rounding is learned there.
"""

from __future__ import annotations

import random
from typing import Callable, NamedTuple

import torch
from torch import nn
from torch.func import functional_call

from .grids import BlockParams, Grid, _fp16

ITERATIONS = 200
BATCH = 4                    # calibration sequences per step
# the training steps run under bfloat16 autocast, as AutoRound trains: on SmolLM2 at Q4_0 it cut a block's training
# from 91 s to 57 s with a slightly lower block error (bench/results/signround_blocks.md); the final comparison with
# the start and the codes stay in float32
PRECISION = torch.bfloat16


def _per_column(t: torch.Tensor, grid: Grid, cols: int) -> torch.Tensor:
    return t.repeat_interleave(grid.sub, dim=1)[:, :cols]


class LearnedRounding(nn.Module):
    """One linear layer's trainable rounding offsets and block-scale multipliers on a fixed grid."""

    def __init__(self, weight: torch.Tensor, params: BlockParams, grid: Grid):
        super().__init__()
        self.weight, self.params, self.grid = weight.float(), params, grid
        self.offset = nn.Parameter(torch.zeros_like(self.weight))
        # scales stored as small integers times a super-block scale (k-quants) stay as fitted
        self.tune_scale = grid.tunable_scales
        self.scale_factor = nn.Parameter(torch.ones_like(params.scale), requires_grad=self.tune_scale)

    def current_params(self) -> BlockParams:
        if not self.tune_scale:
            return self.params
        return BlockParams(self.params.scale * self.scale_factor, self.params.minimum, self.params.extra)

    def forward(self) -> torch.Tensor:
        params = self.current_params()
        cols = self.weight.shape[1]
        step = _per_column(params.scale.detach(), self.grid, cols)
        codes = self.grid.codes(self.weight + self.offset.detach() * step, BlockParams(
            params.scale.detach(), params.minimum, params.extra))
        value = self.grid.values(codes, params)                      # differentiable in the scale multiplier
        return value + step * (self.offset - self.offset.detach())    # straight-through gradient for the offsets

    @torch.no_grad()
    def clamp_(self) -> None:
        self.offset.clamp_(-0.5, 0.5)
        self.scale_factor.clamp_(0.5, 1.5)

    @torch.no_grad()
    def result(self) -> tuple[torch.Tensor, BlockParams]:
        """Codes and parameters exactly on the grid (scales rounded to the format's fp16)."""
        params = self.current_params()
        if self.tune_scale:
            params = BlockParams(_fp16(params.scale), params.minimum, params.extra)
        step = _per_column(params.scale, self.grid, self.weight.shape[1])
        return self.grid.codes(self.weight + self.offset * step, params), params


Start = dict[str, tuple[torch.Tensor, BlockParams]]         # linear layer name -> (weights to round, parameters)
Rounding = dict[str, tuple[torch.Tensor, BlockParams]]      # linear layer name -> (codes, parameters)


HELD_OUT = 8                 # the last 1/HELD_OUT of the calibration sequences judge the block, never tune it


class ScoredRounding(NamedTuple):
    rounding: Rounding
    error: float                    # the block's summed output MSE against the targets on the scored inputs
    outputs: list[torch.Tensor]     # the block's float32 outputs on the scored inputs with this rounding


class BlockChoice(NamedTuple):
    """What learned rounding kept for one block, chosen on sequences its tuning never saw."""
    rounding: Rounding
    outputs: list[torch.Tensor]     # the kept rounding's outputs on every input: the next block's inputs
    kept: str                       # "learned", or the kept rival's name ("gptq")
    held_out_errors: dict[str, float]   # each candidate's summed output MSE on the held-out sequences
    held_out: int                   # how many sequences were held out


def held_out_split(n: int) -> int:
    """Where the held-out sequences start: the last eighth (at least one), none when there is a single one."""
    return n - max(1, n // HELD_OUT) if n > 1 else n


def signround_block(layer: nn.Module, inputs: list[tuple[torch.Tensor, dict]], targets: list[torch.Tensor],
                    start: Start, grids: dict[str, Grid], *, iterations: int = ITERATIONS,
                    batch: int = BATCH, keep_best: bool = False, seed: int = 0,
                    precision: torch.dtype = PRECISION, rivals: dict[str, Rounding] | None = None,
                    learning_rate: float | None = None,
                    on_step: Callable[[int], None] | None = None) -> BlockChoice:
    """Learn the rounding of the linear layers in `start` (name -> weights to round, fitted block parameters), each
    onto its grid in `grids`, so that the block's outputs on `inputs` approach `targets`, and keep whichever of the
    learned rounding and the `rivals` (name -> other roundings of the same layers: the driver passes GPTQ's; None:
    the plain rounding of `start`; {}: none) has the lowest output error on the calibration sequences held out
    from the tuning (the last eighth). Each rounding is name -> (codes, parameters). `keep_best`: end on the step with the lowest batch loss, as AutoRound does, instead
    of the last step; on SmolLM2 it left a higher block error (bench/results/signround_blocks.md), so it is off.
    `precision`: the dtype the training steps run in under autocast (float32: none). `learning_rate`: the signed
    step's start (default 1 / iterations, AutoRound's)."""
    modules = {name: LearnedRounding(weight, params, grids[name]) for name, (weight, params) in start.items()}
    trainable = [p for m in modules.values() for p in (m.offset, m.scale_factor) if p.requires_grad]
    frozen = [p for p in layer.parameters() if p.requires_grad]       # only the rounding is trained
    split = held_out_split(len(inputs))
    for p in frozen:
        p.requires_grad_(False)
    try:
        _train(layer, inputs[:split], targets[:split], modules, trainable, iterations, batch, keep_best, seed,
               precision, learning_rate if learning_rate is not None else 1 / max(iterations, 1), on_step)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    candidates = {"learned": {name: m.result() for name, m in modules.items()}}
    candidates.update({"plain": {name: (m.grid.codes(m.weight, m.params), m.params) for name, m in modules.items()}}
                      if rivals is None else rivals)
    # a single sequence cannot be split: it both tunes and judges
    judged = slice(split, None) if split < len(inputs) else slice(None)
    with torch.no_grad():
        scored = {name: score_rounding(layer, inputs[judged], targets[judged], rounding, grids)
                  for name, rounding in candidates.items()}
        kept = min(scored, key=lambda name: scored[name].error)       # the learned one on ties
        outputs = score_rounding(layer, inputs[:split], targets[:split], candidates[kept], grids).outputs \
            if judged.start is not None else []
    return BlockChoice(candidates[kept], outputs + scored[kept].outputs, kept,
                       {name: result.error for name, result in scored.items()}, len(inputs) - split)


def _block_output(layer, weights: dict[str, torch.Tensor], sample: tuple[torch.Tensor, dict]) -> torch.Tensor:
    """The block's output with `weights` (parameter name -> tensor) in place of its own."""
    hidden, kwargs = sample
    out = functional_call(layer, weights, (hidden,), kwargs)
    return out[0] if isinstance(out, tuple) else out


def _output_error(layer, weights: dict[str, torch.Tensor], sample: tuple[torch.Tensor, dict],
                  target: torch.Tensor) -> torch.Tensor:
    """Mean square error of the block's output with `weights` in place of its own, against `target`."""
    return torch.nn.functional.mse_loss(_block_output(layer, weights, sample).float(), target.float())


def score_weights(layer, inputs, targets, weights: dict[str, torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    """The block's summed output MSE on every input with `weights` in place of its own, and those outputs."""
    error, outputs = 0.0, []
    for sample, target in zip(inputs, targets):
        out = _block_output(layer, weights, sample).float()
        error += float(torch.nn.functional.mse_loss(out, target.float()))
        outputs.append(out)
    return error, outputs


def score_rounding(layer, inputs, targets, rounding: Rounding, grids: dict[str, Grid]) -> ScoredRounding:
    return ScoredRounding(rounding, *score_weights(layer, inputs, targets, {
        f"{name}.weight": grids[name].values(codes, params) for name, (codes, params) in rounding.items()}))


def _train(layer, inputs, targets, modules, trainable, iterations, batch, keep_best, seed, precision, learning_rate,
           on_step) -> None:
    rng = random.Random(seed)
    best_loss, best = float("inf"), None
    for step in range(iterations):
        chosen = rng.sample(range(len(inputs)), min(batch, len(inputs)))
        weights = {f"{name}.weight": m() for name, m in modules.items()}
        with torch.autocast(inputs[0][0].device.type, dtype=precision, enabled=precision != torch.float32):
            loss = sum(_output_error(layer, weights, inputs[i], targets[i]) for i in chosen)
        if keep_best and (value := float(loss.detach())) < best_loss:   # the parameters before this update
            best_loss, best = value, [p.detach().clone() for p in trainable]
        for p in trainable:
            p.grad = None
        loss.backward()
        with torch.no_grad():
            # AutoRound's default learning rate, 1 / iterations (0.005 for 200 steps), decayed linearly
            rate = (1 - step / iterations) * learning_rate
            for p in trainable:
                if p.grad is not None:
                    p -= rate * p.grad.sign()
        for m in modules.values():
            m.clamp_()
        if on_step:
            on_step(step)
    if best is not None:
        with torch.no_grad():
            for p, kept in zip(trainable, best):
                p.copy_(kept)
