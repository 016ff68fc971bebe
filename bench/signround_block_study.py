"""Study: which learned-rounding settings lower a decoder block's output error on the real LM (SmolLM2-135M-Instruct,
stored at Q4_1 upstream, in bench/real_lm.py's LLaVA checkpoint; the real-LM benchmark's 64 x 512-token calibration).

For each of the first blocks, every variant starts from the same GPTQ rounding and the same inputs (the quantized
stream) and targets (the full-precision stream), and its error is the block's summed output MSE on all 64 sequences.
Variants: iterations x sequences per step, and "best": keep the parameters of the step with the lowest batch loss, as
AutoRound does, instead of the last step's. The quantization goes on with the first variant's rounding.

    python bench/signround_block_study.py [BLOCKS] [TYPE]      # -> bench/results/signround_blocks.md (per block)

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
from impq.models.lmm import LMM  # noqa: E402
from impq.quant import driver, signround  # noqa: E402
from impq.quant.grids import GRIDS  # noqa: E402
from impq.quant.plan import plan_llm  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "signround_blocks.md"
VARIANTS = [(200, 4, False), (100, 4, False), (100, 4, True), (50, 8, True)]     # (iterations, batch, best)


def write(rows: list[dict], type_name: str) -> None:
    names = list(rows[0])
    lines = [f"# Learned rounding settings, block by block: SmolLM2-135M-Instruct (stored at Q4_1 upstream) at "
             f"{type_name.upper()}", "", __doc__.split("\n\n")[1].replace("\n", " "), "",
             "Each cell: summed output MSE on the 64 calibration sequences (seconds of that variant's training and "
             "final comparison). Where a variant's rounding is worse than GPTQ's, signround keeps GPTQ's: the cell "
             "then equals the gptq one.", "",
             "| block | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for index, row in enumerate(rows):
        lines.append(f"| {index} | " + " | ".join(f"{v[0]:.4f} ({v[1]} s)" if isinstance(v, (list, tuple))
                                                   else f"{v:.4f}" for v in row.values()) + " |")
    RESULTS.write_text("\n".join(lines) + "\n")


def main() -> None:
    blocks = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    type_name = sys.argv[2] if len(sys.argv) > 2 else "q4_0"
    prepared = prepare("smollm2", Path("/tmp/impq-real"), 64, 0, eval_bytes=120_000)
    lmm = LMM.from_folder(prepared["folder"])
    embeds = calibration_embeddings(lmm, read_calibration(prepared["calib"]), 64, 512)
    lmm.llm.model.layers = lmm.llm.model.layers[:blocks]
    learn = signround.signround_block
    rows: list[dict] = []

    def study(layer, inputs, targets, start, grids, **options):
        plain = {n: (grids[n].codes(w, p), p) for n, (w, p) in start.items()}
        with torch.no_grad():
            row = {"gptq": signround._block_error(layer, inputs, targets, plain, grids)}
        kept = None
        for iterations, batch, best in VARIANTS:
            begin = time.perf_counter()
            rounding = learn(layer, inputs, targets, start, grids, iterations=iterations, batch=batch, keep_best=best)
            with torch.no_grad():
                row[f"{iterations}x{batch}{' best' if best else ''}"] = (
                    signround._block_error(layer, inputs, targets, rounding, grids), round(time.perf_counter() - begin))
            kept = kept or rounding
        rows.append(row)
        print(len(rows) - 1, json.dumps(row), flush=True)
        write(rows, type_name)
        return kept

    driver.signround_block = study
    driver.quantize_llm(lmm, embeds, plan_llm(lmm.llm, GRIDS[type_name]), "signround")


if __name__ == "__main__":
    main()
