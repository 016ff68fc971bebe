"""Benchmark: the layer loop's time per decoder block at the real Imp-3B dimensions, in minutes instead of the
hour `quantize_full_size.py` takes: a generated imp-v1-3b (Phi-2 2.7B + SigLIP so400m dimensions, random weights)
cut to its first 2 decoder blocks, calibrated as `impq quantize` does by default (8 sequences of the shapes split
at 384 px, up to 1024 tokens), streamed from the checkpoint, quantized with GPTQ onto Q4_K by the library's
`quantize_llm`. A full run's layer loop is about 32 times one block.

    python bench/full_size_block_time.py --work /tmp/impq-blocks [--type q4_k] [--method gptq]

It times whichever impq Python imports (PYTHONPATH=an older checkout measures that one on the same machine), and
appends a row, with that checkout's commit, to bench/results/full_size_block_time.json (and .md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BLOCKS = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder for the 2-block checkpoint")
    parser.add_argument("--type", default="q4_k")
    parser.add_argument("--method", default="gptq")
    args = parser.parse_args()
    import impq
    from impq.calib import calibration_embeddings, read_calibration
    from impq.defaults import default_calib_data
    from impq.models.layouts import read_spec
    from impq.models.lmm import LMM
    from impq.models.testing import IMP_V1_3B, make_model
    from impq.quant.driver import quantize_llm
    from impq.quant.grids import GRIDS
    from impq.quant.plan import plan_llm

    folder = args.work / f"imp-v1-3b-{BLOCKS}-blocks"
    if not (folder / "config.json").is_file():
        make_model("imp-phi2", folder, dims=dataclasses.replace(IMP_V1_3B, layers=BLOCKS))
    lmm = LMM(read_spec(folder), stream_decoder=True)
    embeddings = calibration_embeddings(lmm, read_calibration(default_calib_data()), 8, 1024)
    seconds, mark = [], [time.perf_counter()]

    def on_layer(index: int, total: int) -> None:
        now = time.perf_counter()
        seconds.append(round(now - mark[0], 1))
        mark[0] = now

    quantize_llm(lmm, embeddings, plan_llm(lmm.llm, GRIDS[args.type]), args.method, release_weights=True,
                 on_layer=on_layer)
    source = Path(impq.__file__).resolve().parent.parent
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                            cwd=source).stdout.strip()
    row = {"impq_commit": commit, "method": args.method, "type": args.type,
           "tokens": sum(e.shape[1] for e in embeddings), "block_seconds": seconds,
           "measured": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count()}
    path = RESULTS / "full_size_block_time.json"
    rows = json.loads(path.read_text()) if path.is_file() else []
    rows.append(row)
    path.write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["# The layer loop per decoder block at the Imp-3B dimensions (random weights)", "",
             f"`python bench/full_size_block_time.py`: the first {BLOCKS} decoder blocks of a generated imp-v1-3b, "
             "streamed, quantized by `quantize_llm` at `impq quantize`'s default calibration (8 sequences of the "
             "shapes split, up to 1024 tokens). A full run's layer loop is about 32 blocks. Compare rows of one day.",
             "", "| impq commit | method:type | calibration tokens | seconds per block | measured | CPUs |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['impq_commit']} | {r['method']}:{r['type']} | {r['tokens']} | "
              f"{', '.join(str(s) for s in r['block_seconds'])} | {r['measured']} | {r['cpus']} |" for r in rows]
    (RESULTS / "full_size_block_time.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
