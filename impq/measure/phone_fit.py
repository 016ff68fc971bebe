"""The phone side of the roofline, fitted on published llama.cpp measurements on phones.

Each reference is one device running one model in llama.cpp on its CPU, with the figures its source printed
(decode tokens/s, prompt tokens/s, image encode time) and the model's dimensions, from which the roofline's
bytes per token and FLOPs follow (`ModelCost`). One efficiency factor per kind (decode: achieved / peak
bandwidth; prefill and vision: achieved / peak FP32 compute of the threads used) is the geometric mean over the
references that report that kind. The error band is leave-one-out: each reference is predicted from a fit on
the others, and the band is the root-mean-square of the log errors, applied as a factor both ways.

No figure here is measured by impq: each comes from the source it names, with what that source left out said
beside it (thread count, prompt length, quantization recipe) and the assumption made for it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import gguf

from .phone import DEVICES, Device, Efficiency, Estimate, KernelRates, ModelCost, estimate


def _bits(qtype: gguf.GGMLQuantizationType) -> float:
    """Bits per weight of one of llama.cpp's block types."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return 8 * type_size / block


Q4_0, Q4_K, Q6_K, Q8_0 = (_bits(getattr(gguf.GGMLQuantizationType, t)) for t in ("Q4_0", "Q4_K", "Q6_K", "Q8_0"))


def _use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's Q4_K_M rule (src/llama-quant.cpp) for the layers whose attn_v and ffn_down get Q6_K."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def decoder_cost(layers: int, hidden: int, ffn: int, kv_dim: int, vocab: int, tied: bool, ftype: str) -> ModelCost:
    """A LLaMA-style decoder (q, k, v, o, gated FFN) as llama.cpp's quantize writes it at `ftype`: the output
    head at Q6_K (Q8_0 at Q8_0; with tied embeddings the token embedding is that head), Q4_K_M's attn_v and
    ffn_down at Q6_K in the layers `_use_more_bits` picks."""
    attn_qko, attn_v = hidden * (2 * hidden + kv_dim), hidden * kv_dim
    ffn_gate_up, ffn_down = 2 * hidden * ffn, hidden * ffn
    head = vocab * hidden
    matrix_type = {"q4_0": "Q4_0", "q4_k_m": "Q4_K", "q8_0": "Q8_0"}[ftype]
    params = {matrix_type: 0.0, "Q6_K": 0.0}
    params["Q8_0" if ftype == "q8_0" else "Q6_K"] += head
    for i in range(layers):
        more = ftype == "q4_k_m" and _use_more_bits(i, layers)
        params[matrix_type] += attn_qko + ffn_gate_up
        params["Q6_K" if more else matrix_type] += attn_v + ffn_down
    bits = {"Q4_0": Q4_0, "Q4_K": Q4_K, "Q6_K": Q6_K, "Q8_0": Q8_0}
    embedding_row = 0.0 if tied else hidden * bits[matrix_type]     # untied: decoding reads one row of the embedding
    return ModelCost(text_bytes_per_token=(sum(p * bits[t] for t, p in params.items()) + embedding_row) / 8,
                     text_matmul_params=sum(params.values()), text_layers=layers, text_hidden=hidden,
                     vision_matmul_params=0, vision_layers=0, vision_hidden=0, vision_tokens=0,
                     text_matmul_by_type=tuple(sorted((t, p) for t, p in params.items() if p)))


def clip_vit_l14_336_cost(projector_params: float) -> dict:
    """CLIP ViT-L/14 at 336 px as llama.cpp's llava converter writes it: the last of 24 layers dropped (LLaVA
    reads the penultimate one), 576 patches plus the class token, F16."""
    layers, hidden, mlp = 23, 1024, 4096
    return dict(vision_matmul_params=layers * (4 * hidden * hidden + 2 * hidden * mlp) + projector_params,
                vision_layers=layers, vision_hidden=hidden, vision_tokens=577, pooled=True)


def siglip_so400m_384_cost(layers: int, projector_params: float) -> dict:
    """SigLIP so400m/14 at 384 px (hidden 1152, MLP 4304; the checkpoint's config.json): 729 patches, no class
    token, `layers` of its 27 encoder layers, F16."""
    hidden, mlp = 1152, 4304
    return dict(vision_matmul_params=layers * (4 * hidden * hidden + 2 * hidden * mlp) + projector_params,
                vision_layers=layers, vision_hidden=hidden, vision_tokens=729)


@dataclass(frozen=True)
class Reference:
    device: str                          # key of DEVICES
    model: str
    cost: ModelCost
    source: str
    decode_tokens_per_s: float | None = None
    prompt_tokens_per_s: float | None = None
    prompt_tokens: int | None = None
    prompt_threads: int | None = None    # None: not stated by the source; all cores assumed
    image_encode_s: float | None = None
    image_threads: int | None = None
    note: str = ""


# MobileVLM-1.7B / MobileVLM_V2-1.7B: MobileLLaMA-1.4B (24 layers, hidden 2048, FFN 5632, 16 heads without GQA,
# vocabulary 32000, untied head; the checkpoints' config.json) quantized with `llama-quantize ... q4_k` (an alias
# of Q4_K_M), CLIP ViT-L/14-336 mmproj at F16 with the LDP projector (1024x2048 + 2048x2048 per patch, then 2x2
# downsampling to 144 tokens: the 246- and 191-token prompts are 144 image tokens plus the text).
_MOBILEVLM = ModelCost(**{**asdict(decoder_cost(24, 2048, 5632, 2048, 32000, False, "q4_k_m")),
                          **clip_vit_l14_336_cost(1024 * 2048 + 2048 * 2048)})
_MOBILEVLM_DOC = ("llama.cpp docs/multimodal/MobileVLM.md (https://github.com/ggml-org/llama.cpp/blob/master/docs/"
                  "multimodal/MobileVLM.md; the copy vendored in llama-cpp-python 0.3.36), llama-mtmd-cli -t 4")
# Qwen3-1.7B: 28 layers, hidden 2048, FFN 6144, 8 KV heads x 128, vocabulary 151936, tied embeddings (model card)
_POCKETPAL_702 = ("PocketPal AI pull request #702, comment 2026-04-28 (https://github.com/a-ghorbani/pocketpal-ai/"
                  "pull/702): POCO 'Myron', Snapdragon 8 Elite Gen 5, llama.rn (llama.cpp), CPU columns")
_POCKETPAL_NOTE = ("thread count and prompt length not stated: all 8 cores and the 256-token prompt of the same "
                   "project's later runs (PRs #740, #743: pp=256 tg=64) assumed; llama.cpp's default quantize recipe "
                   "assumed for the GGUFs")
_RATE_SOURCE = "its prompt figure sets KERNEL_RATES (the Q8_0 file's is this fit's prompt reference)"

# The same table's CPU prompt figures for Qwen3-1.7B, one file per type, relative to the Q8_0 file's 100.0 tokens/s:
# how fast llama.cpp's CPU kernels run each type's matrices on a phone. A file's rate is given to its main type
# (Q4_K_M's to Q4_K, Q5_K_M's to Q5_K, Q3_K_M's to Q3_K; their few Q6_K tensors ignored). Types the table does not
# measure (Q4_1, Q5_0, Q5_1: SigLIP's 1152-wide fallbacks among them) take its slowest rate, so an mmproj of them
# is not estimated faster than any measured kernel.
KERNEL_RATES = KernelRates(
    {"Q8_0": 1.0, "Q4_0": 99.9 / 100.0, "Q4_K": 88.7 / 100.0, "Q6_K": 70.9 / 100.0, "Q3_K": 60.9 / 100.0,
     "Q5_K": 59.8 / 100.0, "Q2_K": 55.4 / 100.0},
    unmeasured=55.4 / 100.0, source=_POCKETPAL_702 + ", Qwen3 1.7B rows")

# OmniVLM-968M: Qwen2.5-0.5B (hidden 896) and SigLIP-400M at 384 px (the model card: so400m/14, 729 patches), all 27
# layers assumed; its projector concatenates 3x3 patches and maps 10368 -> 896 -> 896 for 81 tokens (per patch: a
# ninth of those matrices)
_OMNIVLM = ModelCost(0, 0, 0, 0, **siglip_so400m_384_cost(27, (10368 * 896 + 896 * 896) / 9))

REFERENCES = (
    Reference("snapdragon-888", "MobileVLM-1.7B Q4_K_M + F16 mmproj", _MOBILEVLM,
              _MOBILEVLM_DOC + ", 'Some result on Android with Snapdragon 888 chip', case 1",
              decode_tokens_per_s=14.12, prompt_tokens_per_s=19.74, prompt_tokens=246, prompt_threads=4,
              image_encode_s=21.14871, image_threads=4,
              note="decode over 6 tokens; case 2 of the same section (232-token prompt) agrees within 1.3 %"),
    Reference("snapdragon-778g", "MobileVLM-1.7B Q4_K_M + F16 mmproj", _MOBILEVLM,
              _MOBILEVLM_DOC + ", 'Snapdragon 778G chip', MobileVLM-1.7B, release b2005",
              decode_tokens_per_s=13.92, prompt_tokens_per_s=23.52, prompt_tokens=191, prompt_threads=4,
              image_encode_s=18.72852, image_threads=4,
              note="the same section's 'latest-version' run (0.36 prompt tokens/s) is a regression the document "
                   "reports, not the device's speed, and is left out"),
    Reference("snapdragon-778g", "MobileVLM_V2-1.7B Q4_K_M + F16 mmproj", _MOBILEVLM,
              _MOBILEVLM_DOC + ", 'Snapdragon 778G chip', MobileVLM_V2-1.7B, release b2005",
              decode_tokens_per_s=12.83, prompt_tokens_per_s=21.12, prompt_tokens=191, prompt_threads=4,
              image_encode_s=20.60961, image_threads=4, note="decode over 186 tokens; LDPv2 projector, same sizes"),
    Reference("snapdragon-8-elite-gen-5", "Qwen3-1.7B Q4_0",
              decoder_cost(28, 2048, 6144, 1024, 151936, True, "q4_0"), _POCKETPAL_702,
              decode_tokens_per_s=30.4, note=f"{_POCKETPAL_NOTE}; {_RATE_SOURCE}"),
    Reference("snapdragon-8-elite-gen-5", "Qwen3-1.7B Q4_K_M",
              decoder_cost(28, 2048, 6144, 1024, 151936, True, "q4_k_m"), _POCKETPAL_702,
              decode_tokens_per_s=31.6, note=f"{_POCKETPAL_NOTE}; {_RATE_SOURCE}"),
    Reference("snapdragon-8-elite-gen-5", "Qwen3-1.7B Q8_0",
              decoder_cost(28, 2048, 6144, 1024, 151936, True, "q8_0"), _POCKETPAL_702,
              decode_tokens_per_s=25.7, prompt_tokens_per_s=100.0, prompt_tokens=256, note=_POCKETPAL_NOTE),
    Reference("snapdragon-8-gen-2", "Qwen3.5-2B Q4_K_M (1.30 GiB file)",
              ModelCost(1.30 * 2 ** 30, 0, 0, 0, 0, 0, 0, 0),
              "llama.cpp issue #26957 (https://github.com/ggml-org/llama.cpp/issues/26957): Samsung Galaxy S23 "
              "Ultra, official Android release b10092, llama-server -t 5, median decode over 192-token generations",
              decode_tokens_per_s=15.48,
              note="decode only: bytes per token taken as the file's size; its prompt figure (72.7 tokens/s over "
                   "~2k tokens) is left out because the model's linear-attention layers are not in the roofline"),
    Reference("snapdragon-8-gen-2", "OmniVLM-968M: SigLIP-400M at 384 px, F16 mmproj",
              _OMNIVLM,
              "llama.cpp issue #11856 (https://github.com/ggml-org/llama.cpp/issues/11856): Samsung Galaxy S23, CPU, "
              "Nexa SDK's llama.cpp build (February 2025), 'about 18 seconds' in clip_image_batch_encode",
              image_encode_s=18.0,
              note="image only; thread count not stated (all 8 cores assumed) nor the mmproj's type (F16, the "
                   "model's published projector file, assumed); the figure is given to two digits"),
)


def _decode_efficiency(r: Reference) -> float:
    return r.decode_tokens_per_s * r.cost.text_bytes_per_token / (DEVICES[r.device].bandwidth_gbs * 1e9)


def _prefill_efficiency(r: Reference) -> float:
    """Of a Q8_0 matrix: each type's FLOPs weighted by 1 / its kernel rate."""
    work_per_s = r.prompt_tokens_per_s * r.cost.prefill_work(r.prompt_tokens, KERNEL_RATES) / r.prompt_tokens
    return work_per_s / (DEVICES[r.device].peak_gflops(r.prompt_threads) * 1e9)


def _vision_efficiency(r: Reference) -> float:
    """Of a float matrix: every image reference encodes with an F16 mmproj."""
    return r.cost.vision_flops() / (r.image_encode_s * DEVICES[r.device].peak_gflops(r.image_threads) * 1e9)


# kind -> (the reference's figure, its efficiency, how the figure scales with efficiency: +1 a rate, -1 a time)
KINDS = {
    "decode": ("decode_tokens_per_s", _decode_efficiency, 1),
    "prefill": ("prompt_tokens_per_s", _prefill_efficiency, 1),
    "vision": ("image_encode_s", _vision_efficiency, -1),
}


def _geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


@dataclass(frozen=True)
class PhoneFit:
    efficiency: Efficiency
    band: dict                  # kind -> factor: the estimate's range is [value / factor, value * factor]
    leave_one_out: dict         # kind -> rows of reference, measured, predicted, error_pct

    def estimate(self, cost: ModelCost, device: Device, prompt_text_tokens: int) -> dict:
        """The phone estimate on all of `device`'s cores, with its leave-one-out range."""
        central = estimate(cost, device.bandwidth_gbs, device.peak_gflops(), self.efficiency, prompt_text_tokens,
                           KERNEL_RATES)

        def bound(sign: int) -> Estimate:
            eff = Efficiency(**{kind: getattr(self.efficiency, kind) * self.band[kind] ** sign for kind in KINDS})
            return estimate(cost, device.bandwidth_gbs, device.peak_gflops(), eff, prompt_text_tokens, KERNEL_RATES)

        slow, fast = bound(-1), bound(1)
        return {name: {"value": getattr(central, name), "low": min(getattr(slow, name), getattr(fast, name)),
                       "high": max(getattr(slow, name), getattr(fast, name))} for name in central.to_dict()}


def fit_phones(references: tuple[Reference, ...] = REFERENCES) -> PhoneFit:
    efficiencies, band, rows = {}, {}, {}
    for kind, (figure, efficiency_of, sign) in KINDS.items():
        refs = [r for r in references if getattr(r, figure) is not None]
        values = [efficiency_of(r) for r in refs]
        efficiencies[kind] = _geometric_mean(values)
        rows[kind], log_errors = [], []
        for i, r in enumerate(refs):
            rest = _geometric_mean(values[:i] + values[i + 1:])
            measured = getattr(r, figure)
            predicted = measured * (rest / values[i]) ** sign
            log_errors.append(math.log(predicted / measured))
            rows[kind].append({"device": DEVICES[r.device].name, "model": r.model, "measured": measured,
                               "predicted": predicted, "error_pct": 100 * (predicted / measured - 1),
                               "efficiency": values[i]})
        band[kind] = math.exp(math.sqrt(sum(e * e for e in log_errors) / len(log_errors)))
    return PhoneFit(Efficiency(**efficiencies), band, rows)


def vision_kernels(cost: ModelCost) -> str:
    """Which kernels the image encode estimate runs the mmproj's matrices on, by share of their parameters."""
    shares = ", ".join(f"{t} {p / cost.vision_matmul_params:.0%}" for t, p in
                       sorted(cost.vision_matmul_by_type, key=lambda tp: -tp[1]))
    return (f"mmproj matrices {shares or 'F16'}: float ones at the F16 image references' efficiency, quantized ones "
            f"at the prompt efficiency times their type's kernel rate")


def format_range(figure: dict, digits: int) -> str:
    """'value (low-high)' for one figure of `PhoneFit.estimate`."""
    return f"{figure['value']:.{digits}f} ({figure['low']:.{digits}f}-{figure['high']:.{digits}f})"


PHONE_FIT = fit_phones()
# not a reference: another runtime (MLC-LLM, GPU) and another weight format; printed beside the estimate
PUBLISHED = {"imp-v1.5-3b-196 snapdragon-8-gen-3 decode tokens/s (MLC-LLM q4f16_1, Imp authors)": 13.0}
