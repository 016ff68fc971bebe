"""`impq quantize`: calibrate on image+text samples, quantize the LLM's decoder layers with RTN, GPTQ or AWQ onto
an exact grid (a GGUF type, or an integer grid of a safetensors layout), and write the artifact through its target
(impq.targets: GGUF pair, or safetensors folder), the recipe that reproduces it and a report (per-layer error, bits per weight, sizes, time,
memory, and the written model's agreement with the full-precision PyTorch model)."""

from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .budget import budgeted_plan, prepare_budget
from .calib import calibration_digest, calibration_embeddings, calibration_pixels, read_calibration
from .device import resolve_device
from .errors import ImpqError
from .fileio import artifact_set, ensure_writable_dir
from .memory import StageSampler, map_large_allocations, trim
from .models.layouts import read_spec
from .models.lmm import LMM
from .quant.driver import quantize_llm, quantize_vision
from .quant.grids import GRIDS
from .quant.plan import decoder_part, plan_model, plan_vision
from .recipe import (NO_METHOD, Recipe, calibration_path, output_files, override_names, sha256_file,
                     write_resolved_recipe)
from .targets import target_of

@dataclass
class QuantizeReport:
    artifacts: dict               # what was written: text_gguf + mmproj_gguf, or safetensors (a folder)
    artifact_bytes: int
    recipe: str
    settings: dict
    layers: dict                  # canonical name -> relative output error on the calibration inputs
    tensor_types: dict            # canonical name -> the grid it was written on ("float": kept unquantized)
    allocation: dict              # --target-bpw: budget, predicted and achieved bytes, predicted KLD; else empty
    fallbacks: dict               # canonical name -> why its type differs from the request (input width)
    bits_per_weight_quantized: float
    bits_per_weight_file: float   # LLM bytes (GGUF text file, or model.safetensors) per LLM weight
    calibration_sequences: int
    calibration_tokens: int
    quantize_seconds: float
    total_seconds: float
    peak_rss_mb: float
    device: str = "cpu"
    verification: dict = field(default_factory=dict)
    stages: dict = field(default_factory=dict)    # stage -> wall seconds and peak RSS within it
    # --method signround: per decoder layer, the rounding kept (learned or gptq) on held-out calibration sequences
    learned_rounding: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def quantize_model(model_dir: str | Path, out_dir: str | Path, recipe: Recipe, *,
                   verify_items: int = 140, on_layer=None, on_status=None,
                   flags_over_recipe: list[str] | None = None, carried: dict | None = None) -> QuantizeReport:
    """`carried`: the recipe document the artifact carries, where it is not the recipe's own schema-2 document
    (impq reproduce of a recipe file written by an earlier schema carries that file's document, as the original
    run did)."""
    start = time.perf_counter()
    on_status = on_status or (lambda _: None)
    if recipe.method.name == NO_METHOD:
        raise ImpqError(None, "method none is an export's recipe: run impq export")
    target = target_of(recipe)
    grid = recipe.grid()
    device = resolve_device(recipe.method.device)
    spec = read_spec(model_dir)
    calib = calibration_path(recipe, Path(model_dir))
    samples = read_calibration(calib)
    digest = spec.digest()
    calib_digest = calibration_digest(calib, samples)
    document = recipe.document(Path(model_dir))
    carried = carried or document
    target.check_exportable(spec, grid)

    on_status(f"calibrating on {device}")
    map_large_allocations()
    stages = StageSampler()
    stages.begin("load")
    budgeted = recipe.budget is not None
    # the decoder is read block by block from the checkpoint, never whole; a budget's sensitivity measurement
    # runs the whole model many times and keeps it loaded
    lmm = LMM(spec, stream_decoder=not budgeted)
    aliases = override_names(spec)
    # every tensor's grid, fixed before the layer loops: the decoder's, and the vision side's where it is calibrated
    plan = plan_model(lmm.llm, lmm.vision_linears(), grid, recipe.vision_grid(), recipe.tensor_overrides(), aliases)
    if all(entry.grid is None for entry in decoder_part(plan).values()):
        raise ImpqError(spec.folder, f"no linear layer's input width is a multiple of {grid.block}, the "
                                     f"{grid.name} block: choose a smaller block or group")
    if _vision_part(plan) and not any(sample.image is not None for sample in samples):
        raise ImpqError(calib, "a calibrated vision side (--vision on a GGUF grid, or a --tensor-type on v.blk.* or "
                               "mm.*) is quantized on the calibration's images, and this calibration has none")
    if budgeted:
        # the recipe in the header counted at its longest: every tensor's type spelt "float", the vision side's
        # every linear where the budget may choose it
        named = {**plan, **(lmm.vision_linears() if recipe.budget.includes_vision else {})}
        longest = _recorded(carried, digest, calib_digest, dict.fromkeys(named, "float"))
        budget = prepare_budget(lmm, recipe, plan, target, model_dir, digest, longest, samples)
    out_dir = ensure_writable_dir(Path(out_dir))
    method = recipe.method
    options = method_options(method, device)

    def embed() -> list[torch.Tensor]:
        calibration_side = (lmm.vision, lmm.projector, lmm.llm.get_input_embeddings())
        for module in calibration_side:
            module.to(device)
        embeddings = calibration_embeddings(lmm, samples, recipe.calibration.nsamples, recipe.calibration.seqlen,
                                            recipe.seed)
        for module in calibration_side:
            module.to("cpu")
        return embeddings

    allocation, embeddings = {}, None
    if budgeted:
        stages.begin("calibrate")
        embeddings = embed()
        on_status("measuring sensitivity for the budget")
        stages.begin("sensitivity")
        plan, allocation = budgeted_plan(lmm, embeddings, budget, recipe, aliases, target.tensor_bytes)
    vision_result, vision_plan = None, _vision_part(plan)
    if vision_plan:
        # before the decoder, so that the LLM is calibrated on the image features the quantized tower gives
        on_status("quantizing the vision side")
        stages.begin("quantize vision")
        vision_result = quantize_vision(lmm, calibration_pixels(lmm, samples, recipe.calibration.nsamples,
                                                                recipe.seed), vision_plan, method.name, **options)
        embeddings = None
    if embeddings is None:
        stages.begin("calibrate")
        embeddings = embed()
    if lmm.streams_decoder and target.releases_model:
        # a calibrated vision side is written from the model (AWQ changed its norms): it stays
        lmm.release_all_but_decoder(keep_vision=vision_result is not None)
        trim()
    # the artifacts are written from the codes: the quantized weights are released block by block
    stages.begin("quantize")
    result = quantize_llm(lmm, embeddings, decoder_part(plan), method.name, release_weights=True, on_layer=on_layer,
                          **options)
    if vision_result is not None:
        result.tensors.update(vision_result.tensors)
        result.blocks.update(vision_result.blocks)
        result.seconds += vision_result.seconds
    embeddings = [e.cpu() for e in embeddings]
    stages.begin("export")

    stem = recipe.stem(spec.name)
    plan_types = {name: entry.grid.name if entry.grid is not None else "float" for name, entry in plan.items()}
    recorded = _recorded(carried, digest, calib_digest, plan_types)
    # every file of the artifact is written and checked in a staging folder, then moved in together, report last
    with artifact_set(out_dir, f"{stem}.report.json") as stage:
        written = target.write(lmm, stage, stem, recipe, result, digest, recorded)
        artifacts = written.artifacts
        if allocation:
            allocation["achieved_file_bytes"] = written.llm_bytes + (written.vision_bytes
                                                                     if recipe.budget.includes_vision else 0)
        recipe_path = stage / f"{stem}.recipe.yaml"
        resolved = {"model_digest": digest, "calibration_digest": recorded["calibration_digest"],
                    "tensor_types": plan_types,
                    "fallbacks": {name: entry.fallback for name, entry in plan.items() if entry.fallback},
                    "device": str(device), "versions": _versions(), "flags_over_recipe": flags_over_recipe or []}
        outputs = {str(f.relative_to(stage)): sha256_file(f) for f in output_files(artifacts)}
        write_resolved_recipe(recipe_path, document, resolved, outputs)

        llm_weights = sum(spec.numel(name) for name in spec.tensors if name.startswith("llm."))
        total_bytes = sum(_size(Path(p)) for p in artifacts.values())
        report = QuantizeReport(
            {k: str(out_dir / Path(v).name) for k, v in artifacts.items()}, total_bytes,
            str(out_dir / recipe_path.name), recorded,
            {name: q.relative_error for name, q in result.tensors.items()},
            plan_types, allocation,
            {name: entry.fallback for name, entry in plan.items() if entry.fallback}, written.bits_quantized,
            8 * written.llm_bytes / llm_weights, len(embeddings), sum(e.shape[1] for e in embeddings), result.seconds, 0.0,
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, str(device),
            learned_rounding=result.blocks)
        del result                                   # the codes are in the artifacts now
        if verify_items:
            stages.begin("verify")
            # the check builds a full-precision reference: at most one other model may be alive beside it
            checked = None if target.releases_model else lmm
            del lmm
            trim()
            report.verification = target.check(artifacts, checked, recipe, model_dir, verify_items, on_status)
        stages.begin(None)
        report.stages = stages.record
        report.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # verification included
        report.total_seconds = time.perf_counter() - start
        # the file names the artifact's files by name, relative to its own folder: no path of this machine
        on_disk = {**report.to_dict(), "artifacts": {k: Path(v).name for k, v in report.artifacts.items()},
                   "recipe": Path(report.recipe).name}
        (stage / f"{stem}.report.json").write_text(json.dumps(on_disk, indent=2) + "\n")
    return report


def method_options(method, device) -> dict:
    """What the layer loop takes from a recipe's method section (quant/driver.quantize_blocks' keywords)."""
    return {"gptq_options": {"damp": method.damp, "block_size": method.block_size, "act_order": method.act_order,
                             "static_groups": method.static_groups},
            "signround_options": {"iterations": method.iterations}, "device": device,
            "compute_dtype": getattr(torch, method.compute_dtype)}


def quantize_vision_side(lmm: LMM, samples: list, vision_type: str, method, nsamples: int, seed: int = 0,
                         device="cpu"):
    """The vision side alone quantized in place onto `vision_type`'s grids (width fallbacks applied) by a recipe's
    method section, on the drawn calibration samples' images: what a sweep's mmproj of that vision type holds."""
    plan = {name: entry for name, entry in plan_vision(lmm.vision_linears(), GRIDS[vision_type]).items()
            if entry.grid is not None}
    return quantize_vision(lmm, calibration_pixels(lmm, samples, nsamples, seed), plan, method.name,
                           **method_options(method, device))


def _vision_part(plan) -> dict:
    """The vision side's planned tensors on a grid: what a calibrated mmproj quantizes."""
    decoder = decoder_part(plan)
    return {name: entry for name, entry in plan.items() if name not in decoder and entry.grid is not None}


def _recorded(document: dict, digest: str, calib_digest: str, tensor_types: dict) -> dict:
    """What the artifact's own bytes carry: the recipe, its input digests and the plan; no path, no machine."""
    return {**document, "model_digest": digest, "calibration_digest": calib_digest,
            "tensor_types": tensor_types}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("impq", "torch", "transformers", "gguf", "llama-cpp-python"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
