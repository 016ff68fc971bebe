"""llama.cpp's own quantizer, the baseline impq is measured against: `llama_model_quantize` on an F16 GGUF,
optionally with an importance matrix. llama.cpp's imatrix tool calibrates on text alone; so does this one:
it is the mean square of each linear layer's inputs over the calibration samples' text, without images."""

from __future__ import annotations

import ctypes
import os
import subprocess
import time
from collections import Counter
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import torch
from torch import nn

from impq.errors import ImpqError
from impq.export.gguf_text import text_tensors
from impq.export.gguf_file import QType
from impq.fileio import atomic_output
from impq.models.lmm import LMM

# impq grid name -> the llama.cpp file type whose default tensor type it is (used with `pure`: every
# quantizable tensor of that type, so that files compare at equal size)
FTYPES = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q6_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
          "q5_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_S, "q5_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_0,
          "q5_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_1, "q4_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_S,
          "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1,
          "q3_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_S, "q2_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K}


@torch.no_grad()
def text_imatrix(lmm: LMM, texts: list[str], seqlen: int = 512) -> dict[str, np.ndarray]:
    """GGUF tensor name -> mean square of that layer's inputs per column, over text-only sequences."""
    names = {t.canonical: t.name for t in text_tensors(lmm.spec, QType.F16)}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for module_name, module in lmm.llm.named_modules():
        if not isinstance(module, nn.Linear) or f"llm.{module_name}.weight" not in names:
            continue
        key = names[f"llm.{module_name}.weight"]

        def hook(mod, args, output, key=key):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[key] = sums.get(key, 0) + (x * x).sum(0)
            counts[key] = counts.get(key, 0) + x.shape[0]
        handles.append(module.register_forward_hook(hook))
    try:
        for text in texts:
            ids = lmm.tokenizer.encode(text)[:seqlen]
            if ids:
                lmm.llm(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {key: (sums[key] / counts[key]).float().numpy() for key in sums}


def llamacpp_quantize(source: Path, target: Path, ftype: str, imatrix: dict[str, np.ndarray] | None = None,
                      n_threads: int = 0, head_type: int | None = None) -> Path:
    """`head_type`: a ggml type for the token embedding and output head (llama.cpp picks its own otherwise)."""
    if ftype not in FTYPES:
        raise ImpqError(None, f"unknown llama.cpp type {ftype!r}; choose one of {', '.join(FTYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.pure = True
    params.nthread = n_threads
    if head_type is not None:
        params.output_tensor_type = params.token_embedding_type = head_type
    keep = []
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for entry, (name, values) in zip(entries, imatrix.items()):
            data = np.ascontiguousarray(values, dtype=np.float32)
            keep.append((name.encode(), data))
            entry.name = keep[-1][0]
            entry.data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = data.size
        params.imatrix = entries             # the last entry stays zeroed: the list's terminator
        keep.append(entries)
    with atomic_output(target) as tmp:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if status != 0:
            raise ImpqError(source, f"llama.cpp's quantizer failed (status {status})")
    return target


def llamacpp_quantize_mmproj(bin_dir: Path, f16: Path, out: Path, type_name: str) -> dict:
    """llama.cpp's `llama-quantize` tool on an F16 mmproj (its library call takes text models only)."""
    start = time.perf_counter()
    done = subprocess.run([str(bin_dir / "llama-quantize"), str(f16), str(out), type_name.upper()],
                          capture_output=True, text=True, env={**os.environ, "LD_LIBRARY_PATH": str(bin_dir)})
    if done.returncode != 0:
        raise SystemExit(f"bench: llama-quantize {type_name}: {done.stderr[-2000:]}")
    return {"quantize_s": time.perf_counter() - start}


def matrix_types(path: Path) -> dict:
    """How many of a GGUF's matrices (an mmproj's patch convolution aside) each tensor type holds."""
    return dict(Counter(gguf.GGMLQuantizationType(t.tensor_type).name for t in gguf.GGUFReader(path).tensors
                        if len(t.shape) == 2 and t.name != "v.patch_embd.weight"))
