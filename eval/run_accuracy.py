"""Accuracy of imp-tiny on the shapes evaluation split, written to eval/results/imp_tiny.json and .md.

    python eval/run_accuracy.py            # about 3 minutes on 2 cores

PyTorch at the native 168 px and at half of it (84 px: 36 vision tokens, interpolated position embeddings),
and the exported GGUF pair in llama.cpp (F16, and round-to-nearest Q8_0 / Q4_0 as baselines for the
quantization work), each with mean KLD and top-1 agreement against the PyTorch model at native resolution.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from impq.defaults import default_eval_data, default_model_dir
from impq.export.pair import export_pair
from impq.measure.vqa import TorchAnswerer, evaluate, load_answerer, read_vqa_jsonl
from impq.models.layouts import read_spec

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    items = read_vqa_jsonl(default_eval_data())
    model = default_model_dir()
    reference = TorchAnswerer(model)
    native = reference.lmm.spec.vision.image_size
    runs = {}
    for size in (native, native // 2):
        runs[f"pytorch {size}px"] = evaluate(TorchAnswerer(model, size), items, model=str(model), dataset="eval",
                                             reference=reference if size != native else None)
    with tempfile.TemporaryDirectory() as scratch:
        for type_name in ("f16", "q8_0", "q4_0"):
            out = Path(scratch) / type_name
            export_pair(read_spec(model), out, type_name)
            runs[f"llama.cpp {type_name.upper()}"] = evaluate(load_answerer(out), items, model=type_name,
                                                               dataset="eval", reference=reference)
    summary = {name: {k: v for k, v in r.to_dict().items() if k not in ("items", "model", "dataset")}
               for name, r in runs.items()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "imp_tiny.json").write_text(json.dumps({"dataset": str(default_eval_data().relative_to(
        default_eval_data().parents[2])), "runs": summary}, indent=2) + "\n")
    types = list(next(iter(summary.values()))["per_type"])
    lines = ["# imp-tiny on the shapes evaluation split", "",
             f"{len(items)} items, exact match of the one-word answer; KLD and top-1 agreement of the first answer "
             "token against PyTorch at native resolution.", "",
             "| run | accuracy | " + " | ".join(types) + " | mean KLD | top-1 agreement |",
             "|---|---|" + "---|" * len(types) + "---|---|"]
    for name, s in summary.items():
        kld = "" if s["mean_kld"] is None else f"{s['mean_kld']:.4g}"
        top1 = "" if s["top1_agreement"] is None else f"{s['top1_agreement']:.1%}"
        lines.append(f"| {name} | {s['accuracy']:.1%} | " + " | ".join(f"{s['per_type'][t]['accuracy']:.0%}" for t in types)
                     + f" | {kld} | {top1} |")
    (RESULTS / "imp_tiny.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
