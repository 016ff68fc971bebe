"""The phone fit and its leave-one-out error, and the estimate for Imp-v1.5-3B at 384 and 196 px on a Snapdragon
8 Gen 3, per vision precision, written to bench/results/phone_fit.json and phone_fit.md.

    IMPQ_LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin python bench/run_phone_fit.py --work /tmp/impq-bench
    # ~10 min: writes the generated Imp-3B pair once, then quantizes its mmprojs and times their image encoding

The references (impq/measure/phone_fit.py) are published llama.cpp CPU measurements on phones, each with its
source. Imp-v1.5-3B's costs come from the generated imp-v1-3b pair (Phi-2 2.7B at Q4_0, SigLIP so400m mmproj),
whose tensors have the real checkpoint's shapes. Its mmproj at F16, Q8_0, Q4_0 and Q4_K (llama.cpp's
`llama-quantize` on the F16 file: the weights are random, so only sizes and speeds mean anything) is timed here:
llama.cpp's image encode alone (tower and projector), median of --runs after a warm-up, on this machine's cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
from pathlib import Path

from full_size_pair import full_size_pair, full_size_spec
from llamacpp_baseline import llamacpp_quantize_mmproj, matrix_types

from impq.defaults import REPO
from impq.measure.phone import DEVICES, IMP_V1_5_3B_196, ModelCost
from impq.measure.phone_fit import KERNEL_RATES, KINDS, PHONE_FIT, PUBLISHED, REFERENCES, format_range
from impq.models.preprocess import load_image
from impq.runtime.llamacpp import PairRunner

RESULTS = REPO / "bench" / "results"
PHONE = "snapdragon-8-gen-3"
TEXT_TOKENS = 40
SIZES = {"384": None, "196": 196}       # None: the native input (a 27x27 grid: 729 tokens)
VISION_TYPES = ("f16", "q8_0", "q4_0", "q4_k")
IMAGE = REPO / "impq" / "assets" / "images" / "sample-1.png"
FIGURES = (("image_encode_s", "image encode s", 1), ("prefill_tokens_per_s", "prompt tok/s", 1),
           ("decode_tokens_per_s", "decode tok/s", 1), ("ttft_s", "TTFT s", 1))


def encode_seconds(text: Path, mmproj: Path, runs: int) -> dict:
    image = load_image(IMAGE)
    with PairRunner(text, mmproj) as runner:
        runner.encode_image_s(image)                     # warm-up
        seconds = [runner.encode_image_s(image) for _ in range(runs)]
        threads = runner.n_threads
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds), "threads": threads}


def vision_types(args, spec) -> list[dict]:
    """Each vision precision at each input size: its mmproj's bytes and tensor types, its image encode here, and
    the phone estimate its types give."""
    rows = []
    for label, size in SIZES.items():
        text, f16, _ = full_size_pair(args.work, spec, size)
        for type_name in VISION_TYPES:
            mmproj = f16 if type_name == "f16" else f16.with_name(f16.name.replace("-F16-", f"-{type_name.upper()}-"))
            if not mmproj.is_file():
                llamacpp_quantize_mmproj(args.llama_cpp_bin, f16, mmproj, type_name)
            cost = ModelCost.from_gguf_pair(text, mmproj)
            rows.append({"input": label, "vision_type": type_name, "mmproj_bytes": mmproj.stat().st_size,
                         "tensor_types": matrix_types(mmproj),
                         "matmul_params_by_type": dict(cost.vision_matmul_by_type),
                         "encode_here_s": encode_seconds(text, mmproj, args.runs),
                         "estimate": PHONE_FIT.estimate(cost, DEVICES[PHONE], TEXT_TOKENS)})
            print(json.dumps({k: rows[-1][k] for k in ("input", "vision_type", "mmproj_bytes", "encode_here_s")}))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--llama-cpp-bin", type=Path, default=os.environ.get("IMPQ_LLAMA_CPP_BIN"))
    args = parser.parse_args()
    if args.llama_cpp_bin is None or not (args.llama_cpp_bin / "llama-quantize").is_file():
        raise SystemExit("bench: give --llama-cpp-bin (or IMPQ_LLAMA_CPP_BIN): llama.cpp's built tools")
    spec = full_size_spec(args.work)
    costs = {label: ModelCost.from_gguf_pair(*full_size_pair(args.work, spec, size)[:2])
             for label, size in SIZES.items()}
    if costs["196"] != IMP_V1_5_3B_196:
        raise SystemExit(f"bench: impq.measure.phone.IMP_V1_5_3B_196 is {IMP_V1_5_3B_196}, the pair gives "
                         f"{costs['196']}: update the constant")
    device = DEVICES[PHONE]
    estimates = {label: PHONE_FIT.estimate(cost, device, TEXT_TOKENS) for label, cost in costs.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    record = {"commit": commit.stdout.strip(), "phone": device.name, "text_tokens": TEXT_TOKENS,
              "machine": f"{os.cpu_count()} CPUs",
              "efficiency": dataclasses.asdict(PHONE_FIT.efficiency), "band": PHONE_FIT.band,
              "kernel_rates": {"quantized": dict(KERNEL_RATES.quantized), "unmeasured": KERNEL_RATES.unmeasured,
                               "source": KERNEL_RATES.source},
              "leave_one_out": PHONE_FIT.leave_one_out,
              "references": [{**{k: v for k, v in dataclasses.asdict(r).items() if k != "cost"},
                              "device_name": DEVICES[r.device].name} for r in REFERENCES],
              "devices": {k: {**dataclasses.asdict(d), "peak_gflops": d.peak_gflops()} for k, d in DEVICES.items()},
              "imp_v1_5_3b_costs": {label: dataclasses.asdict(c) for label, c in costs.items()},
              "imp_v1_5_3b_estimates": estimates, "imp_v1_5_3b_vision_types": vision_types(args, spec),
              "published": PUBLISHED}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "phone_fit.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / "phone_fit.md").write_text(markdown(record))
    print(markdown(record))


def markdown(r: dict) -> str:
    e, band = r["efficiency"], r["band"]
    lines = ["# Phone estimate: fitted on published llama.cpp measurements on phones", "",
             f"`python bench/run_phone_fit.py` at commit {r['commit']}. The roofline (impq/measure/phone.py): decode "
             "tokens/s = efficiency x peak bandwidth / bytes of weights per token; prompt and image encoding = "
             "FLOPs / (efficiency x FP32 peak of the threads used). One efficiency per kind, the geometric mean over "
             "the references; its band is the root-mean-square leave-one-out log error, applied both ways. This "
             "machine's own fit (bench/results/speed.md) is not carried to phones.", "",
             "Each matrix runs llama.cpp's kernel for its type: float matrices (F16) at the image-encode efficiency, "
             "the only float-kernel figure the references hold (every image reference ran an F16 mmproj); quantized "
             "ones at the prompt efficiency, stated for Q8_0, times the type's rate (below). Attention runs at its "
             "kind's efficiency. Image encoding is also no faster than reading the tower's weights once at the "
             "decode efficiency.", "",
             f"Fitted: decode {e['decode']:.3f} of peak bandwidth (band x/{band['decode']:.2f}), prompt "
             f"{e['prefill']:.3f} of FP32 peak for a Q8_0 matrix (x/{band['prefill']:.2f}), image encode "
             f"{e['vision']:.3f} for a float matrix (x/{band['vision']:.2f}).", "",
             "Kernel rates (prompt tokens/s of one model's file per type over its Q8_0 file's; "
             f"{r['kernel_rates']['source']}): "
             + ", ".join(f"{t} {v:.3f}" for t, v in r["kernel_rates"]["quantized"].items())
             + f"; types without a measurement (Q4_1, Q5_0, Q5_1, ...): {r['kernel_rates']['unmeasured']:.3f}, the "
             "slowest measured.", "",
             "## References (llama.cpp on the phone's CPU; figures as their sources print them)", "",
             "| # | device | model | decode tok/s | prompt tok/s (tokens, threads) | image encode s (threads) | "
             "source | note |", "|---|---|---|---|---|---|---|---|"]
    for i, ref in enumerate(r["references"], 1):
        prompt = (f"{ref['prompt_tokens_per_s']} ({ref['prompt_tokens']}, "
                  f"{ref['prompt_threads'] or 'all cores assumed'})" if ref["prompt_tokens_per_s"] else "-")
        image = f"{ref['image_encode_s']:.2f} ({ref['image_threads']})" if ref["image_encode_s"] else "-"
        lines.append(f"| {i} | {ref['device_name']} | {ref['model']} | {ref['decode_tokens_per_s'] or '-'} | "
                     f"{prompt} | {image} | {ref['source']} | {ref['note']} |")
    lines += ["", "## Leave-one-out: each reference predicted from a fit on the others", "",
              "| kind | device | model | measured | predicted | error | efficiency |", "|---|---|---|---|---|---|---|"]
    for kind in KINDS:
        for row in r["leave_one_out"][kind]:
            lines.append(f"| {kind} | {row['device']} | {row['model']} | {row['measured']:.3g} | "
                         f"{row['predicted']:.3g} | {row['error_pct']:+.0f} % | {row['efficiency']:.3f} |")
    lines += ["", "Device figures (peak bandwidth, FP32 peak of all cores):", ""]
    lines += [f"- {d['name']}: {d['bandwidth_gbs']} GB/s, {d['peak_gflops']:.0f} GFLOP/s. {d['source']}"
              for d in r["devices"].values()]
    lines += ["", f"## Imp-v1.5-3B on a {r['phone']} (CPU, all cores; Q4_0 text + F16 mmproj; {r['text_tokens']} "
                  "text tokens beside the image)", "",
              "| input | image tokens | " + " | ".join(label for _, label, _ in FIGURES) + " |",
              "|---|---|" + "---|" * len(FIGURES)]
    for label, est in r["imp_v1_5_3b_estimates"].items():
        tokens = r["imp_v1_5_3b_costs"][label]["vision_tokens"]
        cells = [format_range(est[k], d) for k, _, d in FIGURES]
        lines.append(f"| {label} px | {tokens} | " + " | ".join(cells) + " |")
    lines += ["", f"## Imp-v1.5-3B's mmproj per vision precision: sizes and image encode here ({r['machine']}), "
                  f"and the {r['phone']} estimate", "",
              "The mmprojs: llama.cpp's `llama-quantize` on the generated F16 mmproj (random weights: sizes and "
              "speeds only). Encode here: llama.cpp's image encode alone (tower and projector), median of the runs "
              "(min-max). The estimate's range is the leave-one-out band of the kinds each tensor's kernel uses.", "",
              "| input | mmproj | MB | matrices by type | encode here s | phone encode s | phone TTFT s |",
              "|---|---|---|---|---|---|---|"]
    for row in r["imp_v1_5_3b_vision_types"]:
        here = row["encode_here_s"]
        types = ", ".join(f"{t} {n}" for t, n in sorted(row["tensor_types"].items()))
        phone = row["estimate"]
        lines.append(f"| {row['input']} px | {row['vision_type'].upper()} | {row['mmproj_bytes'] / 1e6:.0f} | "
                     f"{types} | {here['median']:.2f} ({here['min']:.2f}-{here['max']:.2f}) | "
                     f"{format_range(phone['image_encode_s'], 1)} | {format_range(phone['ttft_s'], 1)} |")
    lines += ["", "SigLIP-so400m's widths decide the kernels: its 4304-wide MLP input fits neither 32- nor 256-wide "
              "blocks, so fc2 stays F16 at every type; its 1152-wide inputs fit Q8_0's and Q4_0's 32-wide blocks but "
              "not a K-quant's 256-wide ones, where llama.cpp falls back (Q4_K to Q5_0), a type the kernel rates do "
              "not measure. No published phone measurement of a quantized mmproj was found: the quantized rows rest "
              "on the assumption that a quantized tower's matrices run as fast as a quantized LLM's prompt matrices "
              "of the same type on the same phone.", ""]
    lines += ["", "Ranges: the leave-one-out band. For comparison, not a reference: "
              + "; ".join(f"{k}: {v}" for k, v in r["published"].items()) + " (another runtime, on the GPU).", "",
              "Limits: the references are small models (1-2B) on four phones, measured with llama.cpp builds two "
              "years apart (MobileVLM's in early 2024, OmniVLM's in early 2025, PocketPal's and the S23 Ultra's in "
              "2026), and PocketPal's and OmniVLM's thread counts are not stated. The fit treats every build alike: "
              "the decode references split by era (efficiency 0.20-0.22 on the 2024 builds, 0.32-0.55 on the 2026 "
              "ones), which is most of the decode band. One image reference is a SigLIP-so400m tower (OmniVLM on a "
              "Snapdragon 8 Gen 2, predicted from the CLIP references within a few per cent); none is a Snapdragon "
              "8 Gen 3, a quantized mmproj or a 729-token prefill; the Imp estimates extrapolate along the roofline."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
