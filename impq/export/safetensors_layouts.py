"""The safetensors layouts of integer-grid weights: GPTQ, AWQ (GEMM) and compressed-tensors `pack-quantized`.
Each layout packs a quantized linear layer into the tensors its loaders read, unpacks them again (the tests'
and the report's check that the file holds exactly impq's values), and states its `quantization_config`.

GPTQ's and AWQ's packings are written here because the libraries that defined them (auto-gptq, autoawq) are
archived and need CUDA to install; they follow those libraries' documented bit layouts. compressed-tensors'
own packer is used for its format.
"""

from __future__ import annotations

import torch

from .. import __version__
from ..errors import ImpqError
from ..quant.grids import BlockParams, IntegerGrid

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)      # AWQ GEMM: the output column each nibble of a 32-bit word holds


def _pack(values: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) along the last dimension, 32 // bits per int32 word, the first code in
    the lowest bits (or, with `order`, word position i holding code order[i])."""
    per = 32 // bits
    words = values.to(torch.int64).reshape(*values.shape[:-1], values.shape[-1] // per, per)
    if order is not None:
        words = words[..., list(order)]
    packed = (words << (torch.arange(per) * bits)).sum(-1)
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)


def _unpack(packed: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    per = 32 // bits
    words = ((packed.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1) >> (torch.arange(per) * bits)) & (2 ** bits - 1)
    if order is not None:
        words = words[..., [order.index(i) for i in range(per)]]
    return words.reshape(*packed.shape[:-1], -1)


def _zeros(grid: IntegerGrid, params: BlockParams) -> torch.Tensor:
    return torch.full_like(params.scale, grid.offset) if grid.symmetric else params.minimum


class Layout:
    """One safetensors layout: which integer grids it can hold and how it stores them."""

    name: str
    symmetric: bool              # the grid impq quantizes onto for this layout
    bits: tuple[int, ...]
    stored: tuple[str, ...]      # the tensor suffixes a packed linear layer has in place of `weight`
    mixed_widths = False         # whether one checkpoint can hold linear layers of several bit widths

    def grid(self, bits: int, group_size: int) -> IntegerGrid:
        if bits not in self.bits:
            raise ImpqError(None, f"--bits {bits}: the {self.name} layout holds "
                                  f"{', '.join(map(str, self.bits))} bits")
        return IntegerGrid(bits, group_size, self.symmetric)

    def pack(self, codes: torch.Tensor, params: BlockParams, grid: IntegerGrid) -> dict[str, torch.Tensor]:
        """Tensors stored in place of `weight`, by suffix."""
        raise NotImplementedError

    def unpack(self, tensors: dict[str, torch.Tensor], grid: IntegerGrid) -> tuple[torch.Tensor, BlockParams]:
        """(codes [out, in], parameters) from the stored tensors."""
        raise NotImplementedError

    def config(self, grids: dict[IntegerGrid, list[str]], not_quantized: list[str], damp: float,
               act_order: bool) -> dict:
        """`grids`: each grid the layers are stored on -> those layers' module names (one grid unless
        `mixed_widths`)."""
        raise NotImplementedError

    def grids_of(self, quantization_config: dict, modules: list[str]) -> dict[str, IntegerGrid]:
        """Each packed module's grid, as the config states it."""
        bits, group = quantization_config["bits"], quantization_config["group_size"]
        return dict.fromkeys(modules, self.grid(bits, group))


class GPTQLayout(Layout):
    """GPTQ v1 checkpoints (AutoGPTQ, GPTQModel `checkpoint_format: gptq`): qweight int32 [in / (32/bits), out]
    packed along the input dimension; qzeros int32 [groups, out / (32/bits)] holding zero - 1; scales fp16
    [groups, out]; g_idx int32 [in] = group of each input column. v1 cannot store a zero point of 0, so impq
    writes GPTQ's usual symmetric grid (zero = 2^(bits-1))."""

    name, symmetric, bits = "gptq", True, (2, 4, 8)
    stored = ("qweight", "qzeros", "scales", "g_idx")

    def pack(self, codes, params, grid):
        zeros = _zeros(grid, params).to(torch.int64) - 1
        return {"qweight": _pack(codes, grid.bits).T.contiguous(),
                "qzeros": _pack(zeros.T.contiguous(), grid.bits),
                "scales": params.scale.T.to(torch.float16).contiguous(),
                "g_idx": (torch.arange(codes.shape[1]) // grid.block).to(torch.int32)}

    def unpack(self, tensors, grid):
        if not torch.equal(tensors["g_idx"].long(), torch.arange(tensors["g_idx"].numel()) // grid.block):
            raise ValueError("g_idx is not the identity grouping that impq writes")
        codes = _unpack(tensors["qweight"].T.contiguous(), grid.bits)
        zeros = (_unpack(tensors["qzeros"], grid.bits).T + 1).float()
        scale = tensors["scales"].T.float().contiguous()
        return codes, BlockParams(scale, None if grid.symmetric else zeros)

    def config(self, grids, not_quantized, damp, act_order):
        (grid,) = grids
        return {"quant_method": "gptq", "bits": grid.bits, "group_size": grid.block, "sym": grid.symmetric,
                # impq's act-order keeps groups static (g_idx is the identity), so no reordering is stored
                "desc_act": False, "damp_percent": damp, "checkpoint_format": "gptq",
                "meta": {"quantizer": [f"impq:{__version__}"], "impq_act_order": act_order}}


class AWQLayout(Layout):
    """AWQ GEMM checkpoints (AutoAWQ `version: gemm`): qweight int32 [in, out / 8] and qzeros int32
    [groups, out / 8], eight 4-bit codes per word along the output dimension in the order AWQ_ORDER; scales fp16
    [groups, out]; asymmetric, value = scale * (q - zero)."""

    name, symmetric, bits = "awq", False, (4,)
    stored = ("qweight", "qzeros", "scales")

    def pack(self, codes, params, grid):
        return {"qweight": _pack(codes.T.contiguous(), 4, AWQ_ORDER),
                "qzeros": _pack(_zeros(grid, params).T.contiguous(), 4, AWQ_ORDER),
                "scales": params.scale.T.to(torch.float16).contiguous()}

    def unpack(self, tensors, grid):
        codes = _unpack(tensors["qweight"], 4, AWQ_ORDER).T.contiguous()
        zeros = _unpack(tensors["qzeros"], 4, AWQ_ORDER).T.float().contiguous()
        return codes, BlockParams(tensors["scales"].T.float().contiguous(), zeros)

    def config(self, grids, not_quantized, damp, act_order):
        (grid,) = grids
        return {"quant_method": "awq", "bits": 4, "group_size": grid.block, "zero_point": True, "version": "gemm",
                "modules_to_not_convert": not_quantized or None}


class CompressedTensorsLayout(Layout):
    """compressed-tensors `pack-quantized` (llm-compressor's format, loaded by transformers and vLLM): signed codes
    q - 2^(bits-1) packed densely into int32 along the input dimension (weight_packed), weight_scale [out, groups],
    weight_shape; symmetric int grid (the W4A16 scheme)."""

    name, symmetric, bits = "compressed-tensors", True, (2, 3, 4, 5, 6, 7, 8)
    stored = ("weight_packed", "weight_scale", "weight_shape")
    mixed_widths = True

    def pack(self, codes, params, grid):
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
        signed = (codes - grid.offset).to(torch.int8)
        return {"weight_packed": pack_to_int32(signed, grid.bits),
                "weight_scale": params.scale.to(torch.float16).contiguous(),
                "weight_shape": torch.tensor(codes.shape)}

    def unpack(self, tensors, grid):
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
        shape = torch.Size(tensors["weight_shape"].tolist())
        codes = unpack_from_int32(tensors["weight_packed"], grid.bits, shape).to(torch.int64) + grid.offset
        return codes, BlockParams(tensors["weight_scale"].float(), None)

    def config(self, grids, not_quantized, damp, act_order):
        import compressed_tensors

        def scheme(grid, targets):
            weights = {"num_bits": grid.bits, "type": "int", "symmetric": True, "strategy": "group",
                       "group_size": grid.block, "dynamic": False, "actorder": None, "observer": None}
            return {"targets": targets, "weights": weights, "input_activations": None, "output_activations": None,
                    "format": "pack-quantized"}

        # one grid: every Linear (as llm-compressor writes W4A16); several: one config group per grid, each naming
        # its layers exactly, so that no layer matches two groups
        groups = ({"group_0": scheme(next(iter(grids)), ["Linear"])} if len(grids) == 1 else
                  {f"group_{i}": scheme(grid, sorted(modules))
                   for i, (grid, modules) in enumerate(sorted(grids.items(), key=lambda kv: (kv[0].bits, kv[0].block)))})
        return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
                "config_groups": groups, "ignore": not_quantized, "kv_cache_scheme": None,
                "version": compressed_tensors.__version__}

    def grids_of(self, quantization_config, modules):
        found = {}
        for group in quantization_config["config_groups"].values():
            grid = self.grid(group["weights"]["num_bits"], group["weights"]["group_size"])
            for module in modules:
                if "Linear" in group["targets"] or module in group["targets"]:
                    found[module] = grid
        return found


LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (CompressedTensorsLayout(), GPTQLayout(), AWQLayout())}
