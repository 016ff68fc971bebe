"""Parity of exported GGUF pairs with the PyTorch reference, for every supported layout (small random models),
written to bench/results/parity.md and .json.

    python bench/run_parity.py --work /tmp/impq-parity      # under a minute on 2 cores
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from impq.recipe import export_with_recipe
from impq.models.layouts import read_spec
from impq.models.testing import TEST_LAYOUTS, make_model
from impq.verify import verify_pair

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    args = parser.parse_args()
    rows = {}
    for layout in TEST_LAYOUTS:
        folder = make_model(layout, args.work / layout)
        for type_name in ("f16", "q8_0"):
            out = args.work / f"{layout}-{type_name}"
            export_with_recipe(read_spec(folder), out, type_name)
            report = verify_pair(out, folder)
            rows[f"{layout} {type_name}"] = {k: getattr(report, k) for k in (
                "top1_agreement", "max_abs_logit_diff", "max_abs_image_embedding_diff", "mean_kld",
                "generations_matched", "passed")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "parity.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["# GGUF pair vs PyTorch, every layout (small random models, bundled images and prompts)", "",
             "16-token greedy path of the reference, 3 images x 2 prompts. llava-clip: llama.cpp's class-token "
             "ordering bug (ggml-org/llama.cpp#25814).", "",
             "| layout | type | top-1 | max logit diff | max image-embedding diff | mean KLD | greedy matches | passed |",
             "|---|---|---|---|---|---|---|---|"]
    for key, r in rows.items():
        layout, type_name = key.split()
        lines.append(f"| {layout} | {type_name} | {r['top1_agreement']:.3f} | {r['max_abs_logit_diff']:.4f} | "
                     f"{r['max_abs_image_embedding_diff']:.4f} | {r['mean_kld']:.2e} | {r['generations_matched']} | "
                     f"{r['passed']} |")
    (RESULTS / "parity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
