"""`impq quantize`: calibrate on image+text samples, quantize the LLM's decoder layers onto a GGUF grid with
RTN or GPTQ, and write the GGUF pair, the recipe that reproduces it and a report (per-layer error, bits per
weight, sizes, time, memory, and llama.cpp's agreement with the full-precision PyTorch model)."""

from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gguf
import yaml

from . import __version__
from .calib import calibration_embeddings, file_digest, read_calibration
from .errors import ImpqError
from .export.gguf_file import QType
from .export.gguf_mmproj import write_mmproj_gguf
from .export.gguf_text import gguf_vocab, text_tensors, write_text_gguf
from .fileio import atomic_output, ensure_writable_dir, sha256_files
from .models.layouts import read_spec
from .models.lmm import LMM
from .quant.driver import METHODS, quantize_llm
from .quant.grids import GRIDS

# --bits -> the GGUF grid used when --type is not given
DEFAULT_TYPE_FOR_BITS = {8: "q8_0", 6: "q6_k", 5: "q5_k", 4: "q4_k", 3: "q3_k", 2: "q2_k"}


@dataclass
class QuantizeSettings:
    method: str = "gptq"
    type: str = "q4_k"
    format: str = "gguf"
    calib: str = ""
    nsamples: int = 64
    seqlen: int = 512
    seed: int = 0
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    embeddings: str = "q8_0"      # token embedding and output head: 8-bit in low-bit exports
    vision: str = "f16"           # the mmproj stays at 16 bits

    @classmethod
    def from_bits(cls, bits: int, type_name: str | None, **kwargs) -> "QuantizeSettings":
        if type_name is None:
            if bits not in DEFAULT_TYPE_FOR_BITS:
                raise ImpqError(None, f"--bits {bits}: the GGUF grids implemented hold "
                                      f"{', '.join(f'{b} ({t})' for b, t in DEFAULT_TYPE_FOR_BITS.items())} bits")
            type_name = DEFAULT_TYPE_FOR_BITS[bits]
        if type_name not in GRIDS:
            raise ImpqError(None, f"--type {type_name}: GGUF grids implemented: {', '.join(GRIDS)}")
        if GRIDS[type_name].bits != bits:
            raise ImpqError(None, f"--type {type_name} holds {GRIDS[type_name].bits} bits, not --bits {bits}")
        return cls(type=type_name, **kwargs)


@dataclass
class QuantizeReport:
    text_gguf: str
    mmproj_gguf: str
    recipe: str
    settings: dict
    layers: dict                  # canonical name -> relative output error on the calibration inputs
    bits_per_weight_quantized: float
    bits_per_weight_file: float
    text_bytes: int
    mmproj_bytes: int
    calibration_sequences: int
    calibration_tokens: int
    quantize_seconds: float
    total_seconds: float
    peak_rss_mb: float
    verification: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def quantize_model(model_dir: str | Path, out_dir: str | Path, settings: QuantizeSettings, *,
                   verify_items: int = 140, on_layer=None, on_status=None) -> QuantizeReport:
    start = time.perf_counter()
    if settings.method not in METHODS:
        raise ImpqError(None, f"--method {settings.method}: choose one of {', '.join(METHODS)}")
    if settings.format != "gguf":
        raise ImpqError(None, f"--format {settings.format}: only gguf is implemented so far")
    spec = read_spec(model_dir)
    samples = read_calibration(settings.calib)
    gguf_vocab(spec.tokenizer, spec.text_config.vocab_size)
    out_dir = ensure_writable_dir(Path(out_dir))
    grid = GRIDS[settings.type]
    text_tensors(spec, grid.qtype)                # a model that cannot be exported fails before the long work

    (on_status or (lambda _: None))("calibrating")
    lmm = LMM(spec)
    embeddings = calibration_embeddings(lmm, samples, settings.nsamples, settings.seqlen, settings.seed)
    options = {"damp": settings.damp, "block_size": settings.block_size, "act_order": settings.act_order,
               "static_groups": settings.static_groups}
    result = quantize_llm(lmm, embeddings, grid, settings.method, gptq_options=options, on_layer=on_layer)
    if not result.tensors:
        raise ImpqError(spec.folder, f"no linear layer's input width is a multiple of {grid.block}, the "
                                     f"{settings.type} block: choose a 32-wide type (q4_0, q4_1, q5_0, q5_1, q8_0)")

    stem = f"{spec.name}-{settings.type.upper()}-{settings.method}"
    text_path, mmproj_path = out_dir / f"{stem}.gguf", out_dir / f"mmproj-{stem}.gguf"
    digest = sha256_files([spec.folder / "config.json", *spec.checkpoint.files])
    recorded = {**asdict(settings), "calib_digest": file_digest(Path(settings.calib))}
    state = {f"llm.{k}": v for k, v in lmm.llm.state_dict().items()}
    write_text_gguf(spec, text_path, grid.qtype, digest, recorded, quantized=result.tensors, source=state.__getitem__,
                    head_type=QType[settings.embeddings.upper()])
    try:
        write_mmproj_gguf(spec, mmproj_path, QType[settings.vision.upper()], digest, recorded)
        recipe_path = out_dir / f"{stem}.recipe.yaml"
        recipe = {"impq_version": __version__, "model": {"path": str(spec.folder.resolve()), "digest": digest},
                  "calibration": {"path": str(Path(settings.calib).resolve()), "digest": recorded["calib_digest"]},
                  "quantize": asdict(settings),
                  "targets": {"llm decoder linear layers": f"{settings.method} onto {settings.type.upper()}",
                              "token embedding and output head": settings.embeddings.upper(),
                              "norms and biases": "F32", "vision tower and projector": settings.vision.upper()}}
        with atomic_output(recipe_path) as tmp:
            tmp.write_text(yaml.safe_dump(recipe, sort_keys=False))
    except BaseException:
        text_path.unlink(missing_ok=True)
        mmproj_path.unlink(missing_ok=True)
        raise

    block, block_bytes = gguf.GGML_QUANT_SIZES[grid.qtype]
    llm_weights = sum(spec.numel(name) for name in spec.tensors if name.startswith("llm."))
    report = QuantizeReport(
        str(text_path), str(mmproj_path), str(recipe_path), recorded,
        {name: q.relative_error for name, q in result.tensors.items()}, 8 * block_bytes / block,
        8 * text_path.stat().st_size / llm_weights, text_path.stat().st_size, mmproj_path.stat().st_size,
        len(embeddings), sum(e.shape[1] for e in embeddings), result.seconds, 0.0,
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if verify_items:
        (on_status or (lambda _: None))("verifying in llama.cpp")
        report.verification = _verify(text_path, mmproj_path, model_dir, verify_items)
    report.total_seconds = time.perf_counter() - start
    report_path = out_dir / f"{stem}.report.json"
    with atomic_output(report_path) as tmp:
        tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def _verify(text_path: Path, mmproj_path: Path, model_dir, n_items: int) -> dict:
    """Accuracy on the first items of the shipped eval split (for the embedded model) and next-token agreement
    with the full-precision PyTorch model on the bundled images and prompts."""
    from .defaults import PACKAGE, default_eval_data
    from .measure.divergence import Divergence
    from .measure.vqa import GGUFAnswerer, TorchAnswerer, evaluate, read_vqa_jsonl
    from .models.preprocess import load_image
    from .verify import DEFAULT_PROMPTS, default_images

    out: dict = {}
    reference = TorchAnswerer(model_dir)
    with GGUFAnswerer(text_path, mmproj_path) as pair:
        if (Path(model_dir) / "config.json").resolve() == (PACKAGE / "assets" / "imp-tiny" / "config.json").resolve():
            items = read_vqa_jsonl(default_eval_data())[:n_items]
            report = evaluate(pair, items, model=str(text_path), dataset="eval", reference=reference)
            full = evaluate(reference, items, model="pytorch", dataset="eval")
            out.update(eval_items=len(items), accuracy=report.accuracy, reference_accuracy=full.accuracy,
                       mean_kld=report.mean_kld, top1_agreement=report.top1_agreement)
        else:
            divergence = Divergence()
            for path in default_images():
                image = load_image(path)
                for prompt in DEFAULT_PROMPTS:
                    _, ref_logits = reference.answer(image, prompt, 1)
                    _, logits = pair.answer(image, prompt, 1)
                    divergence.add(ref_logits, logits)
            out.update(mean_kld=divergence.mean_kld, top1_agreement=divergence.top1_agreement)
    return out
