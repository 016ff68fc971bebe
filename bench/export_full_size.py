"""Benchmark: export the generated full-size imp-v1-3b (SigLIP so400m + Phi-2 2.7B, random weights) to F16 and
Q4_0, then load each pair in llama.cpp and generate from an image. Records export time and peak RSS.

    python bench/export_full_size.py --work /tmp/impq-bench     # ~15 GB of scratch disk, 10-30 min on 2 cores

Each step runs as its own process so that its peak RSS (from wait4) is its own. Results go to
bench/results/export_full_size.json (and .md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

GENERATE = """
import json, sys, time
from PIL import Image
from impq.runtime.llamacpp import PairRunner
from impq.verify import default_images
text, mmproj = sys.argv[1], sys.argv[2]
start = time.perf_counter()
with PairRunner(text, mmproj) as runner:
    load_s = time.perf_counter() - start
    result = runner.run(Image.open(default_images()[0]), "What is in the image?", max_new_tokens=16)
print(json.dumps({"load_s": load_s, "image_encode_s": result.image_encode_s, "prefill_s": result.prefill_s,
                  "decode_s": result.decode_s, "prompt_tokens": result.n_prompt_tokens,
                  "generated_tokens": len(result.tokens)}))
"""


def run_measured(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, stdout) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder for the checkpoint and GGUFs")
    parser.add_argument("--types", default="f16,q4_0")
    args = parser.parse_args()
    model = args.work / "imp-v1-3b-random"
    impq = [sys.executable, "-m", "impq.cli"]
    record: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "model": {}, "exports": {}}

    if not (model / "model.safetensors.index.json").is_file():
        secs, rss, _ = run_measured([*impq, "testing", "make-model", "--layout", "imp-phi2", "--full-size",
                                     "--out", str(model)])
        record["model"]["generate_s"], record["model"]["generate_peak_rss_mb"] = round(secs, 1), round(rss)
    checkpoint_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    record["model"]["checkpoint_gb"] = round(checkpoint_bytes / 1e9, 3)

    for type_name in args.types.split(","):
        out = args.work / f"export-{type_name}"
        secs, rss, stdout = run_measured([*impq, "export", str(model), "--out", str(out), "--type", type_name, "--json"])
        exported = json.loads(stdout)
        gen_secs, gen_rss, gen_out = run_measured([sys.executable, "-c", GENERATE, exported["text_gguf"],
                                                   exported["mmproj_gguf"]])
        gen = json.loads(gen_out)
        record["exports"][type_name] = {
            "export_s": round(secs, 1), "export_peak_rss_mb": round(rss),
            "text_gguf_gb": round(exported["text_bytes"] / 1e9, 3),
            "mmproj_gguf_gb": round(exported["mmproj_bytes"] / 1e9, 3),
            "llamacpp_load_and_generate_s": round(gen_secs, 1), "llamacpp_peak_rss_mb": round(gen_rss),
            **{k: round(v, 3) if isinstance(v, float) else v for k, v in gen.items()},
        }
        print(type_name, record["exports"][type_name], flush=True)

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "export_full_size.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["# Full-size imp-v1-3b (random weights): export and llama.cpp load", "",
             f"Machine: {record['machine']['cpus']} CPUs, {record['machine']['platform']}. "
             f"Checkpoint: {record['model']['checkpoint_gb']} GB F16 safetensors.", "",
             "| type | export s | export peak RSS MB | text GGUF GB | mmproj GB | llama.cpp peak RSS MB | "
             "image encode s | prefill s (incl. image) | prompt tokens | decode s (16 tokens) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for type_name, r in record["exports"].items():
        lines.append(f"| {type_name} | {r['export_s']} | {r['export_peak_rss_mb']} | {r['text_gguf_gb']} | "
                     f"{r['mmproj_gguf_gb']} | {r['llamacpp_peak_rss_mb']} | {r['image_encode_s']} | "
                     f"{r['prefill_s']} | {r['prompt_tokens']} | {r['decode_s']} |")
    (RESULTS / "export_full_size.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
