"""Every grid's packed bytes read back, bit for bit, as impq's own values: through gguf-py's dequantizers and
through llama.cpp's `dequantize_row_*` (libggml-base shipped by llama-cpp-python). And the grids' weighted
scale search is at least as good as llama.cpp's own quantizer (`ggml_quantize_chunk`)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
import torch

from impq.quant.grids import GRIDS

_GGML = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
_GGML.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                      ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
_GGML.ggml_quantize_chunk.restype = ctypes.c_size_t


def llamacpp_dequantize(packed: np.ndarray, name: str, n_values: int) -> np.ndarray:
    fn = getattr(_GGML, f"dequantize_row_{name.replace('_k', '_K')}")
    fn.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64]
    raw = np.ascontiguousarray(packed)
    out = np.empty(n_values, dtype=np.float32)
    fn(raw.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n_values)
    return out


def llamacpp_quantize(w: np.ndarray, qtype) -> np.ndarray:
    """llama.cpp's own quantizer (no importance matrix), dequantized."""
    rows, cols = w.shape
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    src = np.ascontiguousarray(w, dtype=np.float32)
    dst = np.zeros((rows, cols // block * size), np.uint8)
    _GGML.ggml_quantize_chunk(int(qtype), src.ctypes.data, dst.ctypes.data, 0, rows, cols, None)
    return gguf.quants.dequantize(dst, qtype)


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_pack_round_trips_bit_exactly(name):
    grid = GRIDS[name]
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(16, 512, generator=gen) * torch.linspace(0.01, 3, 512)     # varied block ranges
    w[0, :256] = 0                                                              # an all-zero super-block
    w[1, :64] = w[1, :64].abs()                                                 # blocks with no negative value
    importance = torch.rand(512, generator=gen) + 0.1
    params = grid.fit(w, importance)
    codes = grid.codes(w, params)
    ours = grid.values(codes, params).numpy()
    packed = grid.pack(codes, params)
    block, size = gguf.GGML_QUANT_SIZES[grid.qtype]
    assert packed.shape == (16, 512 // block * size)
    assert np.array_equal(gguf.quants.dequantize(packed, grid.qtype), ours)
    assert np.array_equal(llamacpp_dequantize(packed, name, ours.size).reshape(ours.shape), ours)


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_scale_search_matches_or_beats_llamacpp(name):
    grid = GRIDS[name]
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.05, 2, 1024)
    ours = grid.values(grid.codes(w, p := grid.fit(w)), p)
    theirs = torch.from_numpy(llamacpp_quantize(w.numpy(), grid.qtype))
    assert ((ours - w) ** 2).sum() <= 1.02 * ((theirs - w) ** 2).sum()


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q4_k", "q3_k"])
def test_shrink_scales_every_level_toward_zero(name):
    """AWQ's clip candidates: the same codes read back at `ratio` times their values, on every GGUF grid."""
    grid = GRIDS[name]
    weight = torch.randn(8, 256)
    params = grid.fit(weight)
    codes = grid.codes(weight, params)
    assert torch.allclose(grid.values(codes, grid.shrink(params, 0.8)), 0.8 * grid.values(codes, params), atol=1e-6)


def test_shrink_keeps_an_integer_grids_zero_point():
    from impq.quant.grids import IntegerGrid

    grid = IntegerGrid(4, 32, symmetric=False)
    params = grid.fit(torch.randn(4, 64))
    shrunk = grid.shrink(params, 0.5)
    assert torch.equal(shrunk.minimum, params.minimum) and torch.equal(shrunk.scale, params.scale * 0.5)
