"""`impq quantize`: calibrate on image+text samples, quantize the LLM's decoder layers with RTN, GPTQ or AWQ onto
an exact grid (a GGUF type, or an integer grid of a safetensors layout), and write the artifact through its target
(impq.targets: GGUF pair, or safetensors folder), the recipe that reproduces it and a report (per-layer error, bits per weight, sizes, time,
memory, and the written model's agreement with the full-precision PyTorch model)."""

from __future__ import annotations

import json
import resource
import time
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .budget import budgeted_plan, prepare_budget
from .calib import calibration_digest, calibration_embeddings, read_calibration
from .device import resolve_device
from .errors import ImpqError
from .export.gguf_file import QType
from .export.gguf_text import text_tensors
from .fileio import artifact_set, ensure_writable_dir
from .memory import StageSampler, map_large_allocations, trim
from .models.layouts import read_spec
from .models.lmm import LMM
from .quant.driver import METHODS, quantize_llm
from .quant.plan import plan_llm
from .quant.signround import ITERATIONS
from .recipe import MINIMUMS, input_recipe, output_files, sha256_file, write_resolved_recipe
from .targets import FORMATS, TARGETS, Target
from .targets.base import tensor_override

COMPUTE_DTYPES = ("float32", "bfloat16")


def check_field(key: str, value) -> None:
    """A setting's type (as QuantizeSettings declares it) and least value: the same rule for a flag and a recipe."""
    hints = typing.get_type_hints(QuantizeSettings)
    if key not in hints:
        raise ImpqError(None, f"{key}: not a quantize setting; known: {', '.join(sorted(hints))}")
    expected = hints[key]
    allowed = typing.get_args(expected) if typing.get_origin(expected) is types.UnionType else (expected,)
    if value is None and type(None) in allowed:
        return
    kinds = tuple(typing.get_origin(a) or a for a in allowed if a is not type(None))
    if float in kinds:
        kinds += (int,)                                    # 4 is a fine --target-bpw
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ImpqError(None, f"{key} {value!r}: expected {' or '.join(k.__name__ for k in kinds)}")
    if list in kinds and not all(isinstance(item, str) for item in value):
        raise ImpqError(None, f"{key} {value!r}: expected a list of strings")
    if key in MINIMUMS and value < MINIMUMS[key]:
        raise ImpqError(None, f"{key} {value!r}: at least {MINIMUMS[key]}")


@dataclass
class QuantizeSettings:
    method: str = "gptq"
    bits: int = 4
    format: str = "gguf"
    type: str | None = "q4_k"     # GGUF grid
    layout: str | None = None     # safetensors layout: compressed-tensors | gptq | awq
    group_size: int | None = None  # safetensors group size
    calib: str = ""
    nsamples: int = 64
    seqlen: int = 512
    seed: int = 0
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    device: str = "auto"          # where calibration and the layer-by-layer work run
    # the blocks' forward passes during quantization: bfloat16 autocast is 2-3x faster on a CPU with AVX-512 BF16
    # or a GPU, float32 the exact default (quant/driver.py)
    compute_dtype: str = "float32"
    # learned rounding's tuning steps per decoder block (AutoRound's iters: 200 by default, 50 in its light recipe);
    # the learning rate is 1 / iterations, so fewer steps cover the same range
    iterations: int = ITERATIONS
    tensor_types: list[str] = field(default_factory=list)   # GGUF: "REGEX=TYPE" overrides, the last match wins
    target_bpw: float | None = None   # GGUF: a per-group mix of candidate types within this many bits per weight
    target_size: int | None = None    # GGUF: ... or within this many bytes of the text GGUF, header and all
    budget_includes_vision: bool = False   # --target-size counts the mmproj too
    candidate_types: list[str] = field(default_factory=lambda: ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0"])
    sensitivity_data: str | None = None   # VQA JSONL of measurement prompts (its last items); default: the eval split
    sensitivity_prompts: int = 32
    # measured: every candidate type's KLD measured; scaled: the default type's measured, the others scaled by
    # the quantizer's output error (measure/sensitivity.py). A recipe without the field predates "scaled".
    sensitivity: str = "measured"
    # a budget's sensitivity read from an earlier run's report (or impq sensitivity's JSON) instead of measured
    sensitivity_file: str | None = None
    embeddings: str = "q8_0"      # GGUF: token embedding and output head at 8 bits in low-bit exports
    vision: str = "f16"           # the vision tower and projector stay at 16 bits

    @classmethod
    def from_bits(cls, bits: int, type_name: str | None = None, *, format: str = "gguf", layout: str | None = None,
                  group_size: int | None = None, embeddings: str | None = None, vision: str | None = None,
                  **kwargs) -> "QuantizeSettings":
        """Settings for --bits with the format's default grid, or the one --type / --layout / --group-size name."""
        if format not in FORMATS:
            raise ImpqError(None, f"--format {format}: choose one of {', '.join(FORMATS)}")
        iterations = kwargs.get("iterations", ITERATIONS)
        if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
            raise ImpqError(None, f"--iterations {iterations}: a positive number of tuning steps")
        named = {"type": type_name, "layout": layout, "group_size": group_size, "embeddings": embeddings,
                 "vision": vision}                      # None here: the format's default
        for key, value in {"bits": bits, "format": format, **{k: v for k, v in named.items() if v is not None},
                           **kwargs}.items():
            check_field(key, value)
        # both formats run the same layer loop: checked before the format's own settings
        if kwargs.get("compute_dtype", "float32") not in COMPUTE_DTYPES:
            raise ImpqError(None, f"--compute-dtype {kwargs['compute_dtype']}: choose one of {', '.join(COMPUTE_DTYPES)}")
        return TARGETS[format].settings(cls, bits, type_name, layout, group_size, embeddings, vision, kwargs)

    @property
    def target(self) -> Target:
        return TARGETS[self.format]

    def overrides(self) -> list[tuple[str, object]]:
        grids = self.target.override_grids(self)
        return [tensor_override(value, grids) for value in self.tensor_types]

    def grid(self):
        return self.target.grid(self)

    @property
    def grid_label(self) -> str:
        return self.target.label(self)


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


def quantize_model(model_dir: str | Path, out_dir: str | Path, settings: QuantizeSettings, *,
                   verify_items: int = 140, on_layer=None, on_status=None,
                   flags_over_recipe: list[str] | None = None) -> QuantizeReport:
    start = time.perf_counter()
    on_status = on_status or (lambda _: None)
    if settings.method not in METHODS:
        raise ImpqError(None, f"--method {settings.method}: choose one of {', '.join(METHODS)}")
    target = settings.target
    grid = settings.grid()
    device = resolve_device(settings.device)
    spec = read_spec(model_dir)
    samples = read_calibration(settings.calib)
    digest = spec.digest()
    calib_digest = calibration_digest(settings.calib, samples)
    target.check_exportable(spec, grid)

    on_status(f"calibrating on {device}")
    map_large_allocations()
    stages = StageSampler()
    stages.begin("load")
    budgeted = settings.target_bpw is not None or settings.target_size is not None
    # the decoder is read block by block from the checkpoint, never whole; a budget's sensitivity measurement
    # runs the whole model many times and keeps it loaded
    lmm = LMM(spec, stream_decoder=not budgeted)
    aliases = {t.canonical: t.name for t in text_tensors(spec, QType.F16)}
    # every tensor's grid, fixed before the layer loop
    plan = plan_llm(lmm.llm, grid, settings.overrides(), aliases)
    if all(entry.grid is None for entry in plan.values()):
        raise ImpqError(spec.folder, f"no linear layer's input width is a multiple of {grid.block}, the "
                                     f"{grid.name} block: choose a smaller block or group")
    if budgeted:
        # the recipe in the header counted at its longest: every tensor's type spelt "float"
        longest = _recorded(settings, model_dir, digest, calib_digest, dict.fromkeys(plan, "float"))
        budget = prepare_budget(lmm, settings, plan, target, model_dir, digest, longest)
    out_dir = ensure_writable_dir(Path(out_dir))
    calibration_side = (lmm.vision, lmm.projector, lmm.llm.get_input_embeddings())
    stages.begin("calibrate")
    for module in calibration_side:
        module.to(device)
    embeddings = calibration_embeddings(lmm, samples, settings.nsamples, settings.seqlen, settings.seed)
    for module in calibration_side:
        module.to("cpu")
    if lmm.streams_decoder and target.releases_model:
        lmm.release_all_but_decoder()
        trim()
    allocation = {}
    if budgeted:
        on_status("measuring sensitivity for the budget")
        stages.begin("sensitivity")
        plan, allocation = budgeted_plan(lmm, embeddings, budget, settings, aliases, target.tensor_bytes)
    options = {"damp": settings.damp, "block_size": settings.block_size, "act_order": settings.act_order,
               "static_groups": settings.static_groups}
    # the artifacts are written from the codes: the quantized weights are released block by block
    stages.begin("quantize")
    result = quantize_llm(lmm, embeddings, plan, settings.method, gptq_options=options,
                          signround_options={"iterations": settings.iterations}, device=device, release_weights=True,
                          compute_dtype=getattr(torch, settings.compute_dtype), on_layer=on_layer)
    embeddings = [e.cpu() for e in embeddings]
    stages.begin("export")

    stem = target.stem(spec.name, settings)
    recipe = input_recipe(settings, Path(model_dir))
    plan_types = {name: entry.grid.name if entry.grid is not None else "float" for name, entry in plan.items()}
    recorded = _recorded(settings, model_dir, digest, calib_digest, plan_types)
    # every file of the artifact is written and checked in a staging folder, then moved in together, report last
    with artifact_set(out_dir, f"{stem}.report.json") as stage:
        written = target.write(lmm, stage, stem, settings, result, digest, recorded)
        artifacts = written.artifacts
        if allocation:
            allocation["achieved_file_bytes"] = written.llm_bytes + (written.vision_bytes
                                                                     if settings.budget_includes_vision else 0)
        recipe_path = stage / f"{stem}.recipe.yaml"
        resolved = {"model_digest": digest, "calibration_digest": recorded["calibration_digest"],
                    "tensor_types": plan_types,
                    "fallbacks": {name: entry.fallback for name, entry in plan.items() if entry.fallback},
                    "device": str(device), "versions": _versions(), "flags_over_recipe": flags_over_recipe or []}
        outputs = {str(f.relative_to(stage)): sha256_file(f) for f in output_files(artifacts)}
        write_resolved_recipe(recipe_path, recipe, resolved, outputs)

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
            report.verification = target.check(artifacts, checked, settings, model_dir, verify_items, on_status)
        stages.begin(None)
        report.stages = stages.record
        report.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # verification included
        report.total_seconds = time.perf_counter() - start
        # the file names the artifact's files by name, relative to its own folder: no path of this machine
        on_disk = {**report.to_dict(), "artifacts": {k: Path(v).name for k, v in report.artifacts.items()},
                   "recipe": Path(report.recipe).name}
        (stage / f"{stem}.report.json").write_text(json.dumps(on_disk, indent=2) + "\n")
    return report


def _recorded(settings, model_dir, digest: str, calib_digest: str, tensor_types: dict) -> dict:
    """What the artifact's own bytes carry: the recipe, its input digests and the plan; no path, no machine."""
    return {**input_recipe(settings, Path(model_dir)), "model_digest": digest, "calibration_digest": calib_digest,
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
