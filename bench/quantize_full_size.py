"""Benchmark: `impq quantize` on the generated full-size imp-v1-3b (SigLIP so400m + Phi-2 2.7B dimensions, random
weights) on the CPU: time and peak RSS of the whole run and of each stage (loading, calibration through the vision
tower, layer-by-layer quantization with the decoder streamed from the checkpoint, the GGUF pair, verification
against the streamed full-precision reference), then llama.cpp loads the pair and generates from an image.

    python bench/quantize_full_size.py --work /tmp/impq-bench      # the checkpoint of export_full_size.py

Random weights make accuracy meaningless here: this measures that a 3B model quantizes within 8 GiB (a 16 GB
laptop) and how long it takes. Results go to bench/results/quantize_full_size.json (and .md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from export_full_size import GENERATE, RESULTS, run_measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder holding imp-v1-3b-random")
    parser.add_argument("--runs", default="gptq:q4_k", help="method:type pairs, comma-separated")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=1024, help="729 image tokens plus the prompt fit in 1024")
    parser.add_argument("--device", default="auto", help="passed to impq quantize --device")
    parser.add_argument("--verify-items", type=int, default=140, help="passed to impq quantize (0: no verification)")
    parser.add_argument("--skip-load-check", action="store_true",
                        help="do not load the pair in llama.cpp (a machine without llama-cpp-python)")
    args = parser.parse_args()
    model = args.work / "imp-v1-3b-random"
    impq = [sys.executable, "-m", "impq.cli"]
    if not (model / "model.safetensors.index.json").is_file():
        run_measured([*impq, "testing", "make-model", "--layout", "imp-phi2", "--full-size", "--out", str(model)])
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    record = {"commit": commit, "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "nsamples": args.nsamples,
              "seqlen": args.seqlen, "runs": {}}
    for run in args.runs.split(","):
        method, type_name = run.split(":")
        out = args.work / f"quantize-{method}-{type_name}"
        secs, rss, stdout = run_measured([*impq, "quantize", str(model), "--method", method, "--type", type_name,
                                          "--bits", type_name[1], "--nsamples", str(args.nsamples), "--seqlen",
                                          str(args.seqlen), "--verify-items", str(args.verify_items), "--device", args.device,
                                          "--out", str(out), "--json"])
        report = json.loads(stdout)
        artifacts = report["artifacts"]
        load = {}
        if not args.skip_load_check:
            _, gen_rss, gen_out = run_measured([sys.executable, "-c", GENERATE, artifacts["text_gguf"],
                                                artifacts["mmproj_gguf"]])
            load = {"llamacpp_peak_rss_mb": round(gen_rss), **{k: round(v, 3) if isinstance(v, float) else v
                                                               for k, v in json.loads(gen_out).items()}}
        record["runs"][run] = {
            "wall_s": round(secs, 1), "peak_rss_mb": round(rss), "quantize_s": round(report["quantize_seconds"], 1),
            "calibration_tokens": report["calibration_tokens"], "artifact_gb": round(report["artifact_bytes"] / 1e9, 3),
            "bits_per_weight_file": round(report["bits_per_weight_file"], 3),
            "worst_layer_error": round(report["worst_layer_error"], 4), "device": report["device"],
            "stages": report["stages"], "verification": report["verification"], **load}
        print(run, record["runs"][run], flush=True)
    results = RESULTS / f"quantize_full_size{'' if args.device in ('auto', 'cpu') else '_' + args.device}"
    RESULTS.mkdir(exist_ok=True)
    results.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["# `impq quantize` on the full-size imp-v1-3b (random weights, Phi-2 2.7B + SigLIP so400m)", "",
             f"impq at {commit}. Machine: {record['machine']['cpus']} CPUs, {record['machine']['platform']}. Calibration: "
             f"{args.nsamples} sequences of the shapes calibration split at 384 px (729 image tokens), up to "
             f"{args.seqlen} tokens, verification {'on' if args.verify_items else 'off'}. Wall time and peak RSS are "
             "the whole `impq quantize` process; the stages' are sampled inside it.", "",
             "| method:type | device | wall s | quantize s | peak RSS MB | pair GB | LLM bits/weight (file) | "
             "worst layer error | llama.cpp peak RSS MB | prompt tokens | decode s (16 tokens) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run, r in record["runs"].items():
        lines.append(f"| {run} | {r['device']} | {r['wall_s']} | {r['quantize_s']} | {r['peak_rss_mb']} | "
                     f"{r['artifact_gb']} | {r['bits_per_weight_file']} | {r['worst_layer_error']} | "
                     f"{r.get('llamacpp_peak_rss_mb', '-')} | {r.get('prompt_tokens', '-')} | {r.get('decode_s', '-')} |")
    for run, r in record["runs"].items():
        lines += ["", f"Stages of {run}:", "", "| stage | seconds | peak RSS MB |", "|---|---|---|"]
        lines += [f"| {name} | {st['seconds']} | {st['peak_rss_mb']} |" for name, st in r["stages"].items()]
        if r["verification"]:
            v = r["verification"]
            lines += ["", f"Verification ({v['runtime']}): next-token mean KLD {v['mean_kld']:.3g}, top-1 agreement "
                          f"{v['top1_agreement']:.1%} against the full-precision PyTorch model (random weights)."]
    results.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
