"""safetensors outputs: the GPTQ and AWQ packings match the reference packers of AutoGPTQ and AutoAWQ, every
layout reads back to exactly impq's grid values, and transformers loads the compressed-tensors folder on the CPU
and computes the same logits as impq's dequantized weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from impq.export.safetensors_layouts import LAYOUTS
from impq.export.safetensors_model import read_dequantized_llm
from impq.models.layouts import read_spec
from impq.models.lmm import LMM
from impq.quant.gptq import gptq
from impq.quant.grids import IntegerGrid
from impq.quant.rtn import rtn

from test_quantize import _calib_file


def _quantized(grid: IntegerGrid, rows: int = 64, cols: int = 256, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen) * torch.linspace(0.2, 2.0, cols)
    x = torch.randn(512, cols, generator=gen)
    codes, params = gptq(weight, x.T @ x / 512, grid)
    return weight, codes, params


def _autogptq_pack(intweight: np.ndarray, zeros: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """AutoGPTQ's QuantLinear.pack (qlinear_cuda_old.py), as published: intweight [in, out], zeros [groups, out]."""
    intweight = intweight.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        for j in range(i, i + (32 // bits)):
            qweight[row] |= intweight[j] << (bits * (j - i))
        i += 32 // bits
        row += 1
    zeros = (zeros - 1).astype(np.uint32) & (2 ** bits - 1)
    qzeros = np.zeros((zeros.shape[0], zeros.shape[1] // 32 * bits), dtype=np.uint32)
    i = col = 0
    while col < qzeros.shape[1]:
        for j in range(i, i + (32 // bits)):
            qzeros[:, col] |= zeros[:, j] << (bits * (j - i))
        i += 32 // bits
        col += 1
    return qweight.astype(np.int32), qzeros.astype(np.int32)


def _autoawq_pack(intweight: np.ndarray, zeros: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AutoAWQ's WQLinear_GEMM.from_linear packing, as published: intweight [in, out], zeros [groups, out]."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    pack_num = 8

    def pack(values):
        values = values.astype(np.uint32)
        out = np.zeros((values.shape[0], values.shape[1] // pack_num), dtype=np.uint32)
        for col in range(values.shape[1] // pack_num):
            for i in range(pack_num):
                out[:, col] |= values[:, col * pack_num + order_map[i]] << (i * 4)
        return out.astype(np.int32)

    return pack(intweight), pack(zeros)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gptq_layout_is_autogptq_packing(bits):
    layout = LAYOUTS["gptq"]
    grid = layout.grid(bits, 64)
    weight, codes, params = _quantized(grid)
    stored = layout.pack(codes, params, grid)
    zeros = np.full((params.scale.shape[1], codes.shape[0]), grid.offset)
    qweight, qzeros = _autogptq_pack(codes.T.numpy(), zeros, bits)
    assert np.array_equal(stored["qweight"].numpy(), qweight)
    assert np.array_equal(stored["qzeros"].numpy(), qzeros)
    assert np.array_equal(stored["g_idx"].numpy(), np.arange(256) // 64)
    # the reader's formula: scales * (q - (qzeros + 1))
    value = stored["scales"].float().repeat_interleave(64, 0).T * (codes - grid.offset)
    assert torch.equal(value, grid.values(codes, params))


def test_awq_layout_is_autoawq_packing():
    layout = LAYOUTS["awq"]
    grid = layout.grid(4, 64)
    weight, codes, params = _quantized(grid)
    assert not grid.symmetric and params.minimum.min() >= 0 and params.minimum.max() <= 15
    stored = layout.pack(codes, params, grid)
    qweight, qzeros = _autoawq_pack(codes.T.numpy(), params.minimum.T.numpy().astype(np.int64))
    assert np.array_equal(stored["qweight"].numpy(), qweight)
    assert np.array_equal(stored["qzeros"].numpy(), qzeros)
    value = stored["scales"].float().repeat_interleave(64, 0).T * (codes - params.minimum.repeat_interleave(64, 1))
    assert torch.equal(value, grid.values(codes, params))


@pytest.mark.parametrize("name,bits", [("compressed-tensors", 3), ("compressed-tensors", 4), ("gptq", 4), ("awq", 4)])
def test_every_layout_reads_back_exactly(name, bits):
    layout = LAYOUTS[name]
    grid = layout.grid(bits, 32)
    _, codes, params = _quantized(grid, seed=1)
    read_codes, read_params = layout.unpack(layout.pack(codes, params, grid), grid)
    assert torch.equal(read_codes.long(), codes.long())
    assert torch.equal(grid.values(read_codes, read_params), grid.values(codes, params))


def test_integer_grid_search_beats_min_max_scales():
    grid = IntegerGrid(4, 128, symmetric=False)
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(32, 256, generator=gen)
    codes, params = rtn(weight, None, grid)
    assert codes.min() >= 0 and codes.max() <= 15 and torch.equal(params.minimum, params.minimum.round())
    blocks = weight.reshape(32, 2, 128)
    lo, hi = blocks.amin(-1).clamp(max=0), blocks.amax(-1).clamp(min=0)
    scale = ((hi - lo) / 15).half().float()
    min_max = type(params)(scale, torch.round(-lo / scale))
    error = ((weight - grid.values(codes, params)) ** 2).reshape(32, 2, 128).sum(-1)
    baseline = ((weight - grid.values(grid.codes(weight, min_max), min_max)) ** 2).reshape(32, 2, 128).sum(-1)
    assert (error <= baseline + 1e-6).all() and error.sum() < 0.97 * baseline.sum()


@pytest.mark.parametrize("layout", ["imp-phi2", "imp-qwen2", "imp-phi3"])
def test_transformers_loads_compressed_tensors_output(run_cli, models_dir, tmp_path, layout):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    status, stdout, err = run_cli("quantize", models_dir / layout, "--format", "safetensors", "--bits", "4",
                                  "--group-size", "32", "--method", "gptq", "--calib", _calib_file(tmp_path),
                                  "--nsamples", "4", "--out", out, "--json")
    assert status == 0, err
    summary = json.loads(stdout)
    folder = out / f"{layout}-W4G32-gptq-compressed-tensors"
    assert summary["artifacts"] == {"safetensors": str(folder)}
    verification = summary["verification"]          # random weights: only that it ran on the read-back files
    assert verification["runtime"].startswith("pytorch") and 0 <= verification["mean_kld"] < 1
    assert 4.5 <= summary["bits_per_weight_quantized"] <= 4.6
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["config_groups"]["group_0"]["weights"]["group_size"] == 32
    assert set(load_file(folder / "vision.safetensors")) == {n for n in read_spec(models_dir / layout).tensors
                                                            if not n.startswith("llm.")}

    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    impq_llm = LMM(read_spec(models_dir / layout)).llm
    dequantized = read_dequantized_llm(folder)
    impq_llm.load_state_dict(dequantized, strict=False)
    ids = torch.tensor([[1, 5, 9, 20, 33, 40, 41, 7]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, impq_llm(ids).logits, atol=1e-4)
    # compressed-tensors decompresses on the first forward, to exactly impq's grid values
    weights = dict(loaded.named_parameters())
    packed = [n for n in dequantized if n.endswith("proj.weight") or n.endswith("fc1.weight")]
    assert packed and all(torch.equal(weights[n].detach(), dequantized[n]) for n in packed)


def test_safetensors_bits_the_layout_cannot_hold(run_cli, models_dir, tmp_path):
    status, _, err = run_cli("quantize", models_dir / "imp-phi2", "--format", "safetensors", "--layout", "awq",
                             "--bits", "3", "--out", tmp_path / "out")
    assert status == 2 and "--bits 3" in err and "awq" in err and len(err.strip().splitlines()) == 1
    status, _, err = run_cli("quantize", models_dir / "imp-phi2", "--format", "safetensors", "--type", "q4_0",
                             "--out", tmp_path / "out")
    assert status == 2 and "--type" in err
    assert not (tmp_path / "out").exists()


def test_compressed_tensors_holds_mixed_widths_in_config_groups(run_cli, models_dir, tmp_path):
    """--tensor-type in a compressed-tensors run: one config group per bit width, each naming its layers; transformers
    loads the folder and computes with exactly impq's values at each layer's own width."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    status, stdout, err = run_cli("quantize", models_dir / "imp-qwen2", "--format", "safetensors", "--bits", "4",
                                  "--group-size", "32", "--tensor-type", "down_proj=int8", "--tensor-type",
                                  r"layers\.1\.self_attn\.[qkv]_proj=INT3", "--calib", _calib_file(tmp_path),
                                  "--nsamples", "4", "--verify-items", "0", "--out", out, "--json")
    assert status == 0, err
    summary = json.loads(stdout)
    types = summary["tensor_types"]
    assert types["llm.model.layers.0.mlp.down_proj.weight"] == "int8-g32-sym"
    assert types["llm.model.layers.1.self_attn.k_proj.weight"] == "int3-g32-sym"
    assert types["llm.model.layers.0.self_attn.k_proj.weight"] == "int4-g32-sym"
    folder = Path(summary["artifacts"]["safetensors"])
    groups = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"]
    widths = {g["weights"]["num_bits"]: g["targets"] for g in groups.values()}
    assert sorted(widths) == [3, 4, 8]
    assert widths[8] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert widths[3] == [f"model.layers.1.self_attn.{p}_proj" for p in "kqv"]
    assert not set(widths[3]) & set(widths[4]) and not set(widths[8]) & set(widths[4])

    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    dequantized = read_dequantized_llm(folder)
    ids = torch.tensor([[1, 5, 9, 20, 33, 40, 41, 7]])
    impq_llm = LMM(read_spec(models_dir / "imp-qwen2")).llm
    impq_llm.load_state_dict(dequantized, strict=False)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, impq_llm(ids).logits, atol=1e-4)
    weights = dict(loaded.named_parameters())       # decompressed by the first forward
    for name, width in (("model.layers.0.mlp.down_proj.weight", 8), ("model.layers.1.self_attn.q_proj.weight", 3),
                        ("model.layers.0.self_attn.q_proj.weight", 4)):
        assert torch.equal(weights[name].detach(), dequantized[name])
        # on the width's grid: at most 2^bits distinct values per 32-wide group
        groups_of = dequantized[name].reshape(dequantized[name].shape[0], -1, 32)
        assert max(len(torch.unique(g)) for g in groups_of.reshape(-1, 32)) <= 2 ** width


@pytest.mark.parametrize("args,needle", [
    (["--layout", "gptq", "--tensor-type", "down_proj=int8"], "the gptq layout holds one bit width"),
    (["--tensor-type", "down_proj=int9"], "int9"),
    (["--target-bpw", "4.5"], "--target-bpw"),
])
def test_mixed_widths_a_layout_cannot_hold(run_cli, models_dir, tmp_path, args, needle):
    status, _, err = run_cli("quantize", models_dir / "imp-qwen2", "--format", "safetensors", "--bits", "4",
                             *args, "--out", tmp_path / "out")
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("impq: error: ") and needle in lines[0], err
    assert not (tmp_path / "out").exists()
