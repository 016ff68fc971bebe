"""A fast proxy of the real-LM benchmark: quantize SmolLM2-135M-Instruct (weights stored at Q4_1 upstream; the
checkpoint and texts of bench/run_quant_real_lm.py) in memory with `quantize_llm`, then the mean KLD and same top-1
of the next-token distributions against the full-precision model in PyTorch, on the second half of each of the
first 8 windows of 512 evaluation tokens. No GGUF, no llama.cpp; only the layer loop is timed.

    python bench/quant_proxy_real_lm.py METHOD TYPE DTYPE [JSON signround options, "nsamples", "text"]

"text": the benchmark text's kind (bench/real_lm.py: docstrings, the default; manual; code).

Prints one JSON line and appends it to bench/results/quant_proxy_real_lm.jsonl.
"""
import json
import os
import sys
import time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_mix import prepare
from impq.models.layouts import read_spec
from impq.models.lmm import LMM
from impq.calib import read_calibration, calibration_embeddings
from impq.quant.driver import quantize_llm
from impq.quant.plan import plan_llm
from impq.quant.grids import GRIDS
torch.manual_seed(0)
method, type_name, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
opts = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
nsamples = opts.pop("nsamples", 64)
text = opts.pop("text", "docstrings")
work = Path(os.environ.get("IMPQ_REAL_WORK", "/tmp/impq-real"))   # run_quant_real_lm.py --work
prep = prepare("smollm2", work, 64, 0, eval_bytes=120_000, text=text)
spec = read_spec(prep["folder"])
fp = LMM(spec); q = LMM(spec)
tok = spec.tokenizer
ids = torch.tensor(tok.encode(Path(prep["eval_text"]).read_text()))
chunks = [ids[i * 512:(i + 1) * 512][None] for i in range(8)]
with torch.no_grad():
    ref = [torch.log_softmax(fp.llm(c).logits[0, 256:].float(), -1) for c in chunks]
samples = read_calibration(prep["calib"])
emb = calibration_embeddings(q, samples, nsamples, 512, 0)
plan = plan_llm(q.llm, GRIDS[type_name], [], {})
t = time.perf_counter()
result = quantize_llm(q, emb, plan, method, signround_options=opts or None, compute_dtype=getattr(torch, dtype))
secs = time.perf_counter() - t
with torch.no_grad():
    kld, top = 0.0, 0.0
    for c, r in zip(chunks, ref):
        l = torch.log_softmax(q.llm(c).logits[0, 256:].float(), -1)
        kld += (r.exp() * (r - l)).sum(-1).mean().item() / 8
        top += (r.argmax(-1) == l.argmax(-1)).float().mean().item() / 8
kept = [block["kept"] for block in result.blocks.values()]
line = json.dumps({"method": method, "type": type_name, "dtype": dtype, "opts": opts, "nsamples": nsamples,
                   "text": text, **({"kept": {k: kept.count(k) for k in sorted(set(kept))}} if kept else {}),
                  "kld": round(kld, 4), "top1": round(top, 4), "quantize_s": round(secs, 1),
                   "measured": time.strftime("%Y-%m-%d")})
print(line, flush=True)
with open(Path(__file__).resolve().parent / "results" / "quant_proxy_real_lm.jsonl", "a") as results:
    results.write(line + "\n")
