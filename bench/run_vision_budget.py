"""One size budget spent two ways on the SmolLM2 LLaVA checkpoint: `--budget-includes-vision` (the tower's and
projector's tensors compete with the decoder's for the same bytes, each group's type chosen by its sensitivity
through images) against the same bytes spent on the LLM alone (its mmproj at F16 beside it). Written to
bench/results/vision_budget.{json,md}.

    IMPQ_LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin python bench/run_vision_budget.py --work /tmp/impq-vbudget

The budget: llama.cpp's Q4_K_M text file of this checkpoint (its bytes, measured by bench/run_mix.py) plus the F16
mmproj's. Both runs: GPTQ, calibrated on impq's default data for a checkpoint (calib_data/photos: photographs and
English text), sensitivity measured on the last --sensitivity-prompts items of the shapes eval split (through
images), evaluated on its first --limit items, which the sensitivity never reaches. Per pair: the text and mmproj
bytes and types; the answer-token KLD and top-1 agreement against the full-precision PyTorch model (llama.cpp
through llama-cpp-python); and the text KLD by llama-perplexity against the F16 GGUF on the docstrings evaluation
half (the LLM alone, no image).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from llamacpp_baseline import matrix_types
from real_lm import build_smollm2_llava, stdlib_text
from run_vision_quant import StoredReference

from impq.defaults import default_calib_data, default_eval_data
from impq.measure.vqa import GGUFAnswerer, evaluate, read_vqa_jsonl
from impq.models.layouts import read_spec
from impq.recipe import export_with_recipe

RESULTS = Path(__file__).resolve().parent / "results"
LLAMACPP_Q4_K_M_TEXT_BYTES = 105495904      # bench/results/mix.md: SmolLM2's llama.cpp Q4_K_M text file


def quantize(model: Path, out: Path, target_size: int, includes_vision: bool, args) -> dict:
    if not (out / "report.json").is_file():
        command = [sys.executable, "-m", "impq.cli", "quantize", str(model), "--method", "gptq",
                   "--target-size", str(target_size), "--calib", str(default_calib_data(model)),
                   "--sensitivity-data", str(default_eval_data()), "--sensitivity-prompts",
                   str(args.sensitivity_prompts), "--verify-items", "0", "--out", str(out), "--json"]
        if includes_vision:
            command.append("--budget-includes-vision")
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"bench: impq quantize: {done.stderr[-3000:]}")
    text, mmproj = sorted(out.glob("*.gguf"), key=lambda p: p.name.startswith("mmproj"))
    return {"text": text, "mmproj": mmproj}


def text_kld(bin_dir: Path, text: Path, f16_kld: Path, eval_text: Path) -> dict:
    done = subprocess.run([str(bin_dir / "llama-perplexity"), "-m", str(text), "-f", str(eval_text), "-c", "512",
                           "--kl-divergence-base", str(f16_kld), "--kl-divergence", "-t", "2"],
                          capture_output=True, text=True, env={**os.environ, "LD_LIBRARY_PATH": str(bin_dir)})
    if done.returncode != 0:
        raise SystemExit(f"bench: llama-perplexity: {done.stderr[-2000:]}")
    lines = done.stderr.splitlines() + done.stdout.splitlines()
    mean = next(line for line in lines if line.startswith("Mean    KLD:"))
    return {"text_kld": float(mean.split()[2])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--sensitivity-prompts", type=int, default=16)
    parser.add_argument("--llama-cpp-bin", type=Path, default=os.environ.get("IMPQ_LLAMA_CPP_BIN"))
    args = parser.parse_args()
    if args.llama_cpp_bin is None or not (args.llama_cpp_bin / "llama-perplexity").is_file():
        sys.exit("bench: give --llama-cpp-bin (or IMPQ_LLAMA_CPP_BIN): llama.cpp's built tools")
    args.work.mkdir(parents=True, exist_ok=True)
    model = build_smollm2_llava(args.work / "smollm2-llava")
    f16 = export_with_recipe(read_spec(model), args.work / "f16", "f16")
    eval_text = args.work / "eval-docstrings.txt"
    if not eval_text.is_file():
        eval_text.write_text(stdlib_text(first_half=False, limit_bytes=60_000))
    f16_kld = args.work / "f16.kld"
    if not f16_kld.is_file():
        subprocess.run([str(args.llama_cpp_bin / "llama-perplexity"), "-m", str(f16.text_path), "-f", str(eval_text),
                        "-c", "512", "--kl-divergence-base", str(f16_kld), "-t", "2"], check=True, capture_output=True,
                       env={**os.environ, "LD_LIBRARY_PATH": str(args.llama_cpp_bin)})
    mmproj_f16_bytes = f16.mmproj_path.stat().st_size
    budget = LLAMACPP_Q4_K_M_TEXT_BYTES + mmproj_f16_bytes
    items = read_vqa_jsonl(default_eval_data())[:args.limit]
    reference = StoredReference(model)
    runs = {"the LLM alone (mmproj at F16)": quantize(model, args.work / "llm-alone", LLAMACPP_Q4_K_M_TEXT_BYTES,
                                                       False, args),
            "--budget-includes-vision": quantize(model, args.work / "with-vision", budget, True, args)}
    rows = {}
    for label, pair in runs.items():
        with GGUFAnswerer(pair["text"], pair["mmproj"], n_threads=2) as answerer:
            report = evaluate(answerer, items, model=label, dataset="shapes eval", reference=reference)
        rows[label] = {"text_bytes": pair["text"].stat().st_size, "mmproj_bytes": pair["mmproj"].stat().st_size,
                       "answer_kld": report.mean_kld, "top1_agreement": report.top1_agreement,
                       **text_kld(args.llama_cpp_bin, pair["text"], f16_kld, eval_text),
                       "text_types": matrix_types(pair["text"]), "mmproj_types": matrix_types(pair["mmproj"])}
        print(label, json.dumps(rows[label]), flush=True)
    record = {"budget_bytes": budget, "limit": args.limit, "sensitivity_prompts": args.sensitivity_prompts,
              "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "vision_budget.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / "vision_budget.md").write_text(markdown(record))
    print(markdown(record))


def markdown(record: dict) -> str:
    lines = ["# A size budget with the vision side against the same bytes on the LLM alone", "",
             __doc__.split("\n\n")[0].replace("\n", " "), "", " ".join(__doc__.split("\n\n")[2].split()), "",
             "SmolLM2-135M-Instruct's weights were stored at Q4_1 upstream: every figure is of that model. Its tower "
             "is generated (3 layers, width 192), so the answer KLD measures how far each pair's image path and "
             "decoder move the answer's distribution from full precision, not how well it sees.", "",
             f"Budget: {record['budget_bytes']:,} bytes (text + mmproj).", "",
             "| spent on | text MB | mmproj MB | total MB | answer KLD | top-1 agreement | text KLD | mmproj types |",
             "|---|---|---|---|---|---|---|---|"]
    for label, r in record["rows"].items():
        lines.append(f"| {label} | {r['text_bytes'] / 1e6:.3f} | {r['mmproj_bytes'] / 1e6:.3f} | "
                     f"{(r['text_bytes'] + r['mmproj_bytes']) / 1e6:.3f} | {r['answer_kld']:.4g} | "
                     f"{r['top1_agreement']:.1%} | {r['text_kld']:.4g} | {r['mmproj_types']} |")
    lines += [""] + [f"{label}: text tensor types {r['text_types']}" for label, r in record["rows"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
