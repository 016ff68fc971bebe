"""The sweep's tasks (sweep/graph.py): each a module-level function that writes one file atomically, given
picklable arguments and the thread budget of where it runs (`threads`; None: the process's own)."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..export.gguf_file import QType
from ..export.gguf_mmproj import write_mmproj_at, write_model_mmproj, write_mmproj_gguf
from ..export.gguf_text import read_text_gguf_weights, write_text_gguf
from ..fileio import atomic_output
from ..measure.vqa import evaluate, read_vqa_jsonl
from ..models.layouts import read_spec
from ..models.preprocess import load_image
from ..models.reduction import VisionReduction
from ..recipe import NO_METHOD


def write_text(model_dir: str, recipe, document: dict, output: str, threads: int | None) -> None:
    """A weight type's text GGUF: the export of an F16 recipe, or impq quantize's (no verification: the sweep
    measures every point itself)."""
    from ..quantize import quantize_model

    spec = read_spec(model_dir)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    if recipe.method.name == NO_METHOD:
        write_text_gguf(spec, Path(output), QType.F16, spec.digest(), document)
        return
    with tempfile.TemporaryDirectory(dir=Path(output).parent, prefix=".quantize-") as scratch:
        report = quantize_model(model_dir, scratch, recipe, verify_items=0)
        shutil.move(report.artifacts["text_gguf"], output)


def write_mmproj(model_dir: str, reduction: VisionReduction, document: dict, output: str,
                 threads: int | None) -> None:
    spec = read_spec(model_dir)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    write_mmproj_gguf(spec, Path(output), QType.F16, spec.digest(), {**document, "vision_reduction": reduction.label},
                      reduction=reduction)


def write_calibrated_mmproj(model_dir: str, reduction: VisionReduction, vision_type: str, recipe, document: dict,
                            output: str, threads: int | None) -> None:
    """A vision type's mmproj at one reduction: the tower and projector quantized with the recipe's method and
    calibration on its images (quantize.quantize_vision_side), written with the reduction's geometry."""
    from ..calib import read_calibration
    from ..models.lmm import LMM
    from ..quantize import quantize_vision_side
    from ..recipe import calibration_path

    spec = read_spec(model_dir)
    lmm = LMM(spec)
    samples = read_calibration(calibration_path(recipe, Path(model_dir)))
    result = quantize_vision_side(lmm, samples, vision_type, recipe.method, recipe.calibration.nsamples, recipe.seed)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    write_model_mmproj(lmm, Path(output), QType[vision_type.upper()], spec.digest(),
                       {**document, "vision_reduction": reduction.label, "vision_type": vision_type}, result.tensors,
                       reduction=reduction)


def write_mmproj_from(model_dir: str, source: str, vision_type: str, reduction: VisionReduction, document: dict,
                      output: str, threads: int | None) -> None:
    """A calibrated tower's mmproj at another reduction, its bytes copied from the native one (`source`)."""
    spec = read_spec(model_dir)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    write_mmproj_at(spec, Path(source), Path(output), QType[vision_type.upper()], reduction, spec.digest(),
                    {**document, "vision_reduction": reduction.label, "vision_type": vision_type})


def _items(data: str, limit: int | None, start: int = 0, stop: int | None = None):
    return read_vqa_jsonl(Path(data))[:limit][start:stop]


def _image_key(image, question: str) -> str:
    return hashlib.sha256(image.tobytes() + question.encode()).hexdigest()


def reference_logits(model_dir: str, data: str, limit: int | None, output: str, threads: int | None) -> None:
    """The full-precision model's next-token logits at the native resolution for every item: what each point's
    KLD and top-1 agreement compare against."""
    from ..measure.vqa import TorchAnswerer

    answerer = TorchAnswerer(model_dir)
    items = _items(data, limit)
    logits = np.stack([answerer.answer(load_image(item.image), item.question, 1)[1] for item in items])
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(Path(output)) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, logits)


class StoredReference:
    """The reference's answers to items [start, stop), read back from reference_logits' file, found by image and
    question (only the shard's own images are read)."""

    def __init__(self, path: str, data: str, limit: int | None, start: int, stop: int):
        logits = np.load(path)[start:stop]
        self.by_item = {_image_key(load_image(item.image), item.question): row
                        for item, row in zip(_items(data, limit, start, stop), logits)}

    def answer(self, image, question, max_new_tokens):
        return "", self.by_item[_image_key(image, question)]


def evaluate_shard(model_dir: str, text: str, mmproj: str, runtime: str, reduction: VisionReduction, label: str,
                   data: str, limit: int | None, start: int, stop: int, reference: str, llama_threads: int | None,
                   gpu_layers: int, output: str, threads: int | None) -> None:
    """Items [start, stop) of a (type, reduction) answered in its runtime: each item's correctness, KLD and top-1
    agreement against the reference, merged by the driver in item order."""
    from ..measure.vqa import GGUFAnswerer, TorchAnswerer

    items = _items(data, limit, start, stop)
    stored = StoredReference(reference, data, limit, start, stop)
    if runtime == "llama.cpp":
        with GGUFAnswerer(text, mmproj, n_threads=llama_threads or threads, gpu_layers=gpu_layers) as answerer:
            report = evaluate(answerer, items, model=label, dataset=str(data), reference=stored)
    else:
        answerer = TorchAnswerer(_lmm_with_gguf_weights(model_dir, text), reduction.image_size, "pool2")
        report = evaluate(answerer, items, model=label, dataset=str(data), reference=stored)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(Path(output)) as tmp:
        tmp.write_text(json.dumps([{k: r[k] for k in ("correct", "type", "kld", "same_top1")} for r in report.items])
                       + "\n")


def merge_shards(paths: list[str]) -> dict:
    """A point's evaluation from its shards, in item order: the same figures one unsharded pass gives."""
    records = [r for path in paths for r in json.loads(Path(path).read_text())]
    per_type: dict[str, list[bool]] = {}
    for r in records:
        per_type.setdefault(r["type"], []).append(r["correct"])
    return {"accuracy": sum(r["correct"] for r in records) / len(records),
            "mean_kld": float(np.mean([r["kld"] for r in records])),
            "top1_agreement": float(np.mean([r["same_top1"] for r in records])), "eval_items": len(records),
            "per_type": {t: sum(v) / len(v) for t, v in sorted(per_type.items())}}


def _lmm_with_gguf_weights(model_dir: str, text: str):
    from ..models.lmm import LMM

    spec = read_spec(model_dir)
    lmm = LMM(spec)
    weights = read_text_gguf_weights(spec, Path(text))
    lmm.llm.load_state_dict({name[len("llm."):]: value for name, value in weights.items()}, strict=False)
    return lmm


def time_point(text: str, mmproj: str, image: str, runs: int, decode_tokens: int, flash_attn: str,
               llama_threads: int | None, gpu_layers: int, output: str, threads: int | None) -> None:
    """`impq bench` of a pair (one warm-up): its figures, where and when it ran (timing tasks never overlap)."""
    import time

    from ..measure.bench import bench_pair
    from .graph import _node

    start = time.time()
    figures = bench_pair(Path(text), Path(mmproj), Path(image), runs=runs, warmup=1, decode_tokens=decode_tokens,
                         n_threads=llama_threads or threads, flash_attn=flash_attn, gpu_layers=gpu_layers)
    record = {"figures": figures, "timing_node": _node(), "timing_start": start, "timing_end": time.time()}
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(Path(output)) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
