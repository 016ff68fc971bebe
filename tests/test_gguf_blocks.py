"""Every GGUF grid's packed bytes (impq.export.gguf_blocks) read back, bit for bit, as impq's own values: through
gguf-py's dequantizers and through llama.cpp's `dequantize_row_*` (libggml-base shipped by llama-cpp-python)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
import torch

from impq.export.gguf_blocks import pack_blocks
from impq.quant.grids import GRIDS

_GGML = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))


def llamacpp_dequantize(packed: np.ndarray, name: str, n_values: int) -> np.ndarray:
    fn = getattr(_GGML, f"dequantize_row_{name.replace('_k', '_K')}")
    fn.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64]
    raw = np.ascontiguousarray(packed)
    out = np.empty(n_values, dtype=np.float32)
    fn(raw.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n_values)
    return out


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
    packed = pack_blocks(grid, codes, params)
    block, size = gguf.GGML_QUANT_SIZES[grid.qtype]
    assert packed.shape == (16, 512 // block * size)
    assert np.array_equal(gguf.quants.dequantize(packed, grid.qtype), ours)
    assert np.array_equal(llamacpp_dequantize(packed, name, ours.size).reshape(ours.shape), ours)
