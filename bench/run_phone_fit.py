"""The phone fit and its leave-one-out error, and the estimate for Imp-v1.5-3B at 384 and 196 px on a Snapdragon
8 Gen 3, written to bench/results/phone_fit.json and phone_fit.md.

    python bench/run_phone_fit.py --work /tmp/impq-bench     # ~5 min: writes the generated Imp-3B pair once

The references (impq/measure/phone_fit.py) are published llama.cpp CPU measurements on phones, each with its
source; nothing here is timed. Imp-v1.5-3B's costs come from the generated imp-v1-3b pair (Phi-2 2.7B at Q4_0,
SigLIP so400m mmproj at F16), whose tensors have the real checkpoint's shapes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
from pathlib import Path

from full_size_pair import full_size_pair, full_size_spec

from impq.defaults import REPO
from impq.measure.phone import DEVICES, IMP_V1_5_3B_196, ModelCost
from impq.measure.phone_fit import KINDS, PHONE_FIT, PUBLISHED, REFERENCES, format_range

RESULTS = REPO / "bench" / "results"
PHONE = "snapdragon-8-gen-3"
TEXT_TOKENS = 40
SIZES = {"384": None, "196": 196}       # None: the native input (a 27x27 grid: 729 tokens)
FIGURES = (("image_encode_s", "image encode s", 1), ("prefill_tokens_per_s", "prompt tok/s", 1),
           ("decode_tokens_per_s", "decode tok/s", 1), ("ttft_s", "TTFT s", 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    args = parser.parse_args()
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
              "efficiency": dataclasses.asdict(PHONE_FIT.efficiency), "band": PHONE_FIT.band,
              "leave_one_out": PHONE_FIT.leave_one_out,
              "references": [{**{k: v for k, v in dataclasses.asdict(r).items() if k != "cost"},
                              "device_name": DEVICES[r.device].name} for r in REFERENCES],
              "devices": {k: {**dataclasses.asdict(d), "peak_gflops": d.peak_gflops()} for k, d in DEVICES.items()},
              "imp_v1_5_3b_costs": {label: dataclasses.asdict(c) for label, c in costs.items()},
              "imp_v1_5_3b_estimates": estimates, "published": PUBLISHED}
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
             f"Fitted: decode {e['decode']:.3f} of peak bandwidth (band x/{band['decode']:.2f}), prompt "
             f"{e['prefill']:.3f} of FP32 peak (x/{band['prefill']:.2f}), image encode {e['vision']:.3f} "
             f"(x/{band['vision']:.2f}).", "",
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
    lines += ["", "Ranges: the leave-one-out band. For comparison, not a reference: "
              + "; ".join(f"{k}: {v}" for k, v in r["published"].items()) + " (another runtime, on the GPU).", "",
              "Limits: the references are small models (1.4-2B) on four phones, measured with llama.cpp builds two "
              "years apart (MobileVLM's in early 2024, PocketPal's and the S23 Ultra's in 2026), and PocketPal's thread "
              "count and prompt length are not stated. The fit treats every build alike: the decode references split "
              "by era (efficiency 0.20-0.22 on the 2024 builds, 0.32-0.55 on the 2026 ones), which is most of the "
              "decode band. No reference is a Snapdragon 8 Gen 3, and none measures a SigLIP tower or a 729-token "
              "prefill; the Imp estimates extrapolate along the roofline."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
