"""The sweep's cost before it runs (--dry-run): each task's seconds from the model's dimensions and this machine's
measured memory bandwidth and FP32 matmul rate (measure/phone.measure_machine), through the roofline the phone
estimate uses; then the graph's wall time in-process (the sum) and on N Ray workers like this machine (the graph
list-scheduled, timings one at a time per worker).

The efficiency factors (achieved / measured peak) were fitted on this project's own machines, 2-core cloud VMs:
llama.cpp's on `impq bench` of the Imp-3B dimensions at Q4_0 (bench/results/speed.md), the quantizer's on
`impq quantize --method gptq --type q4_k` at the same dimensions (bench/results/quantize_full_size.md, 2868 s).
Measured runs of the same kind of machine ranged from 0.25x to 1x the speed they were fitted on (time to first
token at 384 px: 13.5 s in speed.md, 52.9 s in reduction_full_size.md), so the estimate comes with that band.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import gguf

from ..measure.phone import Efficiency, ModelCost, estimate
from ..models.layouts import ModelSpec
from ..models.reduction import VisionReduction
from ..recipe import mix_bpw

LLAMA_CPP = Efficiency(decode=0.57, prefill=1.83, vision=0.93)    # speed.md's fit, imp-v1-3b Q4_0
# quantize_full_size.md: GPTQ Q4_K at the Imp-3B dimensions, 8 calibration sequences, 2868 s, against speed.md's
# 238 GFLOP/s
QUANTIZE = 0.27
TORCH_FORWARD = 0.5        # the full-precision reference's forward passes: fp32 matmuls, assumed at half the peak
SLOWER_DAYS = 4.0          # the band's upper end: measured runs down to a quarter of the fitted speed
LOAD_BYTES_PER_S = 1e9     # reading a model file, per task
TASK_OVERHEAD_S = 3.0      # starting a task: imports, tokenizer, image reading
CALIB_TEXT_TOKENS = 64     # the text beside each calibration image
ANSWER_TOKENS = 4          # tokens generated per evaluation item (a short VQA answer)
PROMPT_TEXT_TOKENS = 40    # the question and template beside the image


@dataclass(frozen=True)
class Machine:
    """A machine's measured (or published) memory bandwidth and FP32 matmul rate, and the fractions of them that
    llama.cpp, the quantizer and the PyTorch reference reach on it."""
    bandwidth_gbs: float
    peak_gflops: float
    llama_cpp: Efficiency = LLAMA_CPP
    quantize: float = QUANTIZE
    torch_forward: float = TORCH_FORWARD


# One GPU: an RTX 4090 (1008 GB/s, 82.6 TFLOP/s FP32), llama.cpp's fractions of it from published CUDA runs (no
# llama.cpp GPU run was measured here): prefill from pp512 of llama 8B Q4_0 on an RTX 4090, 10,359 tokens/s
# (llama.cpp PR #7676, MMQ on tensor cores); decode from a batch of one of the same model on an RTX 3090, 156.6
# tokens/s of a 4.66 GB file on 936 GB/s (PR #15802); the F16 tower from gemma 2B F16's pp16384 on an RTX 3090,
# 11,163 tokens/s of its matrices' FLOPs against 35.6 TFLOP/s (PR #11583; the two cards' FP16-tensor to FP32
# ratios are equal). The quantizer: impq's own GPTQ Q4_K at the Imp-3B dimensions on one H200, 216 s for what
# quantize_seconds counts as 186 TFLOP (bench/results/quantize_full_size_cuda.md): 0.86 TFLOP/s, bound by its
# per-matrix work rather than by the GPU's peak, so taken as the same rate on the 4090. The reference's FP32
# forward: assumed at half the peak, as on a CPU.
ONE_GPU = Machine(bandwidth_gbs=1008.0, peak_gflops=82_600.0,
                  llama_cpp=Efficiency(decode=0.78, prefill=2.0, vision=1.57), quantize=0.0104)


def _bytes_per_weight(type_name: str) -> float:
    if mix_bpw(type_name) is not None:
        return mix_bpw(type_name) / 8
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name.upper()]]
    return size / block


def model_cost(spec: ModelSpec, type_name: str, reduction: VisionReduction) -> ModelCost:
    """ModelCost.from_gguf_pair's figures from the checkpoint's shapes, before any file is written."""
    llm = {n: spec.shape(n) for n in spec.tensors if n.startswith("llm.") and len(spec.shape(n)) == 2}
    embedding = next(n for n in llm if "embed_tokens" in n)
    matrices = sum(rows * cols for n, (rows, cols) in llm.items() if n != embedding)
    tied = not any("lm_head" in n for n in llm)
    rows, cols = llm[embedding]
    text_params = matrices + (rows * cols if tied else 0)
    per_weight = _bytes_per_weight(type_name)
    vision = {n: spec.shape(n) for n in spec.tensors
              if (".encoder.layers." in n or n.startswith("projector.")) and len(spec.shape(n)) == 2}
    config = spec.vision.config
    return ModelCost(text_bytes_per_token=text_params * per_weight + cols * per_weight,
                     text_matmul_params=text_params, text_layers=spec.text_config.num_hidden_layers,
                     text_hidden=spec.text_config.hidden_size,
                     vision_matmul_params=sum(r * c for r, c in vision.values()),
                     vision_layers=config.num_hidden_layers, vision_hidden=config.hidden_size,
                     vision_tokens=(reduction.image_size // reduction.patch_size) ** 2, pooled=reduction.pool)


def quantize_seconds(spec: ModelSpec, nsamples: int, machine: Machine) -> float:
    """The layer loop: two forward passes of the calibration per block (its inputs' statistics, then its quantized
    outputs), each matrix's X^T X (2 * tokens * cols^2, shared inputs counted per matrix) and GPTQ's work on it
    (the inverse Hessian, cols^3, and each column's update of the rest, 2 * rows * cols^2)."""
    cost = model_cost(spec, "f16", VisionReduction(spec.vision.image_size, spec.vision.patch_size))
    tokens = nsamples * (cost.vision_tokens + CALIB_TEXT_TOKENS)
    matrices = [spec.shape(n) for n in spec.tensors
                if n.startswith("llm.model.layers.") and len(spec.shape(n)) == 2]
    flops = 2 * 2 * cost.text_matmul_params * tokens + sum(2 * tokens * c * c + 2 * r * c * c + c ** 3
                                                           for r, c in matrices)
    return flops / (machine.peak_gflops * 1e9 * machine.quantize)


def vision_quantize_seconds(spec: ModelSpec, nsamples: int, machine: Machine) -> float:
    """The tower's and projector's layer loop on the calibration images, counted as quantize_seconds counts the
    decoder's (two forward passes, X^T X and GPTQ per matrix)."""
    cost = model_cost(spec, "f16", VisionReduction(spec.vision.image_size, spec.vision.patch_size))
    tokens = nsamples * cost.vision_tokens
    matrices = [spec.shape(n) for n in spec.tensors
                if (".encoder.layers." in n or n.startswith("projector.")) and len(spec.shape(n)) == 2]
    flops = 2 * cost.vision_flops() * nsamples + sum(2 * tokens * c * c + 2 * r * c * c + c ** 3
                                                     for r, c in matrices)
    return flops / (machine.peak_gflops * 1e9 * machine.quantize)


def item_seconds(cost: ModelCost, machine: Machine, decode_tokens: int) -> float:
    """One image + question through llama.cpp: encoding, prefill, then `decode_tokens` tokens."""
    figures = estimate(cost, machine.bandwidth_gbs, machine.peak_gflops, machine.llama_cpp, PROMPT_TEXT_TOKENS)
    return figures.ttft_s + decode_tokens / figures.decode_tokens_per_s


def task_seconds(spec: ModelSpec, kind: str, machine: Machine, type_name: str = "f16",
                 reduction: VisionReduction | None = None, items: int = 0, runs: int = 0, decode_tokens: int = 0,
                 nsamples: int = 0) -> float:
    """A sweep task's estimated seconds on `machine`: `kind` as sweep/graph.Task's, with what it works on."""
    native = VisionReduction(spec.vision.image_size, spec.vision.patch_size)
    load = _model_bytes(spec) / LOAD_BYTES_PER_S
    if kind == "quantize":
        # a budgeted mix adds its sensitivity measurement, not counted
        return TASK_OVERHEAD_S + load + (quantize_seconds(spec, nsamples, machine) if type_name != "f16" else 0.0)
    if kind == "mmproj":
        # an F16 mmproj is a copy; a calibrated one quantizes the tower first
        return TASK_OVERHEAD_S + load + (vision_quantize_seconds(spec, nsamples, machine) if type_name != "f16"
                                         else 0.0)
    if kind == "reference":
        cost = model_cost(spec, "f16", native)
        per_item = (cost.vision_flops() + cost.prefill_flops(cost.llm_image_tokens + PROMPT_TEXT_TOKENS)) / (
            machine.peak_gflops * 1e9 * machine.torch_forward)
        return TASK_OVERHEAD_S + load + items * per_item
    cost = model_cost(spec, type_name, reduction or native)
    file_load = cost.text_bytes_per_token / LOAD_BYTES_PER_S
    if kind == "evaluate":
        return TASK_OVERHEAD_S + file_load + items * item_seconds(cost, machine, ANSWER_TOKENS)
    if kind == "time":
        return TASK_OVERHEAD_S + file_load + (runs + 1) * item_seconds(cost, machine, decode_tokens)
    raise ValueError(f"no estimate for a {kind} task")


def _model_bytes(spec: ModelSpec) -> float:
    return 2.0 * sum(spec.numel(n) for n in spec.tensors)     # the checkpoint at 16 bits


def wall_seconds(tasks: list[dict], workers: int) -> float:
    """The graph's wall time on `workers` workers like this machine, each running one task at a time (so no two
    timings share one): every task, in graph order, starts when the tasks it reads are done and a worker is free.
    `tasks`: dicts with key, seconds and after, the tasks still to run."""
    finish: dict[str, float] = {}
    free = [(0.0, w) for w in range(workers)]
    for task in tasks:
        ready = max((finish.get(k, 0.0) for k in task["after"]), default=0.0)
        at, worker = heapq.heappop(free)
        start = max(at, ready)
        finish[task["key"]] = start + task["seconds"]
        heapq.heappush(free, (finish[task["key"]], worker))
    return max(finish.values(), default=0.0)
