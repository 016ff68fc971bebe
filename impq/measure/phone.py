"""A roofline estimate of speed: decode is bound by the bytes of weights read per token over memory bandwidth;
prefill and image encoding by matrix-multiply work over compute (image encoding also by the tower's weight bytes
over bandwidth, whichever is slower). Efficiency factors (achieved / peak) come from measurements: for this
machine, `fit_efficiency` on an `impq bench` result and the machine's measured bandwidth and compute
(bench/run_speed.py); for phones, `phone_fit.PHONE_FIT` on published llama.cpp measurements on phones, with a
leave-one-out error band. x86 factors are never carried to a phone.

On a phone the matrices of each weight type run llama.cpp's kernels for that type (`KernelRates`): float
matrices at the efficiency measured on F16 image encoders, quantized ones at the prompt efficiency scaled by the
type's measured rate. So the estimate of an mmproj follows its tensor types, fallbacks included.

Device figures (DEVICES, each with its source): peak memory bandwidth = transfer rate x bus width; peak FP32
compute = sum over the cores used of clock x FLOP per cycle (FMA lanes x 2), from the cores' public
microarchitecture.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf
import numpy as np

from ..runtime.gguf_pair import read_gguf_header, require_text_arch


@dataclass(frozen=True)
class Cluster:
    cores: int
    ghz: float
    flop_per_cycle: int        # FP32: 128-bit FMA pipes x 4 lanes x 2


@dataclass(frozen=True)
class Device:
    name: str
    bandwidth_gbs: float
    clusters: tuple[Cluster, ...]       # fastest first: llama.cpp's threads land on the fastest cores
    source: str

    def peak_gflops(self, threads: int | None = None) -> float:
        """FP32 peak of the `threads` fastest cores (all cores when None)."""
        left, total = threads if threads is not None else sum(c.cores for c in self.clusters), 0.0
        for cluster in self.clusters:
            used = min(left, cluster.cores)
            total, left = total + used * cluster.ghz * cluster.flop_per_cycle, left - used
        return total


DEVICES = {
    "snapdragon-8-gen-3": Device(
        "Snapdragon 8 Gen 3", 76.8, (Cluster(1, 3.3, 32), Cluster(5, 3.0, 16), Cluster(2, 2.3, 8)),
        "Qualcomm product brief: LPDDR5X up to 4800 MHz (9600 MT/s) x 64-bit = 76.8 GB/s; CPU 1x Cortex-X4 3.3 GHz "
        "(4x128-bit FMA: 32 FLOP/cycle) + 5x Cortex-A720 ~3.0 GHz (16) + 2x Cortex-A520 2.3 GHz (8)"),
    "snapdragon-8-gen-2": Device(
        "Snapdragon 8 Gen 2", 67.2, (Cluster(1, 3.2, 32), Cluster(4, 2.8, 16), Cluster(3, 2.0, 8)),
        "Qualcomm product brief: LPDDR5X up to 4200 MHz (8400 MT/s) x 64-bit = 67.2 GB/s; CPU 1x Cortex-X3 3.2 GHz "
        "(32 FLOP/cycle) + 4x Cortex-A715/A710 ~2.8 GHz (16) + 3x Cortex-A510 2.0 GHz (8)"),
    "snapdragon-8-elite-gen-5": Device(
        "Snapdragon 8 Elite Gen 5", 85.3, (Cluster(2, 4.6, 32), Cluster(6, 3.62, 32)),
        "Qualcomm product brief: LPDDR5X 10.7 Gbps x 64-bit = 85.3 GB/s; CPU 2x Oryon prime 4.6 GHz + 6x Oryon "
        "performance 3.62 GHz; 4x128-bit FP pipes (32 FLOP/cycle) assumed on both, as on the first Oryon core"),
    "snapdragon-888": Device(
        "Snapdragon 888", 51.2, (Cluster(1, 2.84, 32), Cluster(3, 2.42, 16), Cluster(4, 1.8, 8)),
        "Qualcomm product brief: LPDDR5 3200 MHz (6400 MT/s) x 64-bit = 51.2 GB/s; CPU 1x Cortex-X1 2.84 GHz "
        "(4x128-bit FMA: 32) + 3x Cortex-A78 2.42 GHz (16) + 4x Cortex-A55 1.8 GHz (8)"),
    "snapdragon-778g": Device(
        "Snapdragon 778G", 51.2, (Cluster(1, 2.4, 16), Cluster(3, 2.2, 16), Cluster(4, 1.9, 8)),
        "Qualcomm product brief: LPDDR5 3200 MHz (6400 MT/s) x 64-bit = 51.2 GB/s; CPU 1x Cortex-A78 2.4 GHz + "
        "3x Cortex-A78 2.2 GHz (2x128-bit FMA: 16) + 4x Cortex-A55 1.9 GHz (8)"),
    "dimensity-9300": Device(
        "MediaTek Dimensity 9300", 76.8, (Cluster(1, 3.25, 32), Cluster(3, 2.85, 32), Cluster(4, 2.0, 16)),
        "MediaTek product page: LPDDR5T 9600 Mbps x 64-bit = 76.8 GB/s; CPU 1x Cortex-X4 3.25 GHz + 3x Cortex-X4 "
        "2.85 GHz (32 FLOP/cycle) + 4x Cortex-A720 2.0 GHz (16)"),
    "apple-a17-pro": Device(
        "Apple A17 Pro", 51.2, (Cluster(2, 3.78, 32), Cluster(4, 2.1, 16)),
        "LPDDR5-6400 x 64-bit = 51.2 GB/s (teardown reports); CPU 2 performance cores 3.78 GHz (4x128-bit FMA: "
        "32 FLOP/cycle) + 4 efficiency cores 2.1 GHz (16)"),
}


FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})


@dataclass(frozen=True)
class ModelCost:
    """What a decode step reads and what prefill / image encoding multiply, per token or patch."""
    text_bytes_per_token: float        # weights read per decoded token (token embedding: one row only)
    text_matmul_params: float          # multiply-accumulates per token through the LLM's matrices
    text_layers: int
    text_hidden: int
    vision_matmul_params: float        # per patch, tower + projector
    vision_layers: int
    vision_hidden: int
    vision_tokens: int                 # patches the tower encodes
    pooled: bool = False               # the projector pools 2x2: the LLM prefills a quarter of the patches
    # the same matrix parameters split by GGML type name (empty: not known, every matrix at its kind's efficiency)
    text_matmul_by_type: tuple[tuple[str, float], ...] = ()
    vision_matmul_by_type: tuple[tuple[str, float], ...] = ()
    vision_weight_bytes: float = 0.0   # the tower's and projector's matrices, read at least once per image

    @property
    def llm_image_tokens(self) -> int:
        return self.vision_tokens // 4 if self.pooled else self.vision_tokens

    def decode_s(self, device_bandwidth_gbs: float, efficiency: float) -> float:
        return self.text_bytes_per_token / (device_bandwidth_gbs * 1e9 * efficiency)

    def _text_attention_flops(self, n_tokens: int) -> float:
        # attention scores and values over the causal prefix (2 matmuls, n/2 keys on average)
        return 2 * 2 * self.text_layers * self.text_hidden * n_tokens ** 2 / 2

    def _vision_attention_flops(self) -> float:
        return 2 * 2 * self.vision_layers * self.vision_hidden * self.vision_tokens ** 2

    def prefill_flops(self, n_tokens: int) -> float:
        return 2 * self.text_matmul_params * n_tokens + self._text_attention_flops(n_tokens)

    def vision_flops(self) -> float:
        return 2 * self.vision_matmul_params * self.vision_tokens + self._vision_attention_flops()

    def prefill_work(self, n_tokens: int, rates: "KernelRates") -> float:
        """Prefill FLOPs with each quantized type's matrices weighted by 1 / its kernel rate: FLOPs at the rate
        the prompt efficiency is stated in. The phone fit's prompt references are all quantized."""
        by_type = self.text_matmul_by_type or (("Q8_0", self.text_matmul_params),)   # untyped: at the stated rate
        return _typed_matmul(by_type, n_tokens, rates.rate) + self._text_attention_flops(n_tokens)

    def prefill_s(self, n_tokens: int, peak_gflops: float, eff: "Efficiency",
                  rates: "KernelRates | None" = None) -> float:
        if rates is None or not self.text_matmul_by_type:
            return self.prefill_flops(n_tokens) / (peak_gflops * 1e9 * eff.prefill)
        matmul = _typed_matmul(self.text_matmul_by_type, n_tokens, lambda t: rates.efficiency(t, eff))
        return (matmul + self._text_attention_flops(n_tokens) / eff.prefill) / (peak_gflops * 1e9)

    def vision_s(self, peak_gflops: float, eff: "Efficiency", rates: "KernelRates | None" = None,
                 bandwidth_gbs: float | None = None) -> float:
        """Image encoding: the tower's matrices at their types' kernels, its attention at the image efficiency;
        with a bandwidth, no faster than reading the tower's weights once at the decode efficiency."""
        if rates is None or not self.vision_matmul_by_type:
            compute = self.vision_flops() / (peak_gflops * 1e9 * eff.vision)
        else:
            matmul = _typed_matmul(self.vision_matmul_by_type, self.vision_tokens, lambda t: rates.efficiency(t, eff))
            compute = (matmul + self._vision_attention_flops() / eff.vision) / (peak_gflops * 1e9)
        if bandwidth_gbs is None:
            return compute
        return max(compute, self.vision_weight_bytes / (bandwidth_gbs * 1e9 * eff.decode))

    @classmethod
    def from_gguf_pair(cls, text_path: Path, mmproj_path: Path) -> "ModelCost":
        arch = require_text_arch(read_gguf_header(text_path), "estimates").arch
        text = gguf.GGUFReader(text_path)
        layers = int(text.fields[f"{arch}.block_count"].contents())
        hidden = int(text.fields[f"{arch}.embedding_length"].contents())
        bytes_per_token, text_types = 0.0, {}
        tied = not any(x.name == "output.weight" for x in text.tensors)
        for t in text.tensors:
            if t.name == "token_embd.weight":
                bytes_per_token += t.n_bytes / int(t.shape[-1])
                if tied:
                    bytes_per_token += t.n_bytes        # tied output head reads the whole matrix
                    _add(text_types, t)
                continue
            bytes_per_token += t.n_bytes
            if len(t.shape) == 2:
                _add(text_types, t)
        mmproj = gguf.GGUFReader(mmproj_path)
        v_layers = int(mmproj.fields["clip.vision.block_count"].contents())
        v_hidden = int(mmproj.fields["clip.vision.embedding_length"].contents())
        size = int(mmproj.fields["clip.vision.image_size"].contents())
        patch = int(mmproj.fields["clip.vision.patch_size"].contents())
        vision_types, vision_bytes = {}, 0.0
        for t in mmproj.tensors:
            if len(t.shape) == 2 and (t.name.startswith("v.blk.") or t.name.startswith("mm.")):
                _add(vision_types, t)
                vision_bytes += t.n_bytes
        pooled = mmproj.fields["clip.projector_type"].contents() == "ldpv2"
        return cls(bytes_per_token, sum(text_types.values()), layers, hidden, sum(vision_types.values()), v_layers,
                   v_hidden, (size // patch) ** 2, pooled, _by_type(text_types), _by_type(vision_types), vision_bytes)


def _typed_matmul(by_type: tuple[tuple[str, float], ...], n_tokens: int, divisor) -> float:
    """The matrices' FLOPs over `n_tokens`, each type's divided by `divisor(type name)`."""
    return sum(2 * params * n_tokens / divisor(type_name) for type_name, params in by_type)


def _add(by_type: dict, tensor) -> None:
    by_type[tensor.tensor_type.name] = by_type.get(tensor.tensor_type.name, 0) + int(tensor.n_elements)


def _by_type(by_type: dict) -> tuple[tuple[str, float], ...]:
    return tuple(sorted((name, float(params)) for name, params in by_type.items()))


@dataclass(frozen=True)
class Efficiency:
    decode: float          # achieved / peak memory bandwidth while decoding
    prefill: float         # achieved / peak compute in the LLM's prefill (with KernelRates: of a Q8_0 matrix)
    vision: float          # achieved / peak compute in the image encoder (with KernelRates: of a float matrix)


@dataclass(frozen=True)
class KernelRates:
    """How fast llama.cpp's matrix kernels run each weight type on one kind of CPU, relative to Q8_0's. A float
    matrix (F16, BF16, F32) runs at the image efficiency, the only float-kernel measurement the phone references
    hold; a quantized type at the prompt efficiency times its rate; a type without a measurement at `unmeasured`."""
    quantized: Mapping[str, float]
    unmeasured: float
    source: str

    def rate(self, type_name: str) -> float:
        return self.quantized.get(type_name, self.unmeasured)

    def efficiency(self, type_name: str, eff: Efficiency) -> float:
        return eff.vision if type_name in FLOAT_TYPES else eff.prefill * self.rate(type_name)


@dataclass(frozen=True)
class Estimate:
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    image_encode_s: float
    ttft_s: float

    def to_dict(self) -> dict:
        return asdict(self)


# Imp-v1.5-3B at 196 px (Phi-2 2.7B at Q4_0, SigLIP so400m mmproj at F16): what `impq estimate` shows without a
# pair. bench/run_phone_fit.py computes it from a generated pair with the real checkpoint's shapes and checks it.
IMP_V1_5_3B_196 = ModelCost(text_bytes_per_token=1558674080.0, text_matmul_params=2647654400.0, text_layers=32,
                            text_hidden=2560, vision_matmul_params=405348352, vision_layers=26, vision_hidden=1152,
                            vision_tokens=196,
                            text_matmul_by_type=(("Q4_0", 2516582400.0), ("Q8_0", 131072000.0)),
                            vision_matmul_by_type=(("F16", 405348352.0),), vision_weight_bytes=810696704.0)


def estimate(cost: ModelCost, bandwidth_gbs: float, peak_gflops: float, eff: Efficiency,
             prompt_text_tokens: int, rates: KernelRates | None = None) -> Estimate:
    n_prompt = prompt_text_tokens + cost.llm_image_tokens
    prefill_s = cost.prefill_s(n_prompt, peak_gflops, eff, rates)
    # the weight-read floor comes with the per-type kernels (the phone); a machine's own fit (no rates) was made
    # without it, so its estimate keeps the compute figure alone
    encode_s = cost.vision_s(peak_gflops, eff, rates, bandwidth_gbs if rates is not None else None)
    return Estimate(1.0 / cost.decode_s(bandwidth_gbs, eff.decode), n_prompt / prefill_s, encode_s,
                    encode_s + prefill_s)


def fit_efficiency(cost: ModelCost, bench: dict, bandwidth_gbs: float, peak_gflops: float) -> Efficiency:
    """Efficiency factors that make the roofline reproduce one `impq bench` result on this machine."""
    decode_s = 1.0 / bench["decode_tokens_per_s"]["median"]
    prefill_s = bench["prefill_s"]["median"] - bench["image_encode_s"]["median"]
    n_prompt = bench["prompt_tokens"]
    return Efficiency(
        decode=cost.text_bytes_per_token / (bandwidth_gbs * 1e9 * decode_s),
        prefill=cost.prefill_flops(n_prompt) / (peak_gflops * 1e9 * prefill_s),
        vision=cost.vision_flops() / (peak_gflops * 1e9 * bench["image_encode_s"]["median"]))


def measure_machine(threads: int = 2, seconds: float = 2.0) -> dict:
    """This machine's memory read bandwidth (threads summing disjoint 512 MB halves) and FP32 matmul rate."""
    data = np.ones(128 * 1024 * 1024, dtype=np.float32)           # 512 MB, far beyond the caches
    parts = np.array_split(data, threads)
    best_bw = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        workers = [threading.Thread(target=np.sum, args=(part,)) for part in parts]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best_bw = max(best_bw, data.nbytes / (time.perf_counter() - start) / 1e9)
    del data, parts
    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    best_flops = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        a @ a
        best_flops = max(best_flops, 2 * 2048 ** 3 / (time.perf_counter() - start) / 1e9)
    return {"bandwidth_gbs": best_bw, "peak_gflops": best_flops}
