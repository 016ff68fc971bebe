"""Study: which learned-rounding settings lower a decoder block's output error on the real LM (SmolLM2-135M-Instruct,
stored at Q4_1 upstream, in bench/real_lm.py's LLaVA checkpoint; the real-LM benchmark's 64 x 512-token calibration).

For each studied block, every variant starts from the driver's start (the original weights with their plain fit)
with GPTQ's rounding as the rival, on the same inputs (the quantized stream) and targets (the full-precision
stream), and its error is the block's summed output MSE on all 64 sequences.
Variants: iterations x sequences per step; "bf16": the training steps' forward and backward under bfloat16 autocast,
as AutoRound runs on a CPU with bfloat16 support. With a GGUF file of the same model (AUTOROUND), its block's weights
are scored on the same inputs too, and so are GPTQ's rounding and the start's. The quantization goes on with the
first variant's rounding; blocks before FIRST keep GPTQ's rounding unstudied (no variant has improved on it in
block 0). Each run replaces the table; the "Earlier runs" section of the results file is kept.

    python bench/signround_block_study.py [BLOCKS] [TYPE] [FIRST] [AUTOROUND]   # -> bench/results/signround_blocks.md

Bench-only: it stands in for the driver's call of impq.quant.signround.signround_block to try every variant.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_mix import prepare  # noqa: E402

from impq.calib import calibration_embeddings, read_calibration  # noqa: E402
from impq.export.gguf_text import read_text_gguf_weights  # noqa: E402
from impq.models.lmm import LMM  # noqa: E402
from impq.quant import driver, signround  # noqa: E402
from impq.quant.grids import GRIDS  # noqa: E402
from impq.quant.plan import plan_llm  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "signround_blocks.md"
# label -> signround_block's options
VARIANTS = {"200x4": dict(iterations=200, batch=4),
            "200x4 bf16": dict(iterations=200, batch=4, precision=torch.bfloat16),
            "400x4 bf16": dict(iterations=400, batch=4, precision=torch.bfloat16)}
EARLIER = "## Earlier runs"


def write(rows: list[dict], type_name: str) -> None:
    studied = [(index, row) for index, row in enumerate(rows) if row]
    names = list(studied[0][1])
    lines = [f"# Learned rounding settings, block by block: SmolLM2-135M-Instruct (stored at Q4_1 upstream) at "
             f"{type_name.upper()}", "", __doc__.split("\n\n")[1].replace("\n", " "), "",
             "Each cell: summed output MSE on the 64 calibration sequences (seconds of that variant's training and "
             "final comparison). Where a variant's rounding is worse than GPTQ's, signround keeps GPTQ's: the cell "
             "then equals the gptq one.", "",
             "| block | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for index, row in studied:
        lines.append(f"| {index} | " + " | ".join(f"{v[0]:.4f} ({v[1]} s)" if isinstance(v, (list, tuple))
                                                   else f"{v:.4f}" for v in row.values()) + " |")
    earlier = RESULTS.read_text().partition(EARLIER)[2] if RESULTS.is_file() else ""
    RESULTS.write_text("\n".join(lines) + "\n" + (f"\n{EARLIER}{earlier}" if earlier else ""))


def main() -> None:
    blocks = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    type_name = sys.argv[2] if len(sys.argv) > 2 else "q4_0"
    first = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    other = Path(sys.argv[4]) if len(sys.argv) > 4 else None
    prepared = prepare("smollm2", Path("/tmp/impq-real"), 64, 0, eval_bytes=120_000)
    lmm = LMM.from_folder(prepared["folder"])
    other_weights = read_text_gguf_weights(lmm.spec, other) if other else {}
    embeds = calibration_embeddings(lmm, read_calibration(prepared["calib"]), 64, 512)
    lmm.llm.model.layers = lmm.llm.model.layers[:blocks]
    learn = signround.signround_block
    rows: list[dict] = []

    def study(layer, inputs, targets, start, grids, **options):
        gptq = options["rivals"]["gptq"]
        if len(rows) < first:
            rows.append({})
            outputs = signround.score_rounding(layer, inputs, targets, gptq, grids).outputs
            return signround.BlockChoice(gptq, outputs, "gptq", {}, 0)
        index = len(rows)
        plain = {n: (grids[n].codes(w, p), p) for n, (w, p) in start.items()}
        with torch.no_grad():
            row = {"gptq": signround.score_rounding(layer, inputs, targets, gptq, grids).error,
                   "start": signround.score_rounding(layer, inputs, targets, plain, grids).error}
            if other_weights:
                weights = {f"{n}.weight": other_weights[f"llm.model.layers.{index}.{n}.weight"] for n in start}
                row[other.stem] = signround.score_weights(layer, inputs, targets, weights)[0]
        kept = None
        for label, variant in VARIANTS.items():
            begin = time.perf_counter()
            scored = learn(layer, inputs, targets, start, grids, **options, **variant)
            seconds = round(time.perf_counter() - begin)
            with torch.no_grad():            # every variant's kept rounding, scored on all calibration inputs
                row[label] = (signround.score_rounding(layer, inputs, targets, scored.rounding, grids).error, seconds)
            kept = kept or scored
        rows.append(row)
        print(len(rows) - 1, json.dumps(row), flush=True)
        write(rows, type_name)
        return kept

    driver.signround_block = study
    driver.quantize_llm(lmm, embeds, plan_llm(lmm.llm, GRIDS[type_name]), "signround")


if __name__ == "__main__":
    main()
