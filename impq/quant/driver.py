"""The layer-by-layer loop: capture the first decoder block's inputs on the calibration embeddings, then for
each block accumulate every linear layer's input Hessian (X^T X), quantize its weights onto the grid, and
run the quantized block to produce the next block's inputs. Memory stays near one block's statistics plus
the calibration activations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import ImpqError
from ..memory import trim
from ..families import TEXT_FAMILIES, VISION_FAMILIES, ScaleGroup
from ..models.lmm import LMM, decoder_name, vision_block_name
from .awq import apply_scales, sampled_rows, search_clip, search_scales, usable_groups
from .error import output_error
from .grids import BlockParams, Grid
from .gptq import NotPositiveDefinite, gptq
from .plan import Plan
from .rtn import rtn
from .signround import signround_block
from .statistics import InputStatistics, InputsCaptured

METHODS = ("rtn", "gptq", "awq", "signround")
ERROR_ROWS = 512             # output rows each reported layer error is computed on


@dataclass
class QuantizedTensor:
    """One tensor's codes, held for the whole model until export in as few bytes as they fit: two to a byte
    where all lie in 0..15 (every grid of 4 bits or fewer), else int8 or int16. int32 codes of a 2.7B-parameter
    LLM would take 11 GB, int8 2.7 GB, nibbles 1.35 GB; `codes` gives them back as int32."""
    stored_codes: torch.Tensor
    shape: tuple[int, ...]
    params: BlockParams
    grid: Grid
    relative_error: float          # tr(dW H dW^T) / tr(W H W^T): output error on the calibration inputs
                                   # (on up to ERROR_ROWS sampled output rows)
    awq_alpha: float | None = None  # the AWQ exponent chosen for this layer's scale group
    nibbles: bool = False

    @classmethod
    def store(cls, codes: torch.Tensor, params: BlockParams, grid: Grid, relative_error: float,
              awq_alpha: float | None = None) -> "QuantizedTensor":
        codes = codes.cpu()
        if codes.numel() % 2 == 0 and codes.numel() and int(codes.min()) >= 0 and int(codes.max()) <= 15:
            flat = codes.reshape(-1).to(torch.uint8)
            return cls(flat[0::2] | (flat[1::2] << 4), tuple(codes.shape), params, grid, relative_error, awq_alpha,
                       nibbles=True)
        for dtype in (torch.int8, torch.int16):
            info = torch.iinfo(dtype)
            if codes.numel() == 0 or (int(codes.min()) >= info.min and int(codes.max()) <= info.max):
                return cls(codes.to(dtype), tuple(codes.shape), params, grid, relative_error, awq_alpha)
        return cls(codes, tuple(codes.shape), params, grid, relative_error, awq_alpha)

    @property
    def codes(self) -> torch.Tensor:
        if not self.nibbles:
            return self.stored_codes.to(torch.int32)
        low, high = self.stored_codes & 0x0F, self.stored_codes >> 4
        return torch.stack((low, high), dim=1).reshape(self.shape).to(torch.int32)


@dataclass
class QuantizeResult:
    tensors: dict[str, QuantizedTensor] = field(default_factory=dict)     # canonical name -> result
    seconds: float = 0.0
    # learned rounding: decoder layer -> which rounding it kept and each candidate's held-out output error
    blocks: dict[int, dict] = field(default_factory=dict)


def _gptq(tensor: str, weight: torch.Tensor, hessian: torch.Tensor, grid, options: dict):
    try:
        return gptq(weight, hessian, grid, **options)
    except NotPositiveDefinite as err:
        raise ImpqError(None, f"{tensor}: {err.problem} (stage: quantize)") from None


@dataclass
class BlockStack:
    """Blocks that the layer loop quantizes in turn, each on the outputs of the quantized blocks before it: the
    LLM's decoder layers, or the vision tower's encoder layers followed by the projector."""
    blocks: Sequence[nn.Module]
    inputs: list[tuple[torch.Tensor, dict]]                   # the first block's calibration inputs
    tensor_name: Callable[[int, str], str]                    # the canonical name of block i's linear `name`
    block_name: Callable[[int], str]                          # what errors call block i
    awq_groups: Callable[[nn.Module], list[ScaleGroup]]       # where AWQ's 1/s folds exactly in a block
    load_block: Callable[[int], None] | None = None           # a streamed block is read when its turn comes
    # what enters block i instead of the previous block's outputs: (hidden, kwargs) -> (hidden, kwargs)
    adapt: dict[int, Callable[[tuple], tuple]] = field(default_factory=dict)
    report_key: Callable[[int], int | str] = lambda index: index     # learned rounding's report, by block


@torch.no_grad()
def quantize_llm(lmm: LMM, embeddings: list[torch.Tensor], plan: Plan, method: str, *,
                 device: str | torch.device = "cpu", release_weights: bool = False, **options) -> QuantizeResult:
    """Every linear layer of the LLM's decoder blocks quantized in place onto its grid in `plan` (quant/plan.py),
    from the first decoder block's inputs on the calibration `embeddings`; see quantize_blocks. With an LMM that
    streams its decoder (models/lmm.py), each block is read from the checkpoint when its turn comes, and its
    quantized weights are released after it like `release_weights`'."""
    lmm.llm.model.rotary_emb.to(device)
    inputs = lmm.first_block_inputs([e.to(device) for e in embeddings])
    stack = BlockStack(lmm.llm.model.layers, inputs, decoder_name, decoder_name,
                       lambda layer: usable_groups(TEXT_FAMILIES[lmm.spec.family].awq_groups, layer),
                       lmm.load_block if lmm.streams_decoder else None)
    try:
        return quantize_blocks(stack, plan, method, device=device,
                               release_weights=release_weights or lmm.streams_decoder, **options)
    finally:
        lmm.llm.model.rotary_emb.to("cpu")


@torch.no_grad()
def quantize_vision(lmm: LMM, pixels: list[torch.Tensor], plan: Plan, method: str, *,
                    device: str | torch.device = "cpu", **options) -> QuantizeResult:
    """The vision tower's encoder layers, then the projector (one block), quantized in place onto their grids in
    `plan`, each on the calibration images' activations as the quantized blocks before it compute them (the
    projector: on the tower's output, a class token dropped); see quantize_blocks. Learned rounding reports by
    block name. A tensor absent from the plan stays at the mmproj's float type."""
    layers = list(lmm.vision.encoder.layers)
    inputs = [(hidden.to(device), {k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()})
              for hidden, kwargs in lmm.first_vision_block_inputs(pixels)]
    groups = VISION_FAMILIES[lmm.spec.vision.kind].awq_groups
    drop_class_token = lmm.spec.vision.has_class_token

    def tensor_name(index: int, name: str) -> str:
        return vision_block_name(index, name) if index < len(layers) else f"projector.{name}.weight"

    def block_name(index: int) -> str:
        return vision_block_name(index) if index < len(layers) else "projector"

    stack = BlockStack([*layers, lmm.projector], inputs, tensor_name, block_name,
                       lambda block: usable_groups(groups, block) if hasattr(block, "self_attn") else [],
                       adapt={len(layers): lambda entry: (entry[0][:, 1:] if drop_class_token else entry[0], {})},
                       report_key=block_name)
    return quantize_blocks(stack, plan, method, device=device, **options)


@torch.no_grad()
def quantize_blocks(stack: BlockStack, plan: Plan, method: str, *,
                    gptq_options: dict | None = None, signround_options: dict | None = None,
                    device: str | torch.device = "cpu", release_weights: bool = False,
                    compute_dtype: torch.dtype = torch.float32,
                    on_layer: Callable[[int, int], None] | None = None) -> QuantizeResult:
    """Quantize every linear layer of the stack's blocks in place onto its grid in `plan` (quant/plan.py;
    weights become their grid values; a tensor planned at no grid, or absent from the plan, is left as it is) and
    return the codes and block parameters by canonical tensor name. `method`: rtn, gptq, awq (AWQ's scales,
    then rounding with the grid's importance-weighted scale search), or signround (rounding and block
    scales learned against the full-precision model's outputs of each block, from the plain fit of the original
    weights as AutoRound starts; GPTQ's rounding is kept for a block where it has the lower error).
    On a GPU (`device`), one block at a time moves there with the activations; the rest stays on the CPU.
    `release_weights`: once a block has produced the next block's inputs, its quantized weights move to the meta
    device (the codes are the record), so a 2.7B LLM's decoder weights are never all held twice.
    `compute_dtype` bfloat16: the blocks' forward passes run under bfloat16 autocast, as AutoRound calibrates on
    a CPU: they are most of a block's time, and a CPU with AVX-512 BF16 (or a GPU) runs them 2-3x faster. The
    Hessians, the weights, GPTQ's updates and the grid fits stay float32: a bfloat16 X^T X rounds every entry
    to 3 digits, which leaves SmolLM2's Hessians (a few massive channels) not positive definite even damped.
    With signround, the next block's inputs are the outputs its final scoring computed with the kept rounding,
    under the same compute dtype as every other forward pass."""
    start = time.perf_counter()
    result = QuantizeResult()
    device_type = torch.device(device).type

    def autocast():
        return torch.autocast(device_type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)

    inputs = stack.inputs
    # learned rounding's targets: the full-precision model's own block outputs, carried in a second stream, so that
    # each block also learns to undo the error the quantized blocks before it left in its inputs (AutoRound's
    # setup: trained on the quantized stream's inputs against the full-precision stream's outputs)
    fp_inputs = inputs if method == "signround" else None
    layers = stack.blocks
    for index, layer in enumerate(layers):
        if stack.load_block is not None:
            stack.load_block(index)
        if index in stack.adapt:
            inputs = [stack.adapt[index](entry) for entry in inputs]
            fp_inputs = None if fp_inputs is None else [stack.adapt[index](entry) for entry in fp_inputs]
        layer.to(device)
        if not all(torch.isfinite(hidden).all() for hidden, _ in inputs):
            raise ImpqError(None, f"{stack.block_name(index)}: its calibration inputs are not finite (stage: "
                                  f"quantize, after {'the embeddings' if index == 0 else stack.block_name(index - 1)})")
        linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
        planned = {name: plan.get(stack.tensor_name(index, name)) for name in linears}
        grids = {name: entry.grid if entry is not None else None for name, entry in planned.items()}
        groups = stack.awq_groups(layer) if method == "awq" else []
        # AWQ's scale search also needs each input channel's mean |x| (its errors come from the Hessians); every
        # input is in once the last linear has its own: the last product (Phi-2's fc2 is a third of its block's
        # weights) and what follows it would only make an output this pass throws away
        with InputStatistics(layer, device, abs_sums=method == "awq", stop_when_complete=True) as statistics, \
                autocast():
            for hidden, kwargs in inputs:
                try:
                    layer(hidden, **kwargs)
                except InputsCaptured:
                    pass
                statistics.next_pass()
        hessians, counts, abs_sums = statistics.hessians, statistics.counts, statistics.abs_sums
        with autocast():
            targets = None if fp_inputs is None else [layer(hidden, **kwargs) for hidden, kwargs in fp_inputs]
        alphas = {}
        for group in groups:
            first = group.linears[0]
            n_tokens = max(1, counts[first])
            scales, alpha = search_scales(layer, group, (abs_sums[first] / n_tokens).float(),
                                          (hessians[first] / n_tokens).float(), grids)
            apply_scales(layer, group, scales)
            inverse = (1.0 / scales).double()
            for name in group.linears:           # inputs are now x / s: so is their second moment
                hessians[name] *= inverse.unsqueeze(0) * inverse.unsqueeze(1)
                alphas[name] = alpha
        quantizable = {name: m for name, m in linears.items() if grids[name] is not None}
        # each float64 sum is dropped as soon as its float32 mean exists: fc2's alone is 0.8 GB at Phi-2's width
        hessian = {name: (hessians.pop(name) / max(1, counts[name])).float() for name in quantizable}
        del hessians
        outputs = None      # the next block's inputs, where learned rounding's final scoring has computed them
        if method in ("gptq", "signround"):
            fits = {name: _gptq(stack.tensor_name(index, name), m.weight.float(), hessian[name],
                                grids[name], gptq_options or {}) for name, m in quantizable.items()}
            rounded = {name: (fit.codes, fit.params) for name, fit in fits.items()}
            if method == "signround":
                # AutoRound's start, the original weights with their plain fit: on SmolLM2 at Q4_0 it reached a
                # KLD of 0.044 against 0.11 for GPTQ (bench/results/quant_proxy_real_lm.jsonl), though from
                # GPTQ's start each block's own error was lower. GPTQ's rounding still competes at the end.
                start_from = {name: (m.weight.detach().float(), rtn(m.weight.float(), hessian[name], grids[name])[1])
                              for name, m in quantizable.items()}
                # training sets its own precision; the final scoring (whose outputs are the next block's inputs)
                # is a forward pass like the others, under the run's compute dtype
                with torch.enable_grad(), autocast():
                    learned = signround_block(layer, inputs, targets, start_from, grids, rivals={"gptq": rounded},
                                              **(signround_options or {}))
                rounded, outputs = learned.rounding, learned.outputs
                result.blocks[stack.report_key(index)] = {"kept": learned.kept, "held_out_sequences": learned.held_out,
                                        "held_out_error": learned.held_out_errors}
                del start_from, learned
            del fits
        elif method == "awq":
            rounded = {name: rtn(search_clip(name, m.weight.float(), hessian[name], grids[name]), hessian[name],
                                 grids[name]) for name, m in quantizable.items()}
        else:
            rounded = {name: rtn(m.weight.float(), hessian[name], grids[name]) for name, m in quantizable.items()}
        for name, (codes, params) in rounded.items():
            module, H, grid = quantizable[name], hessian[name], grids[name]
            Q = grid.values(codes, params)
            if not torch.isfinite(Q).all():          # what the file would hold, dequantized: never written broken
                raise ImpqError(None, f"{stack.tensor_name(index, name)}: the {method} fit onto {grid.name} "
                                      f"gave non-finite weights (stage: quantize)")
            # on sampled rows: each row's error is its own sum, and on every row the two traces cost 2 x rows x
            # cols^2 (1 TFLOP per Phi-2 block, as much as its forward passes)
            W = sampled_rows(module.weight.float(), ERROR_ROWS)
            error = output_error(W - sampled_rows(Q, ERROR_ROWS), H) / max(output_error(W, H), 1e-30)
            module.weight.copy_(Q.to(module.weight.dtype))
            result.tensors[stack.tensor_name(index, name)] = QuantizedTensor.store(
                codes, params.to("cpu"), grid, error, alphas.get(name))
        if outputs is None:
            with autocast():
                outputs = [layer(hidden, **kwargs) for hidden, kwargs in inputs]
        inputs = [(hidden, kwargs) for hidden, (_, kwargs) in zip(outputs, inputs)]
        del outputs
        if fp_inputs is not None:
            fp_inputs = [(target, kwargs) for target, (_, kwargs) in zip(targets, fp_inputs)]
            del targets
        layer.to("cpu")
        if release_weights:
            for name in rounded:
                module = quantizable[name]
                module.weight = nn.Parameter(module.weight.to("meta"), requires_grad=False)
        del hessian, rounded            # before the next block allocates its own
        trim()
        if on_layer:
            on_layer(index, len(layers))
    result.seconds = time.perf_counter() - start
    return result
