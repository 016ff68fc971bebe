"""`impq quantize`: calibrate on image+text samples, quantize the LLM's decoder layers with RTN, GPTQ or AWQ onto
an exact grid (a GGUF type, or an integer grid of a safetensors layout), and write the artifact (GGUF pair, or
safetensors folder), the recipe that reproduces it and a report (per-layer error, bits per weight, sizes, time,
memory, and the written model's agreement with the full-precision PyTorch model)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import resource
import threading
import time
import types
import typing
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .calib import calibration_digest, calibration_embeddings, read_calibration
from .device import resolve_device
from .errors import ImpqError
from .export.gguf_file import QType, aligned, canonical_type_name, nbytes
from .export.gguf_mmproj import write_mmproj_gguf
from .export.gguf_text import gguf_vocab, text_tensors, write_text_gguf
from .export.safetensors_layouts import LAYOUTS
from .export.safetensors_model import read_dequantized_llm, write_safetensors_model
from .fileio import artifact_set, ensure_writable_dir
from .memory import map_large_allocations, trim
from .models.layouts import read_spec
from .models.lmm import LMM
from .quant.driver import METHODS, quantize_llm
from .quant.grids import GRIDS
from .quant.plan import plan_llm
from .quant.signround import ITERATIONS
from .recipe import MINIMUMS, input_recipe, output_files, sha256_file, write_resolved_recipe

# --bits -> the GGUF grid used when --type is not given
DEFAULT_TYPE_FOR_BITS = {8: "q8_0", 6: "q6_k", 5: "q5_k", 4: "q4_k", 3: "q3_k", 2: "q2_k"}
FORMATS = ("gguf", "safetensors")
DEFAULT_GROUP_SIZE = 128          # safetensors: int<bits> with one scale per 128 input columns
UNQUANTIZED_TYPES = ("q8_0", "f16", "f32")   # GGUF choices for the token embedding, output head and vision side
SENSITIVITY_MODES = ("measured", "scaled")
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
        if format == "safetensors":
            if type_name is not None:
                raise ImpqError(None, "--type names a GGUF grid; with --format safetensors use --layout and --group-size")
            if kwargs.get("target_bpw") is not None or kwargs.get("target_size"):
                raise ImpqError(None, "--target-bpw and --target-size need --format gguf (for safetensors, give "
                                      "compressed-tensors per-layer widths with --tensor-type REGEX=int8)")
            if embeddings not in (None, "f16") or vision not in (None, "f16"):
                raise ImpqError(None, "--format safetensors keeps the embeddings, output head and vision side at f16")
            settings = cls(bits=bits, format=format, type=None, layout=layout or "compressed-tensors",
                           group_size=group_size or DEFAULT_GROUP_SIZE, embeddings="f16", **kwargs)
            settings.grid()                     # bits and layout are checked before any work
            if settings.tensor_types and not LAYOUTS[settings.layout].mixed_widths:
                raise ImpqError(None, f"--tensor-type: the {settings.layout} layout holds one bit width per "
                                      "checkpoint; compressed-tensors holds several")
            settings.overrides()
            return settings
        if layout is not None or group_size is not None:
            raise ImpqError(None, "--layout and --group-size apply to --format safetensors; GGUF types fix their blocks")
        for value in kwargs.get("tensor_types") or []:
            _tensor_override(value, GRIDS)      # each override is checked before any work
        for value in kwargs.get("candidate_types") or []:
            canonical_type_name(value, GRIDS, "--candidate-types")
        if kwargs.get("target_bpw") is not None and kwargs.get("target_size") is not None:
            raise ImpqError(None, "--target-bpw and --target-size: give one budget")
        if kwargs.get("sensitivity", "measured") not in SENSITIVITY_MODES:
            raise ImpqError(None, f"--sensitivity {kwargs['sensitivity']}: choose one of {', '.join(SENSITIVITY_MODES)}")
        if kwargs.get("budget_includes_vision") and kwargs.get("target_size") is None:
            raise ImpqError(None, "--budget-includes-vision goes with --target-size")
        if kwargs.get("target_size") is not None and kwargs["target_size"] <= 0:
            raise ImpqError(None, f"--target-size {kwargs['target_size']}: a positive number of bytes")
        if kwargs.get("target_bpw") is not None and not 1.0 <= kwargs["target_bpw"] <= 16.0:
            raise ImpqError(None, f"--target-bpw {kwargs['target_bpw']}: choose a value between 1 and 16 bits")
        kwargs.update({key: canonical_type_name(value, UNQUANTIZED_TYPES, f"--{key}")
                       for key, value in (("embeddings", embeddings), ("vision", vision)) if value is not None})
        if type_name is None:
            if bits not in DEFAULT_TYPE_FOR_BITS:
                raise ImpqError(None, f"--bits {bits}: the GGUF grids implemented hold "
                                      f"{', '.join(f'{b} ({t})' for b, t in DEFAULT_TYPE_FOR_BITS.items())} bits")
            type_name = DEFAULT_TYPE_FOR_BITS[bits]
        type_name = canonical_type_name(type_name, GRIDS, "--type")
        if GRIDS[type_name].bits != bits:
            raise ImpqError(None, f"--type {type_name} holds {GRIDS[type_name].bits} bits, not --bits {bits}")
        return cls(bits=bits, type=type_name, **kwargs)

    def overrides(self) -> list[tuple[str, object]]:
        if self.format == "gguf":
            grids = GRIDS
        else:                                   # int2 .. int8 at the run's group size
            layout = LAYOUTS[self.layout]
            grids = {f"int{bits}": layout.grid(bits, self.group_size) for bits in layout.bits}
        return [_tensor_override(value, grids) for value in self.tensor_types]

    def grid(self):
        if self.format == "gguf":
            return GRIDS[self.type]
        if self.layout not in LAYOUTS:
            raise ImpqError(None, f"--layout {self.layout}: choose one of {', '.join(LAYOUTS)}")
        if self.group_size < 8 or self.group_size % 8:
            raise ImpqError(None, f"--group-size {self.group_size}: a positive multiple of 8")
        return LAYOUTS[self.layout].grid(self.bits, self.group_size)

    @property
    def grid_label(self) -> str:
        if self.target_bpw is not None:
            return f"MIX{self.target_bpw:g}BPW"        # a per-group mix: no one type names the file
        if self.target_size is not None:
            return f"MIX{self.target_size / 1e6:.4g}MB"
        return self.type.upper() if self.format == "gguf" else f"W{self.bits}G{self.group_size}"


def _tensor_override(value: str, grids: dict) -> tuple[str, object]:
    """`REGEX=TYPE` (llama-quantize's --tensor-type) -> (pattern, grid); TYPE names one of `grids`."""
    pattern, sep, type_name = value.rpartition("=")
    if not sep or not pattern:
        raise ImpqError(None, f"--tensor-type {value!r}: write REGEX=TYPE, for example 'attn_v=q6_k'")
    try:
        re.compile(pattern)
    except re.error as err:
        raise ImpqError(None, f"--tensor-type {value!r}: not a regular expression ({err})") from None
    return pattern, grids[canonical_type_name(type_name, grids, "--tensor-type")]


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


class _Stages:
    """Wall time and peak resident memory of each stage of a run, one after another. The peak is sampled from
    /proc/self/statm every 50 ms (the kernel's own high-water mark cannot be read per stage without resetting it,
    which would hide the run's peak from whoever started the process); elsewhere the process's peak so far.
    The sampler holds only a weak reference: it ends with `begin(None)` or when a failed run drops its stages."""

    def __init__(self):
        self.record: dict = {}
        self._current: list | None = None       # [name, start, peak bytes]
        self._stop = threading.Event()
        threading.Thread(target=_sample_stages, args=(weakref.ref(self), self._stop), daemon=True).start()

    def begin(self, name: str | None) -> None:
        """End the current stage (if any) and begin `name` (None: end, and stop sampling)."""
        if self._current:
            stage, start, peak = self._current
            self.record[stage] = {"seconds": round(time.perf_counter() - start, 2),
                                  "peak_rss_mb": round(max(peak, _rss_bytes()) / 2 ** 20)}
        self._current = [name, time.perf_counter(), _rss_bytes()] if name else None
        if name is None:
            self._stop.set()


def _rss_bytes() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sample_stages(stages_ref, stop: threading.Event) -> None:
    while not stop.wait(0.05):
        stages = stages_ref()
        if stages is None:
            return
        current = stages._current
        del stages
        if current:
            current[2] = max(current[2], _rss_bytes())


def quantize_model(model_dir: str | Path, out_dir: str | Path, settings: QuantizeSettings, *,
                   verify_items: int = 140, on_layer=None, on_status=None,
                   flags_over_recipe: list[str] | None = None) -> QuantizeReport:
    start = time.perf_counter()
    if settings.method not in METHODS:
        raise ImpqError(None, f"--method {settings.method}: choose one of {', '.join(METHODS)}")
    grid = settings.grid()
    device = resolve_device(settings.device)
    spec = read_spec(model_dir)
    samples = read_calibration(settings.calib)
    digest = spec.digest()
    calib_digest = calibration_digest(settings.calib, samples)
    if settings.format == "gguf":                 # a model that cannot be exported fails before the long work
        gguf_vocab(spec.tokenizer, spec.text_config.vocab_size)
        text_tensors(spec, grid.qtype)

    (on_status or (lambda _: None))(f"calibrating on {device}")
    map_large_allocations()
    stages = _Stages()
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
        candidates = {t: plan_llm(lmm.llm, GRIDS[canonical_type_name(t, GRIDS, "--candidate-types")])
                      for t in settings.candidate_types}
        weights = sum(spec.numel(n) for n in plan)
        smallest = sum(min(_planned_bytes(c[n]) for c in candidates.values()) for n in plan)
        if settings.target_size is not None:
            # the recipe in the header counted at its longest: every tensor's type spelt "float"
            bound = _recorded(settings, model_dir, digest, calib_digest, dict.fromkeys(plan, "float"))
            beside = _bytes_beside_decoder(spec, grid, settings, plan, digest, bound)
            budget = settings.target_size - beside
            if budget < smallest:
                raise ImpqError(None, f"--target-size {settings.target_size}: below the smallest possible file, "
                                      f"{beside + smallest} bytes with {', '.join(settings.candidate_types)}")
        else:
            beside, budget = 0, int(settings.target_bpw * weights / 8)
            if budget < smallest:
                raise ImpqError(None, f"--target-bpw {settings.target_bpw}: below the smallest possible mix of "
                                      f"{', '.join(settings.candidate_types)} ({8 * smallest / weights:.3f} bits per "
                                      "weight)")
        if settings.sensitivity_file:            # read (and checked) before any work
            from .measure.sensitivity import read_sensitivity

            measured = read_sensitivity(settings.sensitivity_file, list(candidates),
                                        list(next(iter(candidates.values()))))
        else:
            measured = _measurement_prompts(lmm, model_dir, settings)
    out_dir = ensure_writable_dir(Path(out_dir))
    calibration_side = (lmm.vision, lmm.projector, lmm.llm.get_input_embeddings())
    stages.begin("calibrate")
    for module in calibration_side:
        module.to(device)
    embeddings = calibration_embeddings(lmm, samples, settings.nsamples, settings.seqlen, settings.seed)
    for module in calibration_side:
        module.to("cpu")
    if lmm.streams_decoder and settings.format == "gguf":
        lmm.release_all_but_decoder()
        trim()
    allocation = {}
    if budgeted:
        (on_status or (lambda _: None))("measuring sensitivity for the budget")
        stages.begin("sensitivity")
        plan, allocation = _budgeted_plan(lmm, embeddings, measured, settings, spec, candidates, budget, aliases)
        if settings.target_size is not None:
            allocation.update(target_size=settings.target_size,
                              predicted_file_bytes=beside + allocation["achieved_bytes"])
    options = {"damp": settings.damp, "block_size": settings.block_size, "act_order": settings.act_order,
               "static_groups": settings.static_groups}
    # the artifacts are written from the codes: the quantized weights are released block by block
    stages.begin("quantize")
    result = quantize_llm(lmm, embeddings, plan, settings.method, gptq_options=options,
                          signround_options={"iterations": settings.iterations}, device=device, release_weights=True,
                          compute_dtype=getattr(torch, settings.compute_dtype), on_layer=on_layer)
    embeddings = [e.cpu() for e in embeddings]
    stages.begin("export")

    stem = f"{spec.name}-{settings.grid_label}-{settings.method}"
    if settings.format == "safetensors":
        stem += f"-{settings.layout}"
    recipe = input_recipe(settings, Path(model_dir))
    plan_types = {name: entry.grid.name if entry.grid is not None else "float" for name, entry in plan.items()}
    recorded = _recorded(settings, model_dir, digest, calib_digest, plan_types)
    # every file of the artifact is written and checked in a staging folder, then moved in together, report last
    with artifact_set(out_dir, f"{stem}.report.json") as stage:
        if settings.format == "gguf":
            artifacts = _write_gguf_pair(lmm, stage, stem, settings, result, digest, recorded)
            llm_bytes = Path(artifacts["text_gguf"]).stat().st_size
            if allocation:
                allocation["achieved_file_bytes"] = llm_bytes + (Path(artifacts["mmproj_gguf"]).stat().st_size
                                                                 if settings.budget_includes_vision else 0)
            bits_quantized = 8 * sum(nbytes(spec.shape(name), q.grid.qtype) for name, q in result.tensors.items()) / \
                sum(spec.numel(name) for name in result.tensors)
        else:
            folder, bits_quantized = write_safetensors_model(lmm, stage / stem, LAYOUTS[settings.layout],
                                                             result.tensors, recorded, digest)
            artifacts = {"safetensors": folder}
            llm_bytes = (folder / "model.safetensors").stat().st_size
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
            {name: entry.fallback for name, entry in plan.items() if entry.fallback}, bits_quantized,
            8 * llm_bytes / llm_weights, len(embeddings), sum(e.shape[1] for e in embeddings), result.seconds, 0.0,
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, str(device),
            learned_rounding=result.blocks)
        del result                                   # the codes are in the artifacts now
        if verify_items:
            stages.begin("verify")
            # the check builds a full-precision reference: at most one other model may be alive beside it
            if settings.format == "gguf":
                del lmm
                trim()
                (on_status or (lambda _: None))("verifying in llama.cpp")
                from .measure.vqa import GGUFAnswerer
                from .runtime.llamacpp import resolve_gpu_layers
                # llama.cpp on the GPU where it can offload, unless the run was told to stay on the CPU
                gpu_layers = resolve_gpu_layers("cpu" if settings.device == "cpu" else "auto")
                report.verification = {"runtime": "llama.cpp", **_verify(
                    lambda: GGUFAnswerer(artifacts["text_gguf"], artifacts["mmproj_gguf"], gpu_layers=gpu_layers),
                    model_dir, verify_items)}
            else:
                (on_status or (lambda _: None))("verifying the written safetensors in PyTorch")
                from .measure.vqa import TorchAnswerer
                # what the files hold, in place of the released weights
                lmm.llm.load_state_dict(read_dequantized_llm(folder), strict=False, assign=True)
                report.verification = {"runtime": "pytorch (weights unpacked from the written files)",
                                       **_verify(lambda: TorchAnswerer(lmm), model_dir, verify_items)}
        stages.begin(None)
        report.stages = stages.record
        report.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # verification included
        report.total_seconds = time.perf_counter() - start
        # the file names the artifact's files by name, relative to its own folder: no path of this machine
        on_disk = {**report.to_dict(), "artifacts": {k: Path(v).name for k, v in report.artifacts.items()},
                   "recipe": Path(report.recipe).name}
        (stage / f"{stem}.report.json").write_text(json.dumps(on_disk, indent=2) + "\n")
    return report


def _write_gguf_pair(lmm: LMM, out_dir: Path, stem: str, settings: QuantizeSettings, result, digest: str,
                     recorded: dict) -> dict:
    spec = lmm.spec
    text_path, mmproj_path = out_dir / f"{stem}.gguf", out_dir / f"mmproj-{stem}.gguf"
    state = {f"llm.{k}": v for k, v in lmm.llm.state_dict().items()}

    def source(name: str):
        """The model's tensor as quantization left it (AWQ folds its scales into norms), or, for one released
        to the meta device, the checkpoint's."""
        value = state[name]
        return spec.load(name) if value.is_meta else value

    write_text_gguf(spec, text_path, GRIDS[settings.type].qtype, digest, recorded, quantized=result.tensors,
                    source=source, head_type=QType[settings.embeddings.upper()])
    write_mmproj_gguf(spec, mmproj_path, QType[settings.vision.upper()], digest, recorded)
    return {"text_gguf": text_path, "mmproj_gguf": mmproj_path}


def _recorded(settings, model_dir, digest: str, calib_digest: str, tensor_types: dict) -> dict:
    """What the artifact's own bytes carry: the recipe, its input digests and the plan; no path, no machine."""
    return {**input_recipe(settings, Path(model_dir)), "model_digest": digest, "calibration_digest": calib_digest,
            "tensor_types": tensor_types}


def _planned_bytes(entry) -> int:
    """A tensor's bytes in the GGUF at its planned grid (16 bits where it stays float), alignment padding included."""
    return aligned(nbytes((entry.out_features, entry.in_features),
                          entry.grid.qtype if entry.grid is not None else QType.F16))


def _bytes_beside_decoder(spec, grid, settings, plan, digest: str, recorded: dict) -> int:
    """The text GGUF's bytes other than the decoder tensors' data, with `recorded` in its header: header and
    metadata, embedding, output head, norms and biases; and the whole mmproj where the budget includes the vision
    side."""
    from .export.gguf_mmproj import mmproj_gguf_bytes
    from .export.gguf_text import text_gguf_bytes

    total = text_gguf_bytes(spec, grid.qtype, digest, recorded, dict.fromkeys(plan, QType.F16),
                            head_type=QType[settings.embeddings.upper()])
    if settings.budget_includes_vision:
        total += mmproj_gguf_bytes(spec, QType[settings.vision.upper()], digest, recorded)
    return total - sum(aligned(nbytes((e.out_features, e.in_features), QType.F16)) for e in plan.values())


def _measurement_prompts(lmm, model_dir, settings) -> list:
    """The sensitivity's measurement sequences (measure/sensitivity.read_measurement), disjoint from the calibration:
    the file's last ones, since impq eval and the report's verification take the first."""
    from .defaults import default_eval_data, is_embedded_model
    from .measure.sensitivity import read_measurement

    data = settings.sensitivity_data
    if data is None:
        if not is_embedded_model(model_dir):
            raise ImpqError(None, "a size budget measures sensitivity: give --sensitivity-data (a VQA JSONL or a text "
                                  "file, disjoint from the calibration data)")
        data = default_eval_data()
    return read_measurement(lmm, data, settings.sensitivity_prompts, settings.seqlen, from_end=True)


def _budgeted_plan(lmm, embeddings, measured: list, settings, spec, candidates: dict, budget: int, aliases: dict):
    """The plan that minimises the predicted KLD (measured sensitivity per tensor group) within `budget` bytes of
    decoder tensors, and what the report says about it. `measured`: the measurement sequences, or (with
    --sensitivity-file) the groups' sensitivities already read."""
    import re as regex

    from .quant.allocate import Option, allocate
    from .measure.sensitivity import measure_sensitivity

    method = "gptq" if settings.method in ("gptq", "signround") else "rtn"
    reference = None
    if settings.sensitivity == "scaled":
        reference = settings.type if settings.type in candidates else list(candidates)[len(candidates) // 2]
    if settings.sensitivity_file:
        groups, prompts = measured, []
    else:
        prompts = measured
        groups = measure_sensitivity(lmm, embeddings, prompts, list(candidates), method, reference_type=reference)
    options = [[Option(t, sum(_planned_bytes(candidates[t][n]) for n in g.tensors), g.kld[t])
                for t in candidates] for g in groups]
    choice = allocate(options, budget)
    overrides = [(f"^{regex.escape(name)}$", candidates[options[i][c].type][name].requested)
                 for i, g in enumerate(groups) for name in g.tensors for c in [choice[i]]]
    # the allocation as exact-name overrides, then the user's own --tensor-type overrides, which win
    plan = plan_llm(lmm.llm, GRIDS[settings.type], overrides + settings.overrides(), aliases)
    achieved = sum(_planned_bytes(entry) for entry in plan.values())
    weights = sum(spec.numel(n) for n in plan)
    return plan, {"target_bpw": settings.target_bpw, "budget_bytes": budget, "achieved_bytes": achieved,
                  "achieved_bpw": 8 * achieved / weights,
                  "predicted_kld": sum(options[i][c].kld for i, c in enumerate(choice)),
                  "groups": {"+".join(g.tensors): options[i][choice[i]].type for i, g in enumerate(groups)},
                  "sensitivity_method": method, "sensitivity_prompts": len(prompts),
                  "sensitivity_positions": sum(p.embeds.shape[1] - p.first for p in prompts),
                  "sensitivity": settings.sensitivity, "sensitivity_reference_type": reference,
                  "sensitivity_groups": [dataclasses.asdict(g) for g in groups]}


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


def _verify(make_candidate, model_dir, n_items: int) -> dict:
    """Accuracy on the first items of the shipped eval split (for the embedded model) and next-token agreement
    with the full-precision PyTorch model on the bundled images and prompts. `make_candidate()` builds the
    answerer under test; for a model other than imp-tiny it is built only once the streamed reference's logits
    exist and the reference is freed, so the two are never in memory together."""
    from .defaults import default_eval_data, is_embedded_model
    from .measure.divergence import Divergence
    from .measure.vqa import TorchAnswerer, evaluate, read_vqa_jsonl
    from .models.preprocess import load_image
    from .verify import DEFAULT_PROMPTS, default_images

    out: dict = {}
    with contextlib.ExitStack() as stack:

        def opened(candidate):
            return stack.enter_context(candidate) if hasattr(candidate, "__exit__") else candidate

        if is_embedded_model(model_dir):
            reference, candidate = TorchAnswerer(model_dir), opened(make_candidate())
            items = read_vqa_jsonl(default_eval_data())[:n_items]
            report = evaluate(candidate, items, model="quantized", dataset="eval", reference=reference)
            full = evaluate(reference, items, model="pytorch", dataset="eval")
            out.update(eval_items=len(items), accuracy=report.accuracy, reference_accuracy=full.accuracy,
                       mean_kld=report.mean_kld, top1_agreement=report.top1_agreement)
        else:
            # the full-precision reference streams its decoder (one block in memory), and is gone before the
            # candidate loads
            reference = LMM(read_spec(model_dir), stream_decoder=True)
            prompts = [(load_image(path), prompt) for path in default_images() for prompt in DEFAULT_PROMPTS]
            ref_logits = reference.next_token_logits([reference.prompt_embeddings(*p) for p in prompts])
            del reference
            trim()
            candidate = opened(make_candidate())
            divergence = Divergence()
            for (image, prompt), ref in zip(prompts, ref_logits):
                _, logits = candidate.answer(image, prompt, 1)
                divergence.add(ref.numpy(), logits)
            out.update(mean_kld=divergence.mean_kld, top1_agreement=divergence.top1_agreement)
        if hasattr(candidate, "backend"):
            out["backend"] = candidate.backend          # where llama.cpp ran
    return out
