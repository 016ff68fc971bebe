"""GGUF block bytes: impq's own codes and block parameters packed as llama.cpp stores each quant type, one packer
per block layout (as gguf-py keeps one class per type). Written here because gguf-py quantizes only by plain
round-to-nearest: impq must store the codes and scales its algorithms chose. Their oracles
(tests/test_gguf_blocks.py) are gguf-py's dequantizers and llama.cpp's own `dequantize_row_*`."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..quant.grids import BlockParams, QType
from .gguf_file import PlannedTensor


def _pack_legacy(grid, codes: torch.Tensor, params: BlockParams) -> np.ndarray:
    """32-wide blocks: an fp16 scale (and an fp16 minimum when asymmetric), then the codes."""
    rows, cols = codes.shape
    nb = cols // grid.block
    q = codes.reshape(rows, nb, grid.block).numpy()
    parts = [params.scale.numpy().astype(np.float16).view(np.uint8).reshape(rows, nb, 2)]
    if not grid.symmetric:
        parts.append(params.minimum.numpy().astype(np.float16).view(np.uint8).reshape(rows, nb, 2))
    if grid.qtype == QType.Q8_0:
        parts.append(q.astype(np.int8).view(np.uint8))
    else:
        low = (q & 0xF).astype(np.uint8)
        if grid.bits == 5:
            high = ((q >> 4) & 1).astype(np.uint32)
            qh = (high << np.arange(32, dtype=np.uint32)).sum(-1, dtype=np.uint32)
            parts.append(qh.astype("<u4").view(np.uint8).reshape(rows, nb, 4))
        # byte j holds element j in its low nibble and element j + 16 in its high nibble
        parts.append(low[..., :16] | (low[..., 16:] << 4))
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def _pack_k_quant(grid, codes: torch.Tensor, params: BlockParams) -> np.ndarray:
    """256-wide super-blocks with their sub-block scales (and minimums) as llama.cpp's block_qN_K lays them out."""
    rows, cols = codes.shape
    n_super = cols // grid.block
    q = codes.reshape(rows, n_super, grid.block).numpy().astype(np.uint8)
    d = params.extra["d"].numpy().astype(np.float16).view(np.uint8).reshape(rows, n_super, 2)
    if grid.qtype in (QType.Q2_K, QType.Q3_K):
        # qs byte n*32 + l holds, at bit shift 2j, element n*128 + j*32 + l (low two bits of its code)
        grouped = q.reshape(rows, n_super, 2, 4, 32)               # [.., half n, j, l]
        qs = ((grouped & 3) << (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 1, 4, 1)).sum(3, dtype=np.uint8)
        qs = qs.reshape(rows, n_super, 64)
        if grid.qtype == QType.Q2_K:
            sc = params.extra["sc"].numpy().astype(np.uint8).reshape(rows, n_super, 16)
            m = params.extra["m"].numpy().astype(np.uint8).reshape(rows, n_super, 16)
            dmin = params.extra["dmin"].numpy().astype(np.float16).view(np.uint8).reshape(rows, n_super, 2)
            parts = [sc | (m << 4), qs, d, dmin]
        else:
            # hmask byte l, bit n*4 + j: the third bit of element n*128 + j*32 + l
            third = ((grouped >> 2) & 1).reshape(rows, n_super, 8, 32)
            hmask = (third << np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)).sum(2, dtype=np.uint8)
            s6 = (params.extra["sc"].numpy() + 32).astype(np.uint8).reshape(rows, n_super, 16)
            low, high = s6 & 0xF, s6 >> 4
            scales = np.concatenate([low[..., 0:4] | (low[..., 8:12] << 4), low[..., 4:8] | (low[..., 12:16] << 4),
                                     high[..., 0:4] | (high[..., 4:8] << 2) | (high[..., 8:12] << 4)
                                     | (high[..., 12:16] << 6)], -1)
            parts = [hmask, qs, scales, d]
    elif grid.qtype == QType.Q6_K:
        halves = q.reshape(rows, n_super, 2, 4, 32)            # [.., half, quarter k, l]
        low, high = halves & 0xF, halves >> 4
        ql = np.concatenate([low[..., 0, :] | (low[..., 2, :] << 4), low[..., 1, :] | (low[..., 3, :] << 4)], -1)
        qh = high[..., 0, :] | (high[..., 1, :] << 2) | (high[..., 2, :] << 4) | (high[..., 3, :] << 6)
        sc = params.extra["sc"].numpy().astype(np.int8).view(np.uint8).reshape(rows, n_super, 16)
        parts = [ql.reshape(rows, n_super, 128), qh.reshape(rows, n_super, 64), sc, d]
    else:
        dmin = params.extra["dmin"].numpy().astype(np.float16).view(np.uint8).reshape(rows, n_super, 2)
        sc = params.extra["sc"].numpy().astype(np.uint8).reshape(rows, n_super, 8)
        m = params.extra["m"].numpy().astype(np.uint8).reshape(rows, n_super, 8)
        scales = np.concatenate([
            (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6),
            (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6),
            (sc[..., 4:] & 0xF) | ((m[..., 4:] & 0xF) << 4)], -1)
        subs = q.reshape(rows, n_super, 4, 2, 32)               # [.., chunk, low/high, l]
        qs = ((subs[..., 0, :] & 0xF) | ((subs[..., 1, :] & 0xF) << 4)).reshape(rows, n_super, 128)
        parts = [d, dmin, scales]
        if grid.qtype == QType.Q5_K:
            fifth = (q.reshape(rows, n_super, 8, 32) >> 4) & 1
            qh = (fifth << np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)).sum(2, dtype=np.uint8)
            parts.append(qh)
        parts.append(qs)
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


PACKERS = {QType.Q8_0: _pack_legacy, QType.Q5_0: _pack_legacy, QType.Q5_1: _pack_legacy, QType.Q4_0: _pack_legacy,
           QType.Q4_1: _pack_legacy, QType.Q6_K: _pack_k_quant, QType.Q5_K: _pack_k_quant,
           QType.Q4_K: _pack_k_quant, QType.Q3_K: _pack_k_quant, QType.Q2_K: _pack_k_quant}


def pack_blocks(grid, codes: torch.Tensor, params: BlockParams) -> np.ndarray:
    """The GGUF bytes of a GGUF grid's codes and parameters, [rows, blocks * bytes per block]."""
    return PACKERS[grid.qtype](grid, codes, params)


def chosen_blocks(name: str, shape: tuple[int, ...], quantized, canonical: str,
                  rows: Callable[[np.ndarray], np.ndarray] | None = None) -> PlannedTensor:
    """A tensor written as the codes and block parameters an impq algorithm chose (`quantized`: a
    driver.QuantizedTensor); `rows` reorders the packed rows (blocks run along rows, so a row permutation applies
    to them as they are)."""
    def packed() -> np.ndarray:
        data = pack_blocks(quantized.grid, quantized.codes, quantized.params)
        return data if rows is None else rows(data)

    return PlannedTensor(name, tuple(shape), quantized.grid.qtype, lambda: None, packed, canonical)
