"""The committed resolution sweep of imp-tiny: `impq sweep-resolution` over five resolutions (native 168 px down to
56 px, half included), with and without 2x2 token pooling, at F16, Q8_0 and Q4_K (GPTQ), on the whole shapes eval
split, timed with flash attention off and on. Results: bench/results/sweep_imp_tiny/ (CSV, JSON, plots) and
bench/results/sweep_imp_tiny.md.

    python bench/run_sweep.py --work /tmp/impq-sweep        # about 30 minutes on 2 cores; resumable
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

from impq.defaults import REPO, default_eval_data, default_model_dir
from impq.sweep.resolution import SweepSettings, run_sweep

RESULTS = REPO / "bench" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=None, help="eval items per point (default: all 700)")
    args = parser.parse_args()
    settings = SweepSettings(resolutions=[168, 140, 112, 84, 56], token_reductions=["none", "pool2"],
                             types=["f16", "q8_0", "q4_k"], method="gptq", limit=args.limit, runs=3,
                             flash_attn=["off", "on"], budget_ttft_ms=None)
    result = run_sweep(default_model_dir(), args.work, settings, default_eval_data(),
                       on_point=lambda i, n, label: print(f"[{i}/{n}] {label}", flush=True))
    folder = RESULTS / "sweep_imp_tiny"
    folder.mkdir(exist_ok=True)
    for name in ("sweep.csv", "sweep.json", "accuracy_vs_ttft.png", "accuracy_vs_phone_ttft.png",
                 "accuracy_vs_size.png"):
        shutil.copy(Path(args.work) / name, folder / name)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout
    rows = result.rows
    lines = ["# Resolution sweep of imp-tiny", "",
             f"`python bench/run_sweep.py` at commit {commit.strip()}, 2 CPU cores. {rows[0]['eval_items']} items of "
             "the shapes eval split per point; KLD and top-1 agreement of the first answer token against the "
             "full-precision model at its native 168 px; times are medians of 3 runs after a warm-up in llama.cpp "
             "(llama-cpp-python 0.3.36); the phone column is the roofline estimate for a Snapdragon 8 Gen 3's CPU, "
             "fitted on published phone measurements, with its leave-one-out range (bench/results/phone_fit.md). "
             "PyTorch-only points (2x2 pooling of a grid other than 24x24, which stock llama.cpp cannot run) are "
             "measured in PyTorch with the GGUF's dequantized weights and have no measured time.", "",
             "| type | px | tokens | reduction | runtime | flash attn | accuracy | mean KLD | TTFT s | decode tok/s | "
             "phone TTFT s | MB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ttft = "—" if r["ttft_s"] is None else f"{r['ttft_s']:.4f}"
        decode = "—" if r["decode_tokens_per_s"] is None else f"{r['decode_tokens_per_s']:.0f}"
        lines.append(f"| {r['type']} | {r['image_size']} | {r['image_tokens']} | {r['token_reduction']} | "
                     f"{r['runtime']} | {r['flash_attn'] or '—'} | {r['accuracy']:.1%} | {r['mean_kld']:.3g} | {ttft} | "
                     f"{decode} | {r['phone_ttft_s']:.4f} ({r['phone_ttft_s_low']:.4f}-{r['phone_ttft_s_high']:.4f}) | "
                     f"{r['total_mb']:.2f} |")
    best = result.recommended
    lines += ["", f"Recommended with no budget: {best['type']} at {best['image_size']} px, reduction "
                  f"{best['token_reduction']}, flash attention {best['flash_attn']}.", "",
              "![accuracy vs time to first token](sweep_imp_tiny/accuracy_vs_ttft.png)",
              "![accuracy vs phone estimate](sweep_imp_tiny/accuracy_vs_phone_ttft.png)",
              "![accuracy vs size](sweep_imp_tiny/accuracy_vs_size.png)"]
    (RESULTS / "sweep_imp_tiny.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
