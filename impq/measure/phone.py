"""A roofline estimate of phone speed: decode is bound by the bytes of weights read per token over memory
bandwidth; prefill and image encoding by matrix-multiply work over compute. Efficiency factors (achieved /
peak) are fitted on the machine at hand from `impq bench` figures and that machine's measured bandwidth and
compute, then carried to a phone's published bandwidth and estimated peak compute.

Device figures (DEVICES, each with its source): peak memory bandwidth = transfer rate x bus width; peak FP32
compute = sum over CPU cores of clock x FMA lanes x 2, from the cores' public microarchitecture. Carrying
efficiency factors from one machine to another assumes llama.cpp reaches the same fraction of peak on both:
that is the model's main simplification, and the fitted machine's own prediction error bounds only part of it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf
import numpy as np


@dataclass(frozen=True)
class Device:
    name: str
    bandwidth_gbs: float
    peak_gflops: float
    source: str


DEVICES = {
    "snapdragon-8-gen-3": Device(
        "Snapdragon 8 Gen 3", 76.8, 380.0,
        "Qualcomm product brief: LPDDR5X up to 4800 MHz (9600 MT/s) x 64-bit = 76.8 GB/s; CPU 1x Cortex-X4 3.3 GHz "
        "(4x128-bit FMA: 32 FLOP/cycle) + 5x Cortex-A720 ~3.0 GHz (16) + 2x Cortex-A520 2.3 GHz (8) = ~380 GFLOP/s"),
    "snapdragon-8-gen-2": Device(
        "Snapdragon 8 Gen 2", 67.2, 300.0,
        "Qualcomm product brief: LPDDR5X up to 4200 MHz (8400 MT/s) x 64-bit = 67.2 GB/s; CPU 1x Cortex-X3 3.2 GHz "
        "(32 FLOP/cycle) + 4x Cortex-A715/A710 ~2.8 GHz (16) + 3x Cortex-A510 2.0 GHz (8) = ~300 GFLOP/s"),
    "dimensity-9300": Device(
        "MediaTek Dimensity 9300", 76.8, 470.0,
        "MediaTek product page: LPDDR5T 9600 Mbps x 64-bit = 76.8 GB/s; CPU 4x Cortex-X4 (3.25/2.85 GHz, "
        "32 FLOP/cycle) + 4x Cortex-A720 2.0 GHz (16) = ~470 GFLOP/s"),
    "apple-a17-pro": Device(
        "Apple A17 Pro", 51.2, 290.0,
        "LPDDR5-6400 x 64-bit = 51.2 GB/s (teardown reports); CPU 2 performance cores 3.78 GHz (4x128-bit FMA: "
        "32 FLOP/cycle) + 4 efficiency cores 2.1 GHz (16) = ~290 GFLOP/s"),
}
PUBLISHED = {"imp-v1.5-3b-196 q4 snapdragon-8-gen-3 decode tokens/s": 13.0}


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

    @property
    def llm_image_tokens(self) -> int:
        return self.vision_tokens // 4 if self.pooled else self.vision_tokens

    def decode_s(self, device_bandwidth_gbs: float, efficiency: float) -> float:
        return self.text_bytes_per_token / (device_bandwidth_gbs * 1e9 * efficiency)

    def prefill_flops(self, n_tokens: int) -> float:
        # matrices, plus attention scores and values over the causal prefix (2 matmuls, n/2 keys on average)
        return 2 * self.text_matmul_params * n_tokens + 2 * 2 * self.text_layers * self.text_hidden * n_tokens ** 2 / 2

    def vision_flops(self) -> float:
        n = self.vision_tokens
        return 2 * self.vision_matmul_params * n + 2 * 2 * self.vision_layers * self.vision_hidden * n * n

    @classmethod
    def from_gguf_pair(cls, text_path: Path, mmproj_path: Path) -> "ModelCost":
        text = gguf.GGUFReader(text_path)
        arch = text.fields["general.architecture"].contents()
        layers = int(text.fields[f"{arch}.block_count"].contents())
        hidden = int(text.fields[f"{arch}.embedding_length"].contents())
        bytes_per_token, params = 0.0, 0.0
        for t in text.tensors:
            if t.name == "token_embd.weight":
                bytes_per_token += t.n_bytes / int(t.shape[-1])
                if not any(x.name == "output.weight" for x in text.tensors):
                    bytes_per_token += t.n_bytes        # tied output head reads the whole matrix
                    params += int(t.n_elements)
                continue
            bytes_per_token += t.n_bytes
            if len(t.shape) == 2:
                params += int(t.n_elements)
        mmproj = gguf.GGUFReader(mmproj_path)
        v_layers = int(mmproj.fields["clip.vision.block_count"].contents())
        v_hidden = int(mmproj.fields["clip.vision.embedding_length"].contents())
        size = int(mmproj.fields["clip.vision.image_size"].contents())
        patch = int(mmproj.fields["clip.vision.patch_size"].contents())
        v_params = sum(int(t.n_elements) for t in mmproj.tensors
                       if len(t.shape) == 2 and (t.name.startswith("v.blk.") or t.name.startswith("mm.")))
        pooled = mmproj.fields["clip.projector_type"].contents() == "ldpv2"
        return cls(bytes_per_token, params, layers, hidden, v_params, v_layers, v_hidden, (size // patch) ** 2, pooled)


@dataclass(frozen=True)
class Efficiency:
    decode: float          # achieved / peak memory bandwidth while decoding
    prefill: float         # achieved / peak compute in the LLM's prefill
    vision: float          # achieved / peak compute in the image encoder


@dataclass(frozen=True)
class Estimate:
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    image_encode_s: float
    ttft_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def estimate(cost: ModelCost, bandwidth_gbs: float, peak_gflops: float, eff: Efficiency,
             prompt_text_tokens: int) -> Estimate:
    n_prompt = prompt_text_tokens + cost.llm_image_tokens
    prefill_s = cost.prefill_flops(n_prompt) / (peak_gflops * 1e9 * eff.prefill)
    encode_s = cost.vision_flops() / (peak_gflops * 1e9 * eff.vision)
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
