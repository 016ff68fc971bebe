"""Speed of the vision reductions at the real Imp-3B dimensions (generated imp-v1-3b: SigLIP so400m + Phi-2 2.7B,
random weights, so speed only), written to bench/results/reduction_full_size.json and .md.

    python bench/run_reduction_full_size.py --work /tmp/impq-bench     # ~25 min on 2 cores; an idle machine

The text model is written once at Q4_0; an F16 mmproj per reduction: 384 px (native, 729 tokens), 336 px (576),
224 px (256), 196 px (196) and 336 px with 2x2 pooling (144 tokens, llama.cpp's ldpv2 graph). Each pair is timed
by `impq bench` (llama.cpp through llama-cpp-python, 2 threads) with flash attention off and on, and estimated
for a Snapdragon 8 Gen 3 by the roofline fitted on published phone measurements (impq/measure/phone_fit.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from full_size_pair import full_size_pair, full_size_spec

from impq.defaults import REPO
from impq.measure.bench import bench_pair
from impq.measure.phone import DEVICES, ModelCost
from impq.measure.phone_fit import PHONE_FIT, format_range
from impq.verify import default_images

RESULTS = REPO / "bench" / "results"
# None: the native input, 384 px, whose 27x27 patch grid (729 tokens) covers 378 px: impq writes 378 as the mmproj's
# clip.vision.image_size, the multiple of the patch size that the tower sees
REDUCTIONS = ((None, "none"), (336, "none"), (224, "none"), (196, "none"), (336, "pool2"))
PHONE = "snapdragon-8-gen-3"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--phone-only", action="store_true",
                        help="recompute only the phone columns of the committed results, from the same files; the "
                             "measured columns (and the commit that measured them) stay")
    args = parser.parse_args()
    spec, device = full_size_spec(args.work), DEVICES[PHONE]
    rows, phones = [], {}
    for size, token_reduction in REDUCTIONS:
        text, mmproj, reduction = full_size_pair(args.work, spec, size, token_reduction)
        phone = PHONE_FIT.estimate(ModelCost.from_gguf_pair(text, mmproj), device, prompt_text_tokens=40)
        phones[reduction.image_size, token_reduction] = phone
        if args.phone_only:
            continue
        for flash in ("off", "on"):
            figures = bench_pair(text, mmproj, default_images()[0], runs=args.runs, warmup=1, decode_tokens=16,
                                 n_threads=args.threads, flash_attn=flash)
            row = {"image_size": reduction.image_size, "token_reduction": token_reduction, "image_tokens": reduction.n_tokens,
                   "flash_attn": flash, "prompt_tokens": figures["prompt_tokens"],
                   **{k: figures[k]["median"] for k in ("image_encode_s", "prefill_s", "ttft_s",
                                                        "prompt_tokens_per_s", "decode_tokens_per_s")},
                   "peak_rss_mb": figures["peak_rss_mb"], "phone": phone}
            rows.append(row)
            print(json.dumps(row), flush=True)

    measured_at = None
    if args.phone_only:
        committed = json.loads((RESULTS / "reduction_full_size.json").read_text())
        rows, measured_at = committed["rows"], committed.get("measured_at", committed["commit"])
        args.threads, args.runs = committed["threads"], committed["runs"]
        for row in rows:
            row["phone"] = phones[row["image_size"], row["token_reduction"]]

    def ttft(size, reduction, flash):
        return next(r["ttft_s"] for r in rows if (r["image_size"], r["token_reduction"], r["flash_attn"]) ==
                    (size, reduction, flash))

    native = spec.vision.image_size
    ratios = {flash: ttft(native, "none", flash) / ttft(196, "none", flash) for flash in ("off", "on")}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout
    record = {"model": "generated imp-v1-3b (Phi-2 2.7B + SigLIP so400m, random weights), text Q4_0, mmproj F16",
              "threads": args.threads, "runs": args.runs, "commit": commit.strip(), "phone": device.name,
              "rows": rows, "ttft_ratio_729_to_196_tokens": ratios, "measured_at": measured_at or commit.strip()}
    (RESULTS / "reduction_full_size.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["# Vision reductions at the Imp-3B dimensions (speed only)", "",
             f"`python bench/run_reduction_full_size.py`, measured at commit {record['measured_at']} (phone columns "
             f"at {commit.strip()}): {record['model']}; llama.cpp "
             f"through llama-cpp-python 0.3.36, {args.threads} threads, median of {args.runs} runs after a warm-up, "
             f"16 decoded tokens. Phone columns: the roofline estimate for the {device.name}'s CPU in llama.cpp, "
             "fitted on published phone measurements, with its leave-one-out range (bench/results/phone_fit.md).",
             "",
             "| input | tokens | flash attn | image encode s | TTFT s | prompt tok/s | decode tok/s | peak RSS MB | "
             "phone encode s | phone TTFT s | phone decode tok/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label = (f"{r['image_size']} px" if r["image_size"] != native else "384 px (native; 378 px of patches)") + (
            " + 2x2 pool" if r["token_reduction"] == "pool2" else "")
        phone = [format_range(r["phone"][k], 1) for k in ("image_encode_s", "ttft_s", "decode_tokens_per_s")]
        lines.append(f"| {label} | {r['image_tokens']} | {r['flash_attn']} | {r['image_encode_s']:.2f} | "
                     f"{r['ttft_s']:.2f} | {r['prompt_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} | " + " | ".join(phone) + " |")
    lines += ["", f"Measured ratio of time to first token, 729 image tokens (384 px) to 196 (196 px): "
                  f"{ratios['off']:.2f}x with flash attention off, {ratios['on']:.2f}x with it on."]
    (RESULTS / "reduction_full_size.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
