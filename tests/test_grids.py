"""The grids' weighted scale search is at least as good as llama.cpp's own quantizer (`ggml_quantize_chunk`, in
libggml-base shipped by llama-cpp-python); the GGUF packers' oracle test is test_gguf_blocks.py."""

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


def llamacpp_quantize(w: np.ndarray, qtype) -> np.ndarray:
    """llama.cpp's own quantizer (no importance matrix), dequantized."""
    rows, cols = w.shape
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    src = np.ascontiguousarray(w, dtype=np.float32)
    dst = np.zeros((rows, cols // block * size), np.uint8)
    _GGML.ggml_quantize_chunk(int(qtype), src.ctypes.data, dst.ctypes.data, 0, rows, cols, None)
    return gguf.quants.dequantize(dst, qtype)


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
