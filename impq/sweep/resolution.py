"""`impq sweep-resolution`: input resolution x vision-token reduction x weight type, each point measured in the
runtime a phone uses.

For every weight type the LLM is quantized once (F16: exported as it is) and its text GGUF reused at every
resolution; an mmproj (F16) is written per resolution and reduction. Each point is evaluated on the VQA split in
llama.cpp (accuracy, and KLD / top-1 agreement against the full-precision model at the native resolution, so that
the loss of resolution and of precision add up in one number), timed with `impq bench` (one run after another,
never concurrently) under each flash-attention setting asked for, sized, and estimated on a phone profile. Flash
attention changes only llama.cpp's summation order, so each (type, reduction) is evaluated once, with it off. A reduction that stock llama.cpp cannot run (2x2
pooling of a grid other than 24x24) is measured in PyTorch with the GGUF's own dequantized weights and labelled
`pytorch-only`: it has no measured speed, only the phone estimate.

Every finished point is cached under a key of its configuration and input digests (`OUT/points/<key>.json`), as
is each type's text GGUF and each mmproj; a re-run computes only what is missing.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from .. import __version__
from ..errors import ImpqError
from ..export.gguf_file import canonical_type_name
from ..fileio import atomic_output, ensure_writable_dir, sha256_files
from ..measure.phone import DEVICES, ModelCost
from ..measure.phone_fit import PHONE_FIT
from ..measure.vqa import VQAItem, read_vqa_jsonl
from ..models.layouts import ModelSpec, read_spec
from ..models.reduction import TOKEN_REDUCTIONS, VisionReduction, vision_reduction
from ..quant.grids import GRIDS
from ..recipe import Budget, Calibration, Method, Recipe, export_recipe, mix_bpw
from ..runtime.llamacpp import resolve_flash_attn

SWEEP_TYPES = ("f16", *GRIDS)
PROMPT_TEXT_TOKENS = 40             # text tokens beside the image in the phone estimate (impq estimate's default)


@dataclass
class SweepSettings:
    resolutions: list[int] | None = None         # None: native, three quarters and half (multiples of the patch)
    token_reductions: list[str] = field(default_factory=lambda: ["none"])
    types: list[str] = field(default_factory=lambda: ["f16", "q4_k"])
    vision_types: list[str] = field(default_factory=lambda: ["f16"])   # the mmproj's: f16, or a calibrated grid
    method: str = Method().name                  # the quantized types' recipe (impq/recipe.py), as impq quantize's
    calib: str | None = None
    nsamples: int = Calibration().nsamples
    limit: int | None = 140                       # eval items per point; None: the whole split
    runs: int = 3                                 # timed bench runs per point
    decode_tokens: int = 16
    threads: int | None = None
    gpu_layers: int = 0                           # llama.cpp's offloaded layers (-1: all), resolved from --device
    flash_attn: list[str] = field(default_factory=lambda: ["off"])   # a timing dimension: on, off, auto
    device_profile: str = "snapdragon-8-gen-3"
    budget_ttft_ms: float | None = None           # on the phone estimate of device_profile
    budget_size_mb: float | None = None           # text GGUF + mmproj
    shard_items: int | None = None                # items per evaluation task (None: a point's items in one)


@dataclass(frozen=True)
class Point:
    type: str
    reduction: VisionReduction
    flash_attn: str | None = "off"               # None for a PyTorch-only point (nothing is timed)
    vision_type: str = "f16"                     # the mmproj's (a grid: the tower calibrated with the sweep's method)

    @property
    def runtime(self) -> str:
        return "llama.cpp" if self.reduction.runs_in_llama_cpp else "pytorch-only"

    @property
    def label(self) -> str:
        tower = "" if self.vision_type == "f16" else f" tower-{self.vision_type.upper()}"
        return (f"{self.type.upper()}{tower} {self.reduction.label}" +
                (f" fa-{self.flash_attn}" if self.flash_attn else ""))

    @property
    def tower_key(self) -> list:
        """What a point's keys add for its tower: nothing at F16, so that F16 points keep their cached keys."""
        return [] if self.vision_type == "f16" else [self.vision_type]


def default_resolutions(spec: ModelSpec) -> list[int]:
    native, patch = spec.vision.image_size, spec.vision.patch_size
    sizes = {native, max(patch, round(native * 3 / 4 / patch) * patch), max(patch, native // 2 // patch * patch)}
    return sorted(sizes, reverse=True)


def plan_points(spec: ModelSpec, settings: SweepSettings) -> list[Point]:
    """Every point of the grid, each value checked before any work: one-line errors name the bad value."""
    if settings.device_profile not in DEVICES:
        raise ImpqError(None, f"--device-profile {settings.device_profile}: choose one of {', '.join(DEVICES)}")
    flash = list(dict.fromkeys(resolve_flash_attn(f) for f in settings.flash_attn))
    types = [t.lower() if mix_bpw(t) is not None else canonical_type_name(t, SWEEP_TYPES, "--types")
             for t in settings.types]
    for type_name in types:
        if mix_bpw(type_name) is not None:
            Budget(target_bpw=mix_bpw(type_name))          # its range, checked before any work
    vision_types = [canonical_type_name(t, SWEEP_TYPES, "--vision-types") for t in settings.vision_types]
    if not vision_types:
        raise ImpqError(None, "--vision-types: give at least one (f16, or a GGUF grid such as q8_0 or q4_k)")
    resolutions = default_resolutions(spec) if settings.resolutions is None else settings.resolutions
    for value in settings.token_reductions:
        if value not in TOKEN_REDUCTIONS:
            raise ImpqError(None, f"--token-reduction {value}: choose from {', '.join(TOKEN_REDUCTIONS)}")
    points = []
    for type_name in dict.fromkeys(types):
        for vision_type in dict.fromkeys(vision_types):
            for size in dict.fromkeys(resolutions):
                for token_reduction in dict.fromkeys(settings.token_reductions):
                    reduction = vision_reduction(spec.vision, size, token_reduction)
                    points += ([Point(type_name, reduction, f, vision_type) for f in flash]
                               if reduction.runs_in_llama_cpp
                               else [Point(type_name, reduction, None, vision_type)] if flash else [])
    if not points:
        raise ImpqError(None, "empty grid of points: give at least one --resolutions, --token-reduction and --types value")
    return points


def _dataset_digest(path: Path, items: list[VQAItem]) -> str:
    return sha256_files([path, *sorted({item.image for item in items})])


def _what(work: dict) -> str:
    """What a task works on, in words: its weight type, input size and items."""
    parts = [work["type_name"].upper()] if "type_name" in work else []
    if work.get("reduction") is not None:
        parts.append(work["reduction"].label)
    if work.get("items"):
        parts.append(f"{work['items']} items")
    return " ".join(parts)


@dataclass
class SweepResult:
    rows: list[dict]
    recommended: dict | None
    files: dict
    # a run: each task it ran (kind, key, node, start, end, threads); a dry run: each task and whether it is done
    tasks: list[dict] = field(default_factory=list)


def run_sweep(model_dir: str | Path, out_dir: str | Path, settings: SweepSettings, data: Path,
              on_point: Callable[[int, int, str], None] | None = None, executor=None,
              shared_dir: str | Path | None = None, dry_run: bool = False, machine=None) -> SweepResult:
    """The sweep as a task graph (sweep/graph.py) run by `executor` (default: in this process), its files under
    `shared_dir` (default: `out_dir`), where any executor finds them; then the rows, the recommendation, the
    tables and plots in `out_dir`. `on_point(i, n, label)`: each task as it is started or submitted. `dry_run`:
    only the graph (every task, done or to run, and the points already measured); nothing is written; with
    `machine` (sweep/estimate.Machine), each task's estimated seconds there."""
    from ..calib import calibration_digest
    from ..defaults import default_calib_data
    from ..verify import default_images
    from .estimate import task_seconds
    from .graph import InProcess, Task, ordered, task_key
    from .tasks import (evaluate_shard, merge_shards, reference_logits, time_point, write_calibrated_mmproj,
                        write_mmproj, write_mmproj_from, write_text)

    spec = read_spec(model_dir)
    points = plan_points(spec, settings)
    items = read_vqa_jsonl(data)[:settings.limit]
    calib = Path(settings.calib or default_calib_data(model_dir))
    out = Path(out_dir) if dry_run else ensure_writable_dir(Path(out_dir))
    shared = Path(shared_dir) if shared_dir is not None else out
    if shared_dir is not None and not dry_run:
        ensure_writable_dir(shared)
    executor = executor or InProcess()
    model_digest = spec.digest()
    data_digest = _dataset_digest(Path(data), items)
    calib_digest = calibration_digest(calib)
    recipes = type_recipes([p.type for p in points] + [p.vision_type for p in points], settings, calib, Path(data))
    documents = {t: recipe.document(Path(model_dir)) for t, recipe in recipes.items()}
    image = default_images()[0]
    device = DEVICES[settings.device_profile]
    model, cpus = str(model_dir), settings.threads or 1

    def quantizer(*type_names: str) -> list:
        """What files of these types depend on besides the model: nothing at F16 (an export, so that a sweep with
        another method or calibration finds its F16 points done); a quantized type's method and calibration; a
        budgeted mix's data too (its sensitivity is measured on the data's last items)."""
        quantized = [t for t in type_names if t != "f16"]
        return ([settings.method, calib_digest, settings.nsamples] if quantized else []) + (
            [data_digest] if any(mix_bpw(t) is not None for t in quantized) else [])

    def text_gguf(type_name: str) -> Path:
        """The type's text GGUF, quantized once and reused at every resolution."""
        key = task_key(model_digest, type_name, *quantizer(type_name), __version__)
        return shared / "llm" / f"{spec.name}-{type_name.upper()}-{key}.gguf"

    def runnable(reduction: VisionReduction) -> VisionReduction:
        return VisionReduction(reduction.image_size, reduction.patch_size, reduction.pool and
                               reduction.runs_in_llama_cpp)

    def mmproj_gguf(point: Point) -> Path:
        """The point's mmproj, written once per vision type and reduction and reused by every weight type."""
        label = runnable(point.reduction).label
        if point.vision_type == "f16":
            return shared / "mmproj" / f"mmproj-{spec.name}-F16-{label}-{task_key(model_digest, label, __version__)}.gguf"
        key = task_key(model_digest, label, point.vision_type, settings.method, calib_digest, settings.nsamples,
                      __version__)
        return shared / "mmproj" / f"mmproj-{spec.name}-{point.vision_type.upper()}-{label}-{key}.gguf"

    def evaluation_key(point: Point) -> str:
        return task_key(model_digest, data_digest, point.type, point.reduction.label,
                        *quantizer(point.type, point.vision_type), len(items), __version__, *point.tower_key)

    def point_key(point: Point) -> str:
        return task_key(model_digest, data_digest, point.type, point.reduction.label,
                        *quantizer(point.type, point.vision_type), settings.runs, settings.decode_tokens,
                        settings.threads, settings.gpu_layers, point.flash_attn, settings.device_profile,
                        asdict(PHONE_FIT.efficiency), PHONE_FIT.band, len(items), __version__, *point.tower_key)

    size = settings.shard_items or max(1, len(items))
    shards = [(start, min(start + size, len(items))) for start in range(0, len(items), size)]

    def shard_path(point: Point, start: int, stop: int) -> Path:
        return shared / "evals" / f"{evaluation_key(point)}.items-{start}-{stop}.json"

    reference_path = shared / "reference" / f"{task_key(model_digest, data_digest, len(items), __version__)}.npy"
    tasks: dict[str, Task] = {}
    work: dict[str, dict] = {}           # what each task works on, for its estimate
    native = runnable(vision_reduction(spec.vision))

    def add(task: Task, **what) -> None:
        tasks.setdefault(task.key, task)
        work.setdefault(task.key, what)

    for point in points:
        if (shared / "points" / f"{point_key(point)}.json").is_file():
            continue
        text, mmproj = text_gguf(point.type), mmproj_gguf(point)
        add(Task(text.name, "quantize", str(text), write_text,
                 {"model_dir": model, "recipe": recipes[point.type], "document": documents[point.type],
                  "output": str(text)}, cpus=cpus, accelerated=True),
            type_name=point.type, nsamples=settings.nsamples)
        if point.vision_type == "f16":
            add(Task(mmproj.name, "mmproj", str(mmproj), write_mmproj,
                     {"model_dir": model, "reduction": runnable(point.reduction), "document": documents["f16"],
                      "output": str(mmproj)}), reduction=runnable(point.reduction))
        else:
            # the tower quantized once per type, at the native geometry; other reductions copy its bytes
            source = mmproj_gguf(Point(point.type, native, "off", point.vision_type))
            add(Task(source.name, "mmproj", str(source), write_calibrated_mmproj,
                     {"model_dir": model, "reduction": native, "vision_type": point.vision_type,
                      "recipe": recipes[point.vision_type], "document": documents[point.vision_type],
                      "output": str(source)}, cpus=cpus, accelerated=True),
                type_name=point.vision_type, nsamples=settings.nsamples)
            if mmproj != source:
                add(Task(mmproj.name, "mmproj", str(mmproj), write_mmproj_from,
                         {"model_dir": model, "source": str(source), "vision_type": point.vision_type,
                          "reduction": runnable(point.reduction), "document": documents[point.vision_type],
                          "output": str(mmproj)}, after=(source.name,)))
        if not (shared / "evals" / f"{evaluation_key(point)}.json").is_file():
            add(Task(reference_path.name, "reference", str(reference_path), reference_logits,
                     {"model_dir": model, "data": str(data), "limit": settings.limit, "output": str(reference_path)},
                     cpus=cpus, accelerated=True), items=len(items))
            for start, stop in shards:
                path = shard_path(point, start, stop)
                add(Task(path.name, "evaluate", str(path), evaluate_shard,
                         {"model_dir": model, "text": str(text), "mmproj": str(mmproj), "runtime": point.runtime,
                          "reduction": point.reduction, "label": point.label, "data": str(data),
                          "limit": settings.limit, "start": start, "stop": stop, "reference": str(reference_path),
                          "llama_threads": settings.threads, "gpu_layers": settings.gpu_layers, "output": str(path)},
                         after=(text.name, mmproj.name, reference_path.name), cpus=cpus, accelerated=True),
                    type_name=point.type, reduction=point.reduction, items=stop - start)
        if point.runtime == "llama.cpp":
            timing = shared / "times" / f"{point_key(point)}.json"
            add(Task(timing.name, "time", str(timing), time_point,
                     {"text": str(text), "mmproj": str(mmproj), "image": str(image), "runs": settings.runs,
                      "decode_tokens": settings.decode_tokens, "flash_attn": point.flash_attn,
                      "llama_threads": settings.threads, "gpu_layers": settings.gpu_layers, "output": str(timing)},
                     after=(text.name, mmproj.name), cpus=cpus, timing=True),
                type_name=point.type, reduction=point.reduction, runs=settings.runs,
                decode_tokens=settings.decode_tokens)
    # timings last: each then has its machine to itself (no evaluation beside it), and the accuracy tasks keep every
    # worker busy meanwhile instead of waiting behind a timing
    accuracy = tuple(key for key, t in tasks.items() if not t.timing)
    tasks = {key: replace(t, after=accuracy) if t.timing else t for key, t in tasks.items()}
    if dry_run:
        graph = [{"kind": t.kind, "key": t.key, "what": _what(work[t.key]), "done": t.done, "after": list(t.after),
                  "seconds": None if machine is None else task_seconds(spec, t.kind, machine, **work[t.key])}
                 for t in ordered(list(tasks.values())) + [t for t in tasks.values() if t.done]]
        measured = [{"kind": "point", "key": point_key(p), "done": True} for p in points
                    if (shared / "points" / f"{point_key(p)}.json").is_file()]
        return SweepResult([], None, {}, graph + measured)
    started = []

    def on_task(task: Task) -> None:
        started.append(task)
        if on_point:
            on_point(len(started) - 1, len(tasks), f"{task.kind} {task.key[:40]}")

    records = executor.run(list(tasks.values()), on_task)

    rows = []
    (shared / "points").mkdir(exist_ok=True)
    for point in points:
        key = point_key(point)
        cached = shared / "points" / f"{key}.json"
        if cached.is_file():
            rows.append({"vision_type": "F16", **json.loads(cached.read_text())})   # rows from before the tower type
            continue
        text, mmproj = text_gguf(point.type), mmproj_gguf(point)
        merged = shared / "evals" / f"{evaluation_key(point)}.json"
        if not merged.is_file():
            with atomic_output(merged) as tmp:
                tmp.write_text(json.dumps(merge_shards([str(shard_path(point, *s)) for s in shards]), indent=2) + "\n")
        row = {"type": point.type.upper(), "vision_type": point.vision_type.upper(),
               "image_size": point.reduction.image_size,
               "token_reduction": "pool2" if point.reduction.pool else "none", "image_tokens": point.reduction.n_tokens,
               "runtime": point.runtime, "method": "export" if point.type == "f16" else settings.method,
               "text_gguf_mb": text.stat().st_size / 1e6, "mmproj_gguf_mb": mmproj.stat().st_size / 1e6,
               # the files, where impq package finds them: relative to the shared folder
               "text_gguf": str(text.relative_to(shared)), "mmproj_gguf": str(mmproj.relative_to(shared)),
               "flash_attn": point.flash_attn, "key": key, **json.loads(merged.read_text())}
        row["total_mb"] = row["text_gguf_mb"] + row["mmproj_gguf_mb"]
        if point.runtime == "llama.cpp":
            timing = json.loads((shared / "times" / f"{key}.json").read_text())
            figures = timing["figures"]
            row.update(llama_device=figures["backend"]["device"], repack=figures["backend"]["repack"])
            row.update({name: figures[name]["median"] for name in
                        ("image_encode_s", "ttft_s", "prompt_tokens_per_s", "decode_tokens_per_s")})
            row.update(peak_rss_mb=figures["peak_rss_mb"],
                       **{k: timing[k] for k in ("timing_node", "timing_start", "timing_end")})
        else:
            row.update(llama_device=None, repack=None, image_encode_s=None, ttft_s=None, prompt_tokens_per_s=None,
                       decode_tokens_per_s=None, peak_rss_mb=None, timing_node=None, timing_start=None,
                       timing_end=None)
        cost = ModelCost.from_gguf_pair(text, mmproj)
        if point.reduction.pool:
            cost = ModelCost(**{**asdict(cost), "pooled": True})
        phone = PHONE_FIT.estimate(cost, device, PROMPT_TEXT_TOKENS)
        row.update(phone_image_encode_s=phone["image_encode_s"]["value"], phone_ttft_s=phone["ttft_s"]["value"],
                   phone_ttft_s_low=phone["ttft_s"]["low"], phone_ttft_s_high=phone["ttft_s"]["high"],
                   phone_decode_tokens_per_s=phone["decode_tokens_per_s"]["value"],
                   phone_prompt_tokens_per_s=phone["prefill_tokens_per_s"]["value"])
        with atomic_output(cached) as tmp:
            tmp.write_text(json.dumps(row, indent=2) + "\n")
        rows.append(row)
    if on_point:
        on_point(len(tasks), len(tasks), "done")

    native = vision_reduction(spec.vision)
    for row in rows:
        row["original"] = (row["type"] == "F16" and row.get("vision_type", "F16") == "F16"
                           and row["image_size"] == native.image_size and row["token_reduction"] == "none")
    recommended = recommend(rows, settings)
    files = _write_outputs(out, spec, rows, recommended, settings, documents, text_gguf, mmproj_gguf, points)
    return SweepResult(rows, recommended, files, records)


def type_recipes(types, settings: SweepSettings, calib: Path, data: Path) -> dict[str, Recipe]:
    """Each weight type's recipe: F16 is an export (method none), a grid impq quantize's with the sweep's method,
    calibration and sample count, and `bpwB` its budgeted mix at B bits per decoder weight (its sensitivity
    measured on the last items of the sweep's data, which the points' first items never reach). Every point of a
    type runs its type's recipe."""
    def recipe(t: str) -> Recipe:
        if t == "f16":
            return export_recipe("f16", "f16")
        common = {"method": settings.method, "calib": str(calib), "nsamples": settings.nsamples}
        if mix_bpw(t) is not None:
            return Recipe.from_flags(target_bpw=mix_bpw(t), sensitivity_data=str(data), **common)
        return Recipe.from_flags(type=t, bits=GRIDS[t].bits, **common)

    return {t: recipe(t) for t in dict.fromkeys(["f16", *types])}


def recommend(rows: list[dict], settings: SweepSettings) -> dict | None:
    """The most accurate point that llama.cpp runs within the budgets (phone time to first token, file size);
    ties go to the lower KLD, then the faster phone estimate, then the faster measured time to first token (which
    decides between flash-attention settings)."""
    fits = [r for r in rows if r["runtime"] == "llama.cpp"
            and (settings.budget_ttft_ms is None or r["phone_ttft_s"] * 1000 <= settings.budget_ttft_ms)
            and (settings.budget_size_mb is None or r["total_mb"] <= settings.budget_size_mb)]
    return min(fits, key=lambda r: (-r["accuracy"], r["mean_kld"], r["phone_ttft_s"], r["ttft_s"]), default=None)


COLUMNS = ("type", "vision_type", "image_size", "token_reduction", "image_tokens", "runtime", "method", "accuracy", "mean_kld",
           "top1_agreement", "eval_items", "image_encode_s", "ttft_s", "prompt_tokens_per_s", "decode_tokens_per_s",
           "peak_rss_mb", "text_gguf_mb", "mmproj_gguf_mb", "total_mb", "phone_image_encode_s", "phone_ttft_s",
           "phone_ttft_s_low", "phone_ttft_s_high", "phone_prompt_tokens_per_s", "phone_decode_tokens_per_s",
           "flash_attn", "llama_device", "repack", "original", "key", "timing_node", "timing_start", "timing_end")


def _write_outputs(out: Path, spec: ModelSpec, rows: list[dict], recommended: dict | None, settings: SweepSettings,
                   recipes: dict,
                   text_gguf, mmproj_gguf, points: list[Point]) -> dict:
    from .plots import write_plots

    with atomic_output(out / "sweep.csv") as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    # the calibration file by name: no path of this machine in the outputs
    record = {"model": spec.name, "impq": __version__,
              "settings": {**asdict(settings), "calib": settings.calib and Path(settings.calib).name},
              # each weight type's recipe: every point of the type ran it (no machine path in it)
              "recipes": {t.upper(): document for t, document in recipes.items()},
              "device_profile": DEVICES[settings.device_profile].name, "points": rows,
              "recommended": recommended and {k: recommended[k] for k in COLUMNS}}
    with atomic_output(out / "sweep.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    files = {"csv": str(out / "sweep.csv"), "json": str(out / "sweep.json"),
             **write_plots(out, rows, DEVICES[settings.device_profile].name)}
    if recommended is not None:
        point = next(p for p in points if p.type.upper() == recommended["type"] and p.flash_attn ==
                     recommended["flash_attn"] and p.vision_type.upper() == recommended["vision_type"] and
                     p.reduction == VisionReduction(recommended["image_size"], spec.vision.patch_size,
                                                    recommended["token_reduction"] == "pool2"))
        tower = "" if point.vision_type == "f16" else f"-tower-{point.vision_type.upper()}"
        stem = f"{spec.name}-{point.type.upper()}{tower}-{point.reduction.label}"
        with atomic_output(out / "recommended") as tmp:
            tmp.mkdir()
            shutil.copy(text_gguf(point.type), tmp / f"{stem}.gguf")
            shutil.copy(mmproj_gguf(point), tmp / f"mmproj-{stem}.gguf")
            (tmp / "point.json").write_text(json.dumps({k: recommended[k] for k in COLUMNS}, indent=2) + "\n")
        files["recommended"] = str(out / "recommended")
    return files
