"""What each vision precision costs: imp-tiny's mmproj at F16, Q8_0, Q6_K, Q5_K, Q4_K and Q4_0, quantized by impq's
RTN, GPTQ and learned rounding on the calibration images (block by block, the projector last), beside llama.cpp's
`llama-quantize` on the same F16 mmproj at the same types (round-to-nearest, no importance matrix), each paired
with the same F16 text GGUF so that only the tower differs. Written to bench/results/vision_quant.{json,md}.

    python bench/run_vision_quant.py --work /tmp/impq-vision      # needs IMPQ_LLAMA_CPP_BIN for llama-quantize

Per mmproj: accuracy and answer-token KLD against the full-precision PyTorch model on the first --limit items of
the shapes eval split (llama.cpp through llama-cpp-python), the mmproj's bytes, its image-encode time (impq bench,
median of --runs), and what the width fallbacks left at another type or at 16 bits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path


from llamacpp_baseline import llamacpp_quantize_mmproj, matrix_types

from impq.calib import read_calibration
from impq.defaults import default_calib_data, default_eval_data, default_model_dir
from impq.export.gguf_file import QType
from impq.export.gguf_mmproj import write_model_mmproj
from impq.measure.bench import bench_pair
from impq.measure.vqa import GGUFAnswerer, TorchAnswerer, evaluate, read_vqa_jsonl
from impq.models.layouts import read_spec
from impq.models.lmm import LMM
from impq.quant.grids import GRIDS
from impq.quant.plan import plan_vision
from impq.quantize import quantize_vision_side
from impq.recipe import Method, export_with_recipe
from impq.verify import default_images

RESULTS = Path(__file__).resolve().parent / "results"
TYPES = ("q8_0", "q6_k", "q5_k", "q4_k", "q4_0")
METHODS = ("rtn", "gptq", "signround")


class StoredReference:
    """The full-precision model's answer logits, computed once per item and reused by every mmproj."""

    def __init__(self, model_dir: Path):
        self.torch = TorchAnswerer(model_dir)
        self.seen: dict[str, tuple] = {}

    def answer(self, image, question, max_new_tokens):
        key = hashlib.sha256(image.tobytes() + question.encode()).hexdigest()
        if key not in self.seen:
            self.seen[key] = self.torch.answer(image, question, 1)
        return self.seen[key]


def impq_mmproj(model_dir: Path, out: Path, type_name: str, method: str, nsamples: int) -> dict:
    spec = read_spec(model_dir)
    lmm = LMM(spec)
    start = time.perf_counter()
    result = quantize_vision_side(lmm, read_calibration(default_calib_data(model_dir)), type_name,
                                  Method(name=method), nsamples)
    seconds = time.perf_counter() - start
    write_model_mmproj(lmm, out, QType[type_name.upper()], spec.digest(), {"vision": type_name, "method": method},
                       result.tensors)
    plan = plan_vision(lmm.vision_linears(), GRIDS[type_name])
    return {"quantize_s": seconds, "fallbacks": sorted({e.fallback for e in plan.values() if e.fallback})}


def measure(text: Path, mmproj: Path, items, reference, runs: int) -> dict:
    with GGUFAnswerer(text, mmproj, n_threads=2) as answerer:
        report = evaluate(answerer, items, model=mmproj.name, dataset="shapes eval", reference=reference)
    figures = bench_pair(text, mmproj, default_images()[0], runs=runs, warmup=1, decode_tokens=4, n_threads=2)
    return {"accuracy": report.accuracy, "answer_kld": report.mean_kld, "top1_agreement": report.top1_agreement,
            "mmproj_bytes": mmproj.stat().st_size, "image_encode_s": figures["image_encode_s"]["median"],
            "tensor_types": matrix_types(mmproj)}


def write_results(record: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "vision_quant.json").write_text(json.dumps(record, indent=2) + "\n")
    rows = record["rows"]
    f16 = rows.get("f16")
    lines = ["# The vision tower's precision: impq's calibrated mmproj against llama.cpp's llama-quantize",
             "", __doc__.split("\n\n")[0].replace("\n", " "), "",
             f"Model: imp-tiny (SigLIP-style tower, width 192: every K-quant falls back at it). Evaluation: the "
             f"first {record['limit']} items of the shapes eval split; KLD at the answer token against the "
             f"full-precision PyTorch model. Calibration: {record['nsamples']} images of the shapes calibration "
             f"split. Image encode: impq bench, 2 threads, median of {record['runs']} runs. Machine: "
             f"{record['machine']}. Versions: {json.dumps(record['versions'])}.", "",
             *([record["note"], ""] if record.get("note") else []),
             "| mmproj | type | by | accuracy | answer KLD | top-1 agreement | MB | image encode ms | quantize s | "
             "tensors |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['type'].upper()} | {r['by']} | {r['accuracy']:.1%} | {r['answer_kld']:.3g} | "
                     f"{r['top1_agreement']:.1%} | {r['mmproj_bytes'] / 1e6:.3f} | {1000 * r['image_encode_s']:.2f} | "
                     f"{r.get('quantize_s', 0):.1f} | {r['tensor_types']} |")
    lines += ["", "Width fallbacks (impq; llama-quantize applies the same rules in `src/llama-quant.cpp`):", ""]
    for fallback in sorted({f for r in rows.values() for f in r.get("fallbacks", [])}):
        lines.append(f"- {fallback}")
    lines += ["", "The bar: a calibrated 4-bit tower within 0.5 accuracy points of F16 and below llama.cpp's KLD at "
              "the same type and size.", ""]
    for type_name in ("q4_k", "q4_0"):
        theirs = rows.get(f"llama.cpp {type_name}")
        ours = [(label, r) for label, r in rows.items() if r["type"] == type_name and r["by"] != "llama.cpp"]
        if theirs is None or not ours or f16 is None:
            continue
        label, best = min(ours, key=lambda lr: lr[1]["answer_kld"])
        within = f16["accuracy"] - best["accuracy"] <= 0.005
        below = best["answer_kld"] < theirs["answer_kld"] and best["mmproj_bytes"] <= theirs["mmproj_bytes"]
        lines.append(f"- {type_name.upper()}: best {label} (accuracy {best['accuracy']:.1%}, KLD "
                     f"{best['answer_kld']:.3g}, {best['mmproj_bytes']} bytes) against llama.cpp's KLD "
                     f"{theirs['answer_kld']:.3g} ({theirs['mmproj_bytes']} bytes), F16 accuracy "
                     f"{f16['accuracy']:.1%}: {'met' if within and below else 'missed'}")
    (RESULTS / "vision_quant.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--llama-cpp-bin", type=Path, default=os.environ.get("IMPQ_LLAMA_CPP_BIN"))
    parser.add_argument("--note", help="a line for the results file (what else ran beside the measurement)")
    args = parser.parse_args()
    if args.llama_cpp_bin is None or not (args.llama_cpp_bin / "llama-quantize").is_file():
        sys.exit("bench: give --llama-cpp-bin (or IMPQ_LLAMA_CPP_BIN): llama.cpp's built tools")
    import importlib.metadata
    import platform

    model_dir = default_model_dir()
    spec = read_spec(model_dir)
    args.work.mkdir(parents=True, exist_ok=True)
    pair = export_with_recipe(spec, args.work / "f16", "f16")
    items = read_vqa_jsonl(default_eval_data())[:args.limit]
    reference = StoredReference(model_dir)
    cache = args.work / "vision_quant.json"
    record = json.loads(cache.read_text()) if cache.is_file() else {"rows": {}}
    if args.note is not None:
        record["note"] = args.note
    record.update(limit=args.limit, nsamples=args.nsamples, runs=args.runs,
                  machine=f"{os.cpu_count()} CPUs, {platform.platform()}",
                  versions={p: importlib.metadata.version(p) for p in ("impq", "torch", "gguf", "llama-cpp-python")})

    def row(label: str, type_name: str, by: str, mmproj: Path, make) -> None:
        """`make()` writes `mmproj` and says how; a row already measured is kept."""
        if label in record["rows"]:
            return
        made = make()
        record["rows"][label] = {"type": type_name, "by": by, **made,
                                 **measure(pair.text_path, mmproj, items, reference, args.runs)}
        print(label, json.dumps({k: record["rows"][label][k] for k in ("accuracy", "answer_kld", "mmproj_bytes")}),
              flush=True)
        cache.write_text(json.dumps(record, indent=2))
        write_results(record)

    row("f16", "f16", "export", pair.mmproj_path, lambda: {})
    for type_name in TYPES:
        out = args.work / f"mmproj-llamacpp-{type_name}.gguf"
        row(f"llama.cpp {type_name}", type_name, "llama.cpp", out,
            lambda: llamacpp_quantize_mmproj(args.llama_cpp_bin, pair.mmproj_path, out, type_name))
        for method in METHODS:
            out = args.work / f"mmproj-impq-{method}-{type_name}.gguf"
            row(f"impq {method} {type_name}", type_name, f"impq {method}", out,
                lambda: impq_mmproj(model_dir, out, type_name, method, args.nsamples))
    write_results(record)
    print((RESULTS / "vision_quant.md").read_text())


if __name__ == "__main__":
    main()
