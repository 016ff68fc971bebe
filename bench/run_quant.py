"""Quantization benchmark on imp-tiny: impq's RTN, AWQ, GPTQ and learned rounding (SignRound) against llama.cpp's
own quantizer (plain and with a text-only importance matrix from the same calibration prompts) and against
AutoRound's own GGUF export (`pip install -e .[bench]`; tuned on impq's multimodal calibration sequences, see
autoround_peer.py), on the same GGUF grids and at equal file size (token embedding and output head at Q8_0 in
every file). Written to bench/results/quant.json, .md.

    python bench/run_quant.py --work /tmp/impq-quant --nsamples 64 --limit 200   # ~35 min on 2 cores

Each method runs in its own process (peak RSS is its own). Every artifact is evaluated in llama.cpp on the
shapes evaluation split: accuracy, and mean KLD / top-1 agreement of the first answer token against the
PyTorch model at full precision.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _made(text_gguf, mmproj_gguf, start: float) -> dict:
    """A quantizer job's result: its pair, its time since `start` and this process's peak RSS."""
    return {"text_gguf": str(text_gguf), "mmproj_gguf": str(mmproj_gguf), "quantize_s": time.perf_counter() - start,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _copy_mmproj(mmproj_f16: Path, text_gguf: Path) -> Path:
    """The F16 mmproj beside a text GGUF written by another quantizer, named as its pair."""
    mmproj = text_gguf.with_name(f"mmproj-{text_gguf.name}")
    mmproj.write_bytes(mmproj_f16.read_bytes())
    return mmproj


def _impq(method: str, type_name: str, out: str, nsamples: int) -> dict:
    from impq.defaults import default_calib_data, default_model_dir
    from impq.quantize import quantize_model
    from impq.recipe import Recipe

    settings = Recipe.from_flags(type=type_name, method=method, calib=str(default_calib_data()), nsamples=nsamples)
    start = time.perf_counter()
    report = quantize_model(default_model_dir(), out, settings, verify_items=0)
    return _made(report.artifacts["text_gguf"], report.artifacts["mmproj_gguf"], start)


def _llamacpp(type_name: str, with_imatrix: bool, f16_dir: str, out: str, nsamples: int) -> dict:
    import llama_cpp

    from impq.calib import read_calibration
    from impq.defaults import default_calib_data, default_model_dir
    from impq.models.lmm import LMM
    import llamacpp_baseline  # bench/: llama.cpp's own quantizer
    from impq.runtime.gguf_pair import resolve_pair

    start = time.perf_counter()
    text_f16, mmproj_f16 = resolve_pair(Path(f16_dir))
    imatrix = None
    if with_imatrix:
        lmm = LMM.from_folder(default_model_dir())
        samples = read_calibration(default_calib_data())[:nsamples]
        texts = [f"{s.text} {s.answer or ''}".strip() for s in samples]
        imatrix = llamacpp_baseline.text_imatrix(lmm, texts)
    stem = f"imp-tiny-{type_name.upper()}-llamacpp{'-imatrix' if with_imatrix else ''}"
    target = Path(out) / f"{stem}.gguf"
    Path(out).mkdir(parents=True, exist_ok=True)
    # equal size to impq's files: 8-bit token embedding and output head
    llamacpp_baseline.llamacpp_quantize(text_f16, target, type_name, imatrix,
                                        head_type=llama_cpp.GGML_TYPE_Q8_0)
    return _made(target, _copy_mmproj(mmproj_f16, target), start)


def _autoround(type_name: str, f16_dir: str, out: str, nsamples: int, iters: int) -> dict:
    from autoround_peer import autoround_gguf

    from impq.defaults import default_calib_data, default_model_dir
    from impq.runtime.gguf_pair import resolve_pair

    start = time.perf_counter()
    text_f16, mmproj_f16 = resolve_pair(Path(f16_dir))
    target = autoround_gguf(default_model_dir(), default_calib_data(), type_name, text_f16, Path(out) / type_name,
                            nsamples, iters)
    return _made(target, _copy_mmproj(mmproj_f16, target), start)


def _evaluate(text: str, mmproj: str, limit: int | None) -> dict:
    from impq.defaults import default_eval_data, default_model_dir
    from impq.measure.vqa import GGUFAnswerer, TorchAnswerer, evaluate, read_vqa_jsonl

    items = read_vqa_jsonl(default_eval_data())[:limit]
    with GGUFAnswerer(text, mmproj) as pair:
        report = evaluate(pair, items, model=text, dataset="eval", reference=TorchAnswerer(default_model_dir()))
    return {"accuracy": report.accuracy, "mean_kld": report.mean_kld, "top1_agreement": report.top1_agreement,
            "text_mb": Path(text).stat().st_size / 1e6, "per_type": report.per_type}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--types", default="q4_k,q4_0,q4_1,q3_k,q2_k", help="every GGUF type of 4 bits and below")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--limit", type=int, default=None, help="evaluation items (default: all 700)")
    parser.add_argument("--autoround-iters", type=int, default=200, help="AutoRound's tuning steps per block")
    args = parser.parse_args()
    autoround = importlib.util.find_spec("auto_round") is not None
    from impq.defaults import default_model_dir
    from impq.recipe import export_with_recipe
    from impq.models.layouts import read_spec
    from impq.runtime.gguf_pair import resolve_pair

    f16_dir = args.work / "f16"
    export_with_recipe(read_spec(default_model_dir()), f16_dir, "f16")
    context = get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        f16 = pool.submit(_evaluate, *map(str, resolve_pair(f16_dir)), args.limit).result()
    rows, done = {}, []
    for type_name in args.types.split(","):
        jobs = {f"llama.cpp {type_name}": (_llamacpp, (type_name, False, str(f16_dir), str(args.work / "llamacpp"), args.nsamples)),
                f"llama.cpp {type_name} + imatrix": (_llamacpp, (type_name, True, str(f16_dir), str(args.work / "llamacpp"), args.nsamples))}
        if autoround:
            jobs[f"AutoRound {type_name}"] = (_autoround, (type_name, str(f16_dir), str(args.work / "autoround"),
                                                           args.nsamples, args.autoround_iters))
        for method in ("rtn", "awq", "gptq", "signround"):
            jobs[f"impq {method} {type_name}"] = (_impq, (method, type_name, str(args.work / method), args.nsamples))
        for label, (fn, fn_args) in jobs.items():
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                made = pool.submit(fn, *fn_args).result()
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                quality = pool.submit(_evaluate, made["text_gguf"], made["mmproj_gguf"], args.limit).result()
            rows[label] = {**made, **quality}
            print(label, json.dumps({k: rows[label][k] for k in ("accuracy", "mean_kld", "top1_agreement",
                                                                   "text_mb", "quantize_s")}), flush=True)
        done.append(type_name)
        _write_results(args, autoround, f16, rows, done)     # after every type: a stopped run keeps what it measured


def _write_results(args, autoround: bool, f16: dict, rows: dict, types: list[str]) -> None:
    RESULTS.mkdir(exist_ok=True)
    versions = {}
    for name in ("llama-cpp-python", "auto-round"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    record = {"model": "imp-tiny", "nsamples": args.nsamples, "autoround_iters": args.autoround_iters,
              "versions": versions, "f16": f16, "rows": rows}
    (RESULTS / "quant.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["# Quantization of imp-tiny's LLM: impq vs llama.cpp on the same grids", "",
             f"Calibration: {args.nsamples} sequences of the shapes calibration split (images + text for impq; "
             "the same prompts' text only for llama.cpp's importance matrix). Evaluation: shapes eval split in "
             "llama.cpp; KLD and top-1 of the first answer token against the PyTorch model at full precision. "
             "Token embedding and output head are Q8_0 in every file; the mmproj is F16. "
             + (f"AutoRound {versions['auto-round']}: {args.autoround_iters} steps per block on impq's multimodal "
                "calibration sequences (cut to the shortest), its own GGUF export, tensors copied bit for bit under "
                "impq's metadata." if autoround else "AutoRound: not installed (`pip install -e .[bench]`)."), "",
             f"Versions: {json.dumps(versions)}. Times and RSS are per process on this machine.", "",
             f"F16 pair: accuracy {f16['accuracy']:.1%}, mean KLD {f16['mean_kld']:.2e}, text {f16['text_mb']:.2f} MB", "",
             "| method | text MB | accuracy | mean KLD | top-1 agreement | quantize s | peak RSS MB |",
             "|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['text_mb']:.2f} | {r['accuracy']:.1%} | {r['mean_kld']:.2e} | "
                     f"{r['top1_agreement']:.1%} | {r['quantize_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    lines += ["", "The bar: impq's best method below llama.cpp with an importance matrix, same type and size.", "",
              "| type | impq best | its KLD | llama.cpp + imatrix KLD | ratio | bar |", "|---|---|---|---|---|---|"]
    for type_name in types:
        impq_rows = {label: r for label, r in rows.items() if label.startswith("impq ") and label.endswith(f" {type_name}")}
        best = min(impq_rows, key=lambda label: impq_rows[label]["mean_kld"])
        ours, theirs = impq_rows[best]["mean_kld"], rows[f"llama.cpp {type_name} + imatrix"]["mean_kld"]
        lines.append(f"| {type_name.upper()} | {best.split()[1]} | {ours:.2e} | {theirs:.2e} | {ours / theirs:.2f} | "
                     f"{'met' if ours < theirs else 'missed'} |")
    if autoround:
        lines += ["", "The goal: impq's best method at AutoRound's KLD or lower, in less time.", "",
                  "| type | AutoRound KLD | AutoRound s | impq methods at or below it (KLD, s) | goal |",
                  "|---|---|---|---|---|"]
        for type_name in types:
            peer = rows[f"AutoRound {type_name}"]
            reach = {label.split()[1]: r for label, r in rows.items() if label.startswith("impq ")
                     and label.endswith(f" {type_name}") and r["mean_kld"] <= peer["mean_kld"]}
            cells = ", ".join(f"{m} ({r['mean_kld']:.2e}, {r['quantize_s']:.0f} s)" for m, r in reach.items())
            met = any(r["quantize_s"] < peer["quantize_s"] for r in reach.values())
            lines.append(f"| {type_name.upper()} | {peer['mean_kld']:.2e} | {peer['quantize_s']:.0f} | "
                         f"{cells or 'none'} | {'met' if met else 'missed'} |")
    (RESULTS / "quant.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
