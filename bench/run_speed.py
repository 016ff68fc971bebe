"""Speed benchmark and this machine's roofline fit, written to bench/results/speed.json and speed.md.

    python bench/run_speed.py --work /tmp/impq-bench      # ~10 min on 2 cores; run on an otherwise idle machine

1. Measures this machine's memory bandwidth and FP32 matmul rate.
2. `impq bench` figures for imp-tiny and for the generated full-size imp-v1-3b, each as F16, Q8_0 and Q4_0.
3. Fits the roofline's efficiency factors on one case (full-size Q4_0), predicts the other five, and states
   the prediction errors. The fit is this machine's: phones have their own, fitted on published phone
   measurements (bench/run_phone_fit.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
from pathlib import Path

from impq.defaults import default_model_dir
from impq.export.pair import pair_paths
from impq.recipe import export_with_recipe
from impq.measure.bench import bench_pair
from impq.measure.phone import ModelCost, estimate, fit_efficiency, measure_machine
from impq.models.layouts import read_spec
from impq.models.testing import make_model
from impq.verify import default_images

RESULTS = Path(__file__).resolve().parent / "results"
TYPES = ("f16", "q8_0", "q4_0")
FIT_CASE = ("imp-v1-3b", "q4_0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    machine = measure_machine()
    print("machine", machine, flush=True)
    full = args.work / "imp-v1-3b-random"
    if not (full / "model.safetensors.index.json").is_file():
        make_model("imp-phi2", full, full_size=True)
    models = {"imp-tiny": default_model_dir(), "imp-v1-3b": full}
    image = default_images()[0]
    cases, costs = {}, {}
    for label, folder in models.items():
        spec = read_spec(folder)
        for type_name in TYPES:
            out = args.work / f"{label}-{type_name}"
            text, mmproj = pair_paths(out, spec, type_name)
            if not (text.is_file() and mmproj.is_file()):
                export_with_recipe(spec, out, type_name)
            figures = bench_pair(text, mmproj, image, runs=args.runs, warmup=1, decode_tokens=32)
            cases[f"{label} {type_name}"] = figures
            costs[f"{label} {type_name}"] = ModelCost.from_gguf_pair(text, mmproj)
            print(label, type_name, json.dumps({k: figures[k] for k in ("prompt_tokens", "decode_tokens_per_s",
                                                                        "prompt_tokens_per_s", "image_encode_s")}),
                  flush=True)

    fit_key = " ".join(FIT_CASE)
    eff = fit_efficiency(costs[fit_key], cases[fit_key], machine["bandwidth_gbs"], machine["peak_gflops"])
    errors = {}
    for key, figures in cases.items():
        text_tokens = figures["prompt_tokens"] - costs[key].llm_image_tokens
        pred = estimate(costs[key], machine["bandwidth_gbs"], machine["peak_gflops"], eff, text_tokens)
        measured = {"decode_tokens_per_s": figures["decode_tokens_per_s"]["median"],
                    "prefill_tokens_per_s": figures["prompt_tokens_per_s"]["median"],
                    "image_encode_s": figures["image_encode_s"]["median"]}
        errors[key] = {name: {"measured": measured[name], "predicted": getattr(pred, name),
                              "error_pct": 100 * (getattr(pred, name) - measured[name]) / measured[name]}
                       for name in measured}

    record = {"machine": {**machine, "cpus": os.cpu_count(), "platform": platform.platform()},
              "efficiency": dataclasses.asdict(eff), "fitted_on": fit_key, "cases": cases,
              "prediction_errors": errors}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "speed.json").write_text(json.dumps(record, indent=2) + "\n")
    write_markdown(record)


def write_markdown(r: dict) -> None:
    m = r["machine"]
    lines = ["# Speed: impq bench in llama.cpp, and this machine's roofline fit", "",
             f"Machine: {m['cpus']} CPUs ({m['platform']}); measured read bandwidth {m['bandwidth_gbs']:.1f} GB/s, "
             f"FP32 matmul {m['peak_gflops']:.0f} GFLOP/s. Image + question prompt, 32 decoded tokens, "
             "median of the timed runs after one warm-up (min-max in speed.json).", "",
             "| model | type | text+mmproj MB | prompt tokens | image encode s | prefill tok/s | decode tok/s | "
             "TTFT s | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
    for key, c in r["cases"].items():
        model, type_name = key.split()
        lines.append(f"| {model} | {type_name} | {c['text_gguf_mb'] + c['mmproj_gguf_mb']:.1f} | {c['prompt_tokens']} | "
                     f"{c['image_encode_s']['median']:.3f} | {c['prompt_tokens_per_s']['median']:.1f} | "
                     f"{c['decode_tokens_per_s']['median']:.1f} | {c['ttft_s']['median']:.2f} | {c['peak_rss_mb']:.0f} |")
    e = r["efficiency"]
    lines += ["", f"## Roofline fit (on {r['fitted_on']}): efficiency decode {e['decode']:.2f} of bandwidth, "
              f"prefill {e['prefill']:.2f} and vision {e['vision']:.2f} of FP32 matmul rate", "",
              "Prediction error on this machine (predicted vs measured; the fitted case is 0 by construction):", "",
              "| case | decode tok/s meas / pred (err) | prefill tok/s meas / pred (err) | image encode s meas / pred (err) |",
              "|---|---|---|---|"]
    for key, err in r["prediction_errors"].items():
        cells = [f"{v['measured']:.3g} / {v['predicted']:.3g} ({v['error_pct']:+.0f} %)" for v in err.values()]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", "Phones are estimated by their own fit, on published phone measurements: bench/results/phone_fit.md."]
    (RESULTS / "speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
