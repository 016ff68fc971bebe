"""Target grids: the exact sets of values a format can hold, and their arithmetic.

A grid never knows which algorithm chose its values. Algorithms call:
  `fit(w, importance)`  -> per-block parameters (scale, and min for asymmetric grids), already rounded to the
                           format's storage precision (fp16), chosen by an importance-weighted error search;
  `codes(w, params)`    -> the integer codes of w on that grid (round to nearest, clamped);
  `values(codes, params)` -> what a reader of the file computes from them, bit for bit.
Blocks run along the input dimension (a weight row's consecutive `block` columns), as in GGUF.

GGUF grids: the 32-wide legacy blocks (Q8_0, Q5_0, Q5_1, Q4_0, Q4_1) and the 256-wide k-quants (Q6_K ... Q2_K),
packed by impq.export.gguf_blocks. Integer grids (`IntegerGrid`: int2-int8, one fp16 scale and an integer zero
point per group) are the grid of GPTQ, AWQ and compressed-tensors safetensors, packed by the layouts of
impq.export.safetensors_layouts. Each packer's oracle test sits beside it (tests/test_gguf_blocks.py,
tests/test_safetensors.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import gguf
import numpy as np
import torch

QType = gguf.GGMLQuantizationType


@dataclass
class BlockParams:
    """Per-row block parameters of a grid. `scale`/`minimum` are the effective per-block values a reader
    computes (value = scale * (q - offset), or scale * q + minimum); `extra` holds what the format stores
    when that differs (k-quants: super-block fp16 scales and 6- or 8-bit sub-block scales)."""
    scale: torch.Tensor                 # [rows, blocks]
    minimum: torch.Tensor | None        # [rows, blocks] for asymmetric grids (GGUF: the additive minimum;
                                        # integer grids: the integer zero point), else None
    extra: dict = field(default_factory=dict)

    def columns(self, start: int, stop: int, total: int) -> "BlockParams":
        """The parameters of columns [start, stop) of a `total`-column weight (block-aligned)."""
        def part(t: torch.Tensor) -> torch.Tensor:
            per = total // t.shape[1]
            return t[:, start // per:stop // per]
        return BlockParams(part(self.scale), None if self.minimum is None else part(self.minimum),
                           {k: part(v) for k, v in self.extra.items()})

    def to(self, device) -> "BlockParams":
        return BlockParams(self.scale.to(device), None if self.minimum is None else self.minimum.to(device),
                           {k: v.to(device) for k, v in self.extra.items()})

    @staticmethod
    def concat(parts: list["BlockParams"]) -> "BlockParams":
        """Parameters of consecutive column ranges, joined along the block axis."""
        first = parts[0]
        return BlockParams(torch.cat([p.scale for p in parts], 1),
                           None if first.minimum is None else torch.cat([p.minimum for p in parts], 1),
                           {k: torch.cat([p.extra[k] for p in parts], 1) for k in first.extra})


RANGE_SHRINKS = np.linspace(0, 0.2, 5)      # asymmetric searches: fractions of the range pulled in at each end


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def _best_per_block(candidates: list[BlockParams], errors: list[torch.Tensor]) -> BlockParams:
    """For each block, the candidate parameters with the lowest error (the first on ties)."""
    choice = torch.stack(errors).argmin(0)                       # [rows, blocks]

    def pick(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(tensors).gather(0, choice.unsqueeze(0)).squeeze(0)

    minimum = None if candidates[0].minimum is None else pick([c.minimum for c in candidates])
    return BlockParams(pick([c.scale for c in candidates]), minimum)


def _integer_scales(values: torch.Tensor, top: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-block values [rows, supers, per] as integers in [lo, hi] times an fp16 super-block scale chosen so that
    `top` maps to `hi`. Returns (super scale [rows, supers], integers)."""
    d = _fp16(top / hi)
    q = torch.round(values / d.clamp_min(1e-30).unsqueeze(-1)).clamp(lo, hi)
    return d, torch.where(d.unsqueeze(-1) == 0, torch.zeros_like(q), q)


class Grid(Protocol):
    """What an algorithm may know of a grid: its shape, code range and capabilities, and its arithmetic; never
    which format it is (RTN, GPTQ, AWQ and learned rounding take any grid)."""

    name: str
    block: int                  # columns fitted together
    sub: int                    # columns sharing one (scale, minimum)
    qmin: int                   # the code range
    qmax: int
    tunable_scales: bool        # a block's scale may take any fp16 value (k-quants: integer sub-block scales)
    fallback: Grid | None       # what the format stores where a row's width does not fill this grid's blocks

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None, steps: int = 24) -> BlockParams: ...

    def codes(self, w: torch.Tensor, params: BlockParams) -> torch.Tensor: ...

    def values(self, codes: torch.Tensor, params: BlockParams) -> torch.Tensor: ...

    def column(self, w: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def shrink(self, params: BlockParams, ratio: float) -> BlockParams: ...


class LegacyGrid:
    """32-wide blocks with one fp16 scale (and an fp16 minimum when asymmetric).

    Symmetric: value = d * (q - offset), q in [0, 2^bits - 1] (Q8_0 stores signed q with offset 0).
    Asymmetric: value = d * q + m, q in [0, 2^bits - 1].
    """

    block = 32          # columns fitted together
    sub = 32            # columns sharing one (scale, minimum)
    tunable_scales = True
    fallback = None     # legacy blocks fit every width that is a multiple of 32

    def __init__(self, qtype: QType, bits: int, symmetric: bool):
        self.qtype, self.bits, self.symmetric = qtype, bits, symmetric
        if qtype == QType.Q8_0:
            self.qmin, self.qmax, self.offset = -128, 127, 0
        else:
            self.qmin, self.qmax = 0, 2 ** bits - 1
            self.offset = 2 ** (bits - 1) if symmetric else 0

    @property
    def name(self) -> str:
        return self.qtype.name

    def _blocks(self, w: torch.Tensor) -> torch.Tensor:
        """[rows, cols] -> [rows, cols / sub, sub]."""
        rows, cols = w.shape
        if cols % self.block:
            raise ValueError(f"{cols} columns do not fill {self.block}-wide {self.name} blocks")
        return w.reshape(rows, cols // self.sub, self.sub)

    def _quantize(self, x: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None) -> torch.Tensor:
        """Codes (as floats) of x with broadcastable parameters: round to nearest, clamp to the grid."""
        inv = torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)
        q = torch.round(x * inv) + self.offset if self.symmetric else torch.round((x - minimum) * inv)
        return q.clamp(self.qmin, self.qmax)

    def _dequantize(self, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None) -> torch.Tensor:
        """What a reader computes from codes, in the reader's order of operations."""
        return scale * (q - self.offset) if self.symmetric else scale * q + minimum

    @staticmethod
    def _per_block(params: BlockParams) -> tuple[torch.Tensor, torch.Tensor | None]:
        return params.scale.unsqueeze(-1), None if params.minimum is None else params.minimum.unsqueeze(-1)

    def codes(self, w: torch.Tensor, params: BlockParams) -> torch.Tensor:
        q = self._quantize(self._blocks(w.float()), *self._per_block(params))
        return q.to(torch.int32).reshape(w.shape)

    def column(self, w: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, values) of one weight column [rows] with its block's per-row parameters (for GPTQ)."""
        q = self._quantize(w, scale, minimum)
        return q.to(torch.int32), self._dequantize(q, scale, minimum)

    def values(self, codes: torch.Tensor, params: BlockParams) -> torch.Tensor:
        return self._dequantize(self._blocks(codes.float()), *self._per_block(params)).reshape(codes.shape)

    def _error(self, blocks: torch.Tensor, params: BlockParams, imp: torch.Tensor) -> torch.Tensor:
        """Importance-weighted squared error per block, [rows, blocks], of blocked weights [rows, blocks, sub]: the
        values `values(codes(...))` gives, bit for bit, without the integer codes and reshapes between (the fit's
        whole cost is this, once per candidate), the error's passes in place."""
        scale, minimum = self._per_block(params)
        diff = self._dequantize(self._quantize(blocks, scale, minimum), scale, minimum)
        return diff.sub_(blocks).square_().mul_(imp).sum(-1)

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None, steps: int = 24) -> BlockParams:
        """Per-block scale (and minimum) minimising sum(importance * (w - value)^2) over a grid of candidates
        around the min/max choice (the search llama.cpp's make_qx_quants does, here vectorised over blocks)."""
        blocks = self._blocks(w.float())
        imp = torch.ones(w.shape[1], device=w.device) if importance is None else importance.float()
        imp = self._blocks(imp.expand(w.shape[0], -1))
        if self.symmetric:
            # the largest-magnitude value, with its sign, maps to the grid's most negative level (as ggml does)
            idx = blocks.abs().argmax(dim=-1, keepdim=True)
            peak = blocks.gather(-1, idx).squeeze(-1)
            base = peak / (self.qmin - self.offset) if self.qtype != QType.Q8_0 else blocks.abs().amax(-1) / 127
            bases = [base] if self.qtype == QType.Q8_0 else [base, peak / (self.qmax - self.offset)]
            candidates = [BlockParams(_fp16(b * (1 + 0.025 * k)), None)
                          for b in bases for k in range(-steps // 2, steps // 2 + 1)]
        else:
            candidates = [self._range_candidate(blocks, shrink_lo, shrink_hi)
                          for shrink_lo in RANGE_SHRINKS for shrink_hi in RANGE_SHRINKS]
        return _best_per_block(candidates, [self._error(blocks, c, imp) for c in candidates])

    def shrink(self, params: BlockParams, ratio: float) -> BlockParams:
        """Effective parameters whose levels are `ratio` times those of `params` (the range pulled toward 0): a
        clip candidate. Only `codes` and `values` read them; a format's stored scales are refitted after."""
        return BlockParams(params.scale * ratio, None if params.minimum is None else params.minimum * ratio)

    def _range_candidate(self, blocks: torch.Tensor, shrink_lo: float, shrink_hi: float) -> BlockParams:
        """Asymmetric parameters for the blocks' [min, max] range with each end pulled in by a fraction of it."""
        lo, hi = blocks.amin(-1), blocks.amax(-1)
        m = lo + (hi - lo) * shrink_lo
        return BlockParams(_fp16((hi - (hi - lo) * shrink_hi - m) / self.qmax), _fp16(m))


GRIDS = {
    "q8_0": LegacyGrid(QType.Q8_0, 8, True),
    "q5_0": LegacyGrid(QType.Q5_0, 5, True),
    "q5_1": LegacyGrid(QType.Q5_1, 5, False),
    "q4_0": LegacyGrid(QType.Q4_0, 4, True),
    "q4_1": LegacyGrid(QType.Q4_1, 4, False),
}


class KQuantGrid(LegacyGrid):
    """256-wide k-quant super-blocks: sub-block scales (and minimums) stored as small integers times an fp16
    super-block scale. Effective per-sub-block parameters make `codes`, `values` and `column` those of the
    legacy grids; `fit` first searches float sub-block parameters, then quantizes them as the format stores them.

    Q4_K, Q5_K: 8 sub-blocks of 32; value = d*sc*q - dmin*m (6-bit sc and m).
    Q2_K: 16 sub-blocks of 16; value = d*sc*q - dmin*m (4-bit sc and m), q in 0..3.
    Q6_K: 16 sub-blocks of 16; value = d*sc*(q - 32) (int8 sc).
    Q3_K: 16 sub-blocks of 16; value = d*sc*(q - 4) (sc in -32..31, stored 6-bit with +32), q in 0..7.
    """

    block = 256
    tunable_scales = False      # sub-block scales are small integers times the super-block scale

    def __init__(self, qtype: QType, bits: int, symmetric: bool, sub: int, scale_levels: int):
        super().__init__(qtype, bits, symmetric)
        self.sub = sub
        self.scale_levels = scale_levels     # largest stored sub-block scale (and minimum) magnitude

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None, steps: int = 24) -> BlockParams:
        rows, cols = w.shape
        n_super = cols // self.block
        per = self.block // self.sub
        if not self.symmetric:
            # k-quant minimums are stored as magnitudes: the lowest level must be <= 0
            float_params = self._least_squares_asymmetric(w, importance)
            scales = float_params.scale.clamp_min(0).reshape(rows, n_super, per)
            mins = (-float_params.minimum).clamp_min(0).reshape(rows, n_super, per)
            d_super, sc = _integer_scales(scales, scales.amax(-1), 0, self.scale_levels)
            m_super, m = _integer_scales(mins, mins.amax(-1), 0, self.scale_levels)
            scale = (d_super.unsqueeze(-1) * sc).reshape(rows, -1)
            minimum = -(m_super.unsqueeze(-1) * m).reshape(rows, -1)
            return BlockParams(scale, minimum, {"d": d_super, "dmin": m_super, "sc": sc.to(torch.int32).reshape(rows, -1),
                                                "m": m.to(torch.int32).reshape(rows, -1)})
        # float sub-block scales from the legacy search, with the sub-block as its block
        flat = LegacyGrid(self.qtype, self.bits, self.symmetric)
        flat.block = flat.sub = self.sub
        scales = flat.fit(w, importance, steps).scale.reshape(rows, n_super, per)
        d_super, sc = _integer_scales(scales, scales.abs().amax(-1), -self.scale_levels - 1, self.scale_levels)
        scale = (d_super.unsqueeze(-1) * sc).reshape(rows, -1)
        return BlockParams(scale, None, {"d": d_super, "sc": sc.to(torch.int32).reshape(rows, -1)})

    def _least_squares_asymmetric(self, w: torch.Tensor, importance: torch.Tensor | None) -> BlockParams:
        """Per sub-block (scale, min <= 0): for each of 21 candidate inverse scales, round, then solve the weighted
        least-squares scale and minimum for those codes; keep the best (the search of ggml's make_qkx2_quants).
        As there, the min/max fit is the start every solve must beat, and a solve whose system is singular is no
        candidate (ggml's `D > 0`): where one column's importance is 1e7 times its neighbours' (SmolLM2's
        down_proj on reference-manual text), the weighted system is singular to float32 precision, and its
        solution was a 1e37 scale, finite, scored by the expanded sums as the best, and inf once stored as fp16."""
        x = self._blocks(w.float())
        if importance is None:   # ggml's default weighting: typical magnitude plus the value's own
            weights = x.pow(2).mean(-1, keepdim=True).sqrt() + x.abs()
        else:
            weights = self._blocks(importance.float().expand(w.shape[0], -1))
        lo = x.amin(-1, keepdim=True).clamp(max=0)
        hi = x.amax(-1, keepdim=True)
        span = (hi - lo).clamp_min(1e-12)
        sw, sx = weights.sum(-1, keepdim=True), (weights * x).sum(-1, keepdim=True)
        sxx = (weights * x * x).sum(-1, keepdim=True)
        shifted = x - lo
        candidates, errors = [], []
        for step in range(21):
            iscale = (-1.0 + 0.1 * step + self.qmax) / span
            codes = torch.round(iscale * shifted).clamp_(0, self.qmax)
            weighted = weights * codes
            sl, sl2 = weighted.sum(-1, keepdim=True), (weighted * codes).sum(-1, keepdim=True)
            sxl = (weighted * x).sum(-1, keepdim=True)
            det = sw * sl2 - sl * sl
            # sw * sl2 >= sl^2 (Cauchy-Schwarz): relative to its terms, a determinant at rounding level is singular
            solvable = det > 1e-5 * sw * sl2
            det = torch.where(solvable, det, torch.ones_like(det))
            scale = (sw * sxl - sx * sl) / det
            minimum = (sl2 * sx - sl * sxl) / det
            positive = minimum > 0
            scale = torch.where(positive, sxl / sl2.clamp_min(1e-30), scale)
            minimum = torch.where(positive, torch.zeros_like(minimum), minimum)
            # sum(w (scale * q + min - x)^2) from the sums already taken: no further pass over the block (the
            # search is most of a Q4_K / Q5_K / Q2_K GPTQ run at Phi-2's size)
            error = (scale * scale * sl2 + 2 * scale * minimum * sl - 2 * scale * sxl + minimum * minimum * sw
                     - 2 * minimum * sx + sxx)
            errors.append(torch.where(solvable, error, torch.full_like(error, math.inf)).squeeze(-1))
            candidates.append(BlockParams(scale.squeeze(-1), minimum.squeeze(-1)))
        # last, so that a solve it ties keeps the block (it is never better where the solve exists)
        start_values = torch.round(shifted * (self.qmax / span)).clamp_(0, self.qmax) * (span / self.qmax) + lo
        candidates.append(BlockParams((span / self.qmax).squeeze(-1), lo.squeeze(-1)))
        errors.append((weights * (start_values - x).square()).sum(-1))
        return _best_per_block(candidates, errors)


GRIDS.update({
    "q6_k": KQuantGrid(QType.Q6_K, 6, True, 16, 127),
    "q5_k": KQuantGrid(QType.Q5_K, 5, False, 32, 63),
    "q4_k": KQuantGrid(QType.Q4_K, 4, False, 32, 63),
    "q3_k": KQuantGrid(QType.Q3_K, 3, True, 16, 31),
    "q2_k": KQuantGrid(QType.Q2_K, 2, False, 16, 15),
})
# llama.cpp's width fallbacks (llama-quant.cpp): a k-quant tensor whose rows do not fill 256-wide super-blocks is
# stored at this legacy type instead
for _name, _fallback in {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}.items():
    GRIDS[_name].fallback = GRIDS[_fallback]


class IntegerGrid(LegacyGrid):
    """`bits`-bit integer codes with one fp16 scale and one integer zero point per `group` consecutive input
    columns: value = scale * (q - zero), q in [0, 2^bits - 1]. Symmetric: zero = 2^(bits - 1) in every group
    (int4: q - 8 in [-8, 7]). The grid of GPTQ, AWQ and compressed-tensors checkpoints."""

    qtype = None

    def __init__(self, bits: int, group: int, symmetric: bool):
        if not 2 <= bits <= 8:
            raise ValueError(f"integer grids hold 2 to 8 bits, not {bits}")
        self.bits, self.symmetric = bits, symmetric
        self.block = self.sub = group
        self.qmin, self.qmax, self.offset = 0, 2 ** bits - 1, 2 ** (bits - 1)

    @property
    def name(self) -> str:
        return f"int{self.bits}-g{self.block}-{'sym' if self.symmetric else 'asym'}"

    # two grids of the same shape are one grid (one config group of a mixed-width checkpoint)
    def __eq__(self, other) -> bool:
        return getattr(other, "name", None) == self.name      # names say the grid's shape and kind

    def __hash__(self) -> int:
        return hash(self.name)

    def _quantize(self, x, scale, zero):
        if self.symmetric:
            return super()._quantize(x, scale, None)
        inv = torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)
        return (torch.round(x * inv) + zero).clamp(self.qmin, self.qmax)

    def _dequantize(self, q, scale, zero):
        return scale * (q - (self.offset if self.symmetric else zero))

    def shrink(self, params: BlockParams, ratio: float) -> BlockParams:
        # value = scale * (q - zero): the integer zero point stays
        return BlockParams(params.scale * ratio, params.minimum)

    def _range_candidate(self, blocks: torch.Tensor, shrink_lo: float, shrink_hi: float) -> BlockParams:
        # the range must hold 0 so that the integer zero point lies on the grid
        low = blocks.amin(-1).clamp(max=0) * (1 - shrink_lo)
        high = blocks.amax(-1).clamp(min=0) * (1 - shrink_hi)
        scale = _fp16((high - low) / self.qmax)
        return BlockParams(scale, torch.round(-low / scale.clamp_min(1e-30)).clamp(self.qmin, self.qmax))
