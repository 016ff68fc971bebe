"""The `impq` command line: parsing and printing only; the work is done by the importable library."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import ImpqError
from .export.gguf_file import canonical_type_name
from .recipe import ALL_FLAGS, Budget, Calibration, Method, Recipe, Safetensors, least

_DEFAULT, _BUDGET = Recipe(), Budget()     # the CLI's defaults are the recipe's

app = typer.Typer(help="Quantize and export small multimodal models (Imp, Bunny, LLaVA) for llama.cpp on phones.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
testing_app = typer.Typer(help="Small random-weight checkpoints in the real layouts, for tests and benchmarks.",
                          no_args_is_help=True)
app.add_typer(testing_app, name="testing")
data_app = typer.Typer(help="Task data: the procedural shapes VQA task.", no_args_is_help=True)
app.add_typer(data_app, name="data")

# progress and tables go to stderr, so that --json leaves stdout holding one JSON object
console = Console(stderr=True)


def _progress() -> Progress:
    # off where stderr is not a terminal: there a transient bar only leaves a blank line before any error line
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True, disable=not console.is_terminal)


def _text_option():
    return typer.Option(None, "--text", help="The pair's text-model GGUF, whatever its name (the mmproj is found "
                                             "beside it unless --mmproj names it).")


def _mmproj_option():
    return typer.Option(None, "--mmproj", help="The pair's mmproj GGUF, whatever its name.")


def _image_size_option():
    return typer.Option(None, "--image-size", min=1, help="Input resolution (a multiple of the patch size, at most "
                                                          "the native one; position embeddings interpolated "
                                                          "bicubically); default: native.")


def _token_reduction_option():
    return typer.Option("none", "--token-reduction", help="none | pool2 (2x2 average pooling of the projected "
                                                          "tokens; llama.cpp runs it for a 24x24 patch grid only).")


def _flash_attn_option():
    return typer.Option("off", "--flash-attn", help="on | off | auto (llama.cpp's default, which is on for its CPU "
                                                    "backend): it speeds up image encoding and prefill but can slow "
                                                    "decoding with many image tokens in the context.")


def _llama_device_option():
    return typer.Option("auto", "--device", help="Where llama.cpp runs: auto (the GPU, all layers and the mmproj, "
                                                 "where this llama-cpp-python build can offload; else the CPU), cpu, "
                                                 "gpu.")


def _ray_address_option():
    return typer.Option(None, "--ray-address", help="--executor ray: the cluster (host:port, ray://host:port, auto); "
                                                    "default: a local cluster of this machine.")


def _gpu_layers_option():
    return typer.Option(None, "--gpu-layers", help="Text-model layers llama.cpp offloads to the GPU (-1: all); "
                                                   "overrides --device.")


def _template_option():
    from .families import TEXT_FAMILIES

    return typer.Option(None, "--template", help="Prompt format for a pair whose GGUF has no chat template: "
                                                 f"{', '.join(TEXT_FAMILIES)} (Imp/LLaVA templates); it also "
                                                 "replaces the GGUF's own.")


def _gpu_layers(device: str, gpu_layers: Optional[int]) -> int:
    from .runtime.llamacpp import resolve_gpu_layers
    return resolve_gpu_layers(device, gpu_layers)


def _emit(as_json: bool, payload: dict, table: Table | None = None) -> None:
    if as_json:
        print(json.dumps(payload, indent=2, default=str))
    elif table is not None:
        Console().print(table)


@testing_app.command("make-model")
def make_model_cmd(
    layout: str = typer.Option(..., help="imp-phi2 | imp-llava-phi2 | imp-qwen2 | imp-phi3 | llava-clip | llava-siglip"),
    out: Path = typer.Option(..., help="Checkpoint folder to write."),
    full_size: bool = typer.Option(False, "--full-size", help="Real imp-v1-3b dimensions (imp-phi2 only; ~5.6 GB)."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
):
    """Write a checkpoint folder with random weights in a real layout."""
    from .models.testing import TEST_LAYOUTS, make_model

    if layout not in TEST_LAYOUTS:
        raise ImpqError(None, f"unknown layout {layout!r}; choose one of {', '.join(TEST_LAYOUTS)}")
    if full_size and layout != "imp-phi2":
        raise ImpqError(None, "--full-size is available for imp-phi2 (imp-v1-3b dimensions) only")
    with _progress() as progress:
        task = progress.add_task(f"writing {layout}", total=None)
        make_model(layout, out, full_size=full_size, seed=seed, progress=lambda _: progress.advance(task))
    console.print(f"wrote {out}")


@app.command("inspect")
def inspect_cmd(model: Path = typer.Argument(..., help="Checkpoint folder."),
                as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")):
    """Detect a checkpoint's layout and show what impq will build from it."""
    from .models.layouts import read_spec

    spec = read_spec(model)
    info = {"layout": spec.layout, "family": spec.family, "llm_layers": spec.text_config.num_hidden_layers,
            "llm_hidden": spec.text_config.hidden_size, "vocab_rows": spec.text_config.vocab_size,
            "vision": spec.vision.kind, "vision_layers_stored": spec.vision.stored_layers,
            "vision_layers_run": spec.vision.config.num_hidden_layers, "image_size": spec.vision.image_size,
            "vision_tokens": spec.vision.n_tokens, "image_token_index": spec.image_token_index,
            "tensors": len(spec.tensors)}
    table = Table("property", "value", title=str(model))
    for key, value in info.items():
        table.add_row(key, str(value))
    _emit(as_json, info, table)


@app.command("export")
def export_cmd(
    model: Path = typer.Argument(..., help="Checkpoint folder (config.json, safetensors, tokenizer.json)."),
    out: Path = typer.Option(..., "--out", help="Folder for <name>-<TYPE>.gguf and mmproj-<name>-<TYPE>.gguf."),
    type_name: str = typer.Option("f16", "--type", help="f32 | f16 | q8_0 | q4_0 (round-to-nearest)."),
    mmproj_type: Optional[str] = typer.Option(None, "--mmproj-type", help="Type of the mmproj; default: --type."),
    image_size: Optional[int] = _image_size_option(),
    token_reduction: str = _token_reduction_option(),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Export a checkpoint to the GGUF pair llama.cpp loads (text model + mmproj)."""
    from .models.layouts import read_spec
    from .models.reduction import vision_reduction
    from .recipe import export_with_recipe

    spec = read_spec(model)
    reduction = vision_reduction(spec.vision, image_size, token_reduction)
    with _progress() as progress:
        task = progress.add_task(f"exporting {spec.name} ({type_name})", total=len(spec.tensors))
        result = export_with_recipe(spec, out, type_name, mmproj_type, on_tensor=lambda _: progress.advance(task),
                                    reduction=reduction)
    payload = {"text_gguf": str(result.text_path), "mmproj_gguf": str(result.mmproj_path),
               "text_bytes": result.text_path.stat().st_size, "mmproj_bytes": result.mmproj_path.stat().st_size,
               "seconds": round(result.seconds, 3), "layout": spec.layout, "source_digest": result.source_digest}
    table = Table("file", "MB", title=f"{spec.name}: {spec.layout} -> GGUF {type_name} in {result.seconds:.1f} s")
    table.add_row(str(result.text_path), f"{payload['text_bytes'] / 1e6:.2f}")
    table.add_row(str(result.mmproj_path), f"{payload['mmproj_bytes'] / 1e6:.2f}")
    _emit(as_json, payload, table)


@app.command("verify")
def verify_cmd(
    export_dir: Optional[Path] = typer.Argument(None, help="Folder holding one GGUF pair (one text GGUF and one "
                                                           "mmproj, any names); or name the files with --text/--mmproj."),
    reference: Path = typer.Option(..., "--reference", help="The checkpoint folder the pair was exported from."),
    text: Optional[Path] = _text_option(),
    mmproj: Optional[Path] = _mmproj_option(),
    image: Optional[list[Path]] = typer.Option(None, "--image", help="Image(s) to test; default: bundled samples."),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", help="Question(s); default: bundled prompts."),
    max_new_tokens: int = typer.Option(16, min=1, help="Greedy tokens compared per image and prompt."),
    threads: Optional[int] = typer.Option(None, min=1, help="llama.cpp threads (default: all cores)."),
    device: str = _llama_device_option(),
    gpu_layers: Optional[int] = _gpu_layers_option(),
    template: Optional[str] = _template_option(),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Run the pair in llama.cpp and the checkpoint in PyTorch on the same inputs; exit 1 if F16/Q8_0 disagree."""
    from .verify import verify_pair

    layers = _gpu_layers(device, gpu_layers)
    with _progress() as progress:
        task = progress.add_task("verifying", total=None)
        report = verify_pair(export_dir, reference, image, prompt, max_new_tokens, threads,
                             on_case=lambda _: progress.advance(task), text=text, mmproj=mmproj, gpu_layers=layers,
                             template=template)
    table = Table("metric", "value", title=f"{Path(report.text_gguf).name} vs PyTorch ({report.weight_type})")
    for key in ("top1_agreement", "max_abs_logit_diff", "max_abs_image_embedding_diff", "mean_kld",
                "generations_matched", "near_ties", "passed"):
        value = getattr(report, key)
        table.add_row(key, f"{value:.6g}" if isinstance(value, float) else str(value))
    _emit(as_json, report.to_dict(), table)
    if report.passed is False:
        console.print(f"[red]verify: {report.weight_type} export disagrees with the reference beyond "
                      f"tolerance {report.tolerance}[/red]")
        raise typer.Exit(1)


@data_app.command("shapes")
def shapes_cmd(
    split: str = typer.Option(..., help="eval | calib (disjoint seed ranges; training uses seeds from 0)."),
    n: int = typer.Option(..., min=1, help="Number of items."),
    out: Path = typer.Option(..., help="Folder for images/ and <split>.jsonl."),
):
    """Write a split of the shapes task: PNG images and a JSONL index, balanced over question types."""
    from .datasets.shapes import SPLIT_SEEDS, write_split

    if split not in SPLIT_SEEDS:
        raise ImpqError(None, f"unknown split {split!r}; choose one of {', '.join(SPLIT_SEEDS)}")
    console.print(f"wrote {write_split(split, out, n)}")


@app.command("eval")
def eval_cmd(
    model: Optional[Path] = typer.Argument(None, help="Checkpoint folder (PyTorch) or GGUF pair folder (llama.cpp); "
                                                      "default: the embedded imp-tiny."),
    text: Optional[Path] = _text_option(),
    mmproj: Optional[Path] = _mmproj_option(),
    data: Optional[Path] = typer.Option(None, help="VQA JSONL; default: eval/shapes/eval.jsonl."),
    reference: Optional[Path] = typer.Option(None, help="Full-precision checkpoint: adds mean KLD and top-1 agreement."),
    limit: Optional[int] = typer.Option(None, min=1, help="Evaluate the first N items only."),
    image_size: Optional[int] = _image_size_option(),
    token_reduction: str = _token_reduction_option(),
    threads: Optional[int] = typer.Option(None, min=1, help="llama.cpp threads (default: all cores)."),
    device: str = _llama_device_option(),
    gpu_layers: Optional[int] = _gpu_layers_option(),
    template: Optional[str] = _template_option(),
    results: Optional[Path] = typer.Option(None, help="Write the full report (every item) to this JSON file."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Accuracy on a VQA JSONL, overall and per question type; with --reference, divergence too."""
    from .defaults import default_eval_data, default_model_dir
    from .fileio import atomic_output, ensure_writable_dir
    from .measure.vqa import evaluate, load_answerer, read_vqa_jsonl

    model = model or (None if text or mmproj else default_model_dir())
    data = data or default_eval_data()
    items = read_vqa_jsonl(data)[:limit]
    if results is not None:
        ensure_writable_dir(results.parent)
    layers = _gpu_layers(device, gpu_layers)
    answerer = load_answerer(model, image_size, threads, text, mmproj, token_reduction, layers, template)
    evaluated = Path(model or text or mmproj)
    ref = load_answerer(reference, gpu_layers=layers) if reference else None
    with _progress() as progress:
        task = progress.add_task(f"evaluating {evaluated.name}", total=len(items))
        report = evaluate(answerer, items, model=evaluated.name, dataset=data.name, reference=ref,
                          on_item=lambda _: progress.advance(task))
    if results is not None:
        with atomic_output(results) as tmp:
            tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    summary = {k: v for k, v in report.to_dict().items() if k != "items"}
    table = Table("type", "n", "accuracy", title=f"{evaluated.name} on {data.name}: {report.accuracy:.1%}")
    for qtype, row in report.per_type.items():
        table.add_row(qtype, str(row["n"]), f"{row['accuracy']:.1%}")
    if report.mean_kld is not None:
        table.caption = f"mean KLD {report.mean_kld:.4g}, top-1 agreement {report.top1_agreement:.1%}"
    _emit(as_json, summary, table)


@app.command("bench")
def bench_cmd(
    export_dir: Optional[Path] = typer.Argument(None, help="Folder with one GGUF pair; default: the embedded imp-tiny "
                                                           "exported with --type to a temporary folder."),
    text: Optional[Path] = _text_option(),
    mmproj: Optional[Path] = _mmproj_option(),
    type_name: str = typer.Option("f16", "--type", help="Export type when no folder is given."),
    image: Optional[Path] = typer.Option(None, help="Image for the prompt; default: a bundled sample."),
    question: str = typer.Option("What is in the image?", help="Question for the prompt."),
    runs: int = typer.Option(5, min=1, help="Timed runs (after the warm-up)."),
    warmup: int = typer.Option(1, min=0, help="Untimed warm-up runs."),
    decode_tokens: int = typer.Option(32, min=2, help="Tokens generated per run (end-of-sequence ignored)."),
    threads: Optional[int] = typer.Option(None, min=1, help="llama.cpp threads (default: all cores)."),
    flash_attn: str = _flash_attn_option(),
    device: str = _llama_device_option(),
    gpu_layers: Optional[int] = _gpu_layers_option(),
    template: Optional[str] = _template_option(),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Image encode time, prompt and decode tokens/s, time to first token, peak RSS and file sizes in llama.cpp."""
    import tempfile

    from .measure.bench import bench_pair
    from .runtime.gguf_pair import resolve_pair
    from .runtime.llamacpp import resolve_flash_attn
    from .verify import default_images

    resolve_flash_attn(flash_attn)
    layers = _gpu_layers(device, gpu_layers)
    image = image or default_images()[0]
    with tempfile.TemporaryDirectory(prefix="impq-bench-") as scratch:
        if export_dir is None and text is None and mmproj is None:
            from .defaults import default_model_dir
            from .models.layouts import read_spec
            from .recipe import export_with_recipe

            export_dir = Path(scratch)
            export_with_recipe(read_spec(default_model_dir()), export_dir, type_name)
        text_path, mmproj_path = resolve_pair(export_dir, text, mmproj)
        with console.status(f"benchmarking {text_path.name} ({warmup} warm-up + {runs} runs)"):
            figures = bench_pair(text_path, mmproj_path, image, question, runs, warmup, decode_tokens, threads,
                                 flash_attn, layers, template)
    figures = {"text_gguf": str(text_path.name), "mmproj_gguf": str(mmproj_path.name), **figures}
    table = Table("figure", "median", "min", "max", title=f"{text_path.name}: {figures['prompt_tokens']} prompt tokens, "
                                                           f"{figures['threads']} threads, flash attention "
                                                           f"{figures['flash_attn']}, {figures['backend']['device']}"
                                                           f", repacking {'on' if figures['backend']['repack'] else 'off'}")
    for key in ("image_encode_s", "prefill_s", "ttft_s", "prompt_tokens_per_s", "decode_tokens_per_s"):
        row = figures[key]
        table.add_row(key, *(f"{row[k]:.4g}" for k in ("median", "min", "max")))
    table.caption = (f"peak RSS {figures['peak_rss_mb']:.0f} MB; files {figures['text_gguf_mb']:.2f} MB + "
                     f"{figures['mmproj_gguf_mb']:.2f} MB")
    _emit(as_json, figures, table)


@app.command("estimate")
def estimate_cmd(
    export_dir: Optional[Path] = typer.Argument(None, help="Folder with one GGUF pair; default: Imp-v1.5-3B-196 at "
                                                           "Q4_0, as recorded by bench/run_phone_fit.py."),
    text: Optional[Path] = _text_option(),
    mmproj: Optional[Path] = _mmproj_option(),
    device: Optional[list[str]] = typer.Option(None, help="Device profile(s); default: all."),
    text_tokens: int = typer.Option(40, min=0, help="Text tokens in the prompt besides the image."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Roofline estimate of decode and prompt speed, image encode time and time to first token on phone profiles,
    fitted on published llama.cpp phone measurements, each with its leave-one-out range."""
    from .measure.phone import DEVICES, IMP_V1_5_3B_196, ModelCost
    from .measure.phone_fit import PHONE_FIT, PUBLISHED, format_range, vision_kernels
    from .runtime.gguf_pair import resolve_pair

    names = device or list(DEVICES)
    unknown = [n for n in names if n not in DEVICES]
    if unknown:
        raise ImpqError(None, f"unknown device {unknown[0]!r}; choose from {', '.join(DEVICES)}")
    if export_dir is None and text is None and mmproj is None:
        cost, title = IMP_V1_5_3B_196, "Imp-v1.5-3B-196, Q4_0 text + F16 mmproj"
    else:
        pair = resolve_pair(export_dir, text, mmproj)
        cost, title = ModelCost.from_gguf_pair(*pair), f"{pair[0].name} + {pair[1].name}"
    rows = {n: PHONE_FIT.estimate(cost, DEVICES[n], text_tokens) for n in names}
    table = Table("device", "decode tok/s", "prompt tok/s", "image encode s", "TTFT s", title=title)
    figures = ("decode_tokens_per_s", "prefill_tokens_per_s", "image_encode_s", "ttft_s")
    for name, row in rows.items():
        table.add_row(DEVICES[name].name, *(format_range(row[k], 1) for k in figures))
    table.caption = ("llama.cpp on the CPU; ranges: leave-one-out error of the fit on published phone measurements "
                     f"(bench/results/phone_fit.md); image encode: {vision_kernels(cost)}")
    _emit(as_json, {"estimates": rows, "band": PHONE_FIT.band, "vision_kernels": vision_kernels(cost),
                    "published": PUBLISHED}, table)


@app.command("quantize")
def quantize_cmd(
    ctx: typer.Context,
    model: Optional[Path] = typer.Argument(None, help="Checkpoint folder; default: the embedded imp-tiny."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="Run this recipe (a <stem>.recipe.yaml or one "
                                                                 "written by hand; see impq/recipe.py); flags given "
                                                                 "beside it override it and are recorded."),
    bits: Optional[int] = typer.Option(None, help="Weight bits of the LLM's decoder layers (GGUF: 2 to 6, or 8; "
                                                  "safetensors: 2 to 8 as the layout allows); default: the --type's, "
                                                  f"else {_DEFAULT.target.bits}."),
    method: str = typer.Option(_DEFAULT.method.name, help="rtn | gptq | awq | signround (learned rounding)."),
    format: str = typer.Option(_DEFAULT.target.format, "--format", help="gguf (a GGUF pair for llama.cpp) | "
                               "safetensors (a transformers folder in a GPTQ/AWQ/compressed-tensors layout)."),
    type_name: Optional[str] = typer.Option(None, "--type", help="GGUF grid: q8_0 q6_k q5_k q5_0 q5_1 q4_k q4_0 "
                                                                 "q4_1 q3_k q2_k; default from --bits (4: q4_k)."),
    layout: Optional[str] = typer.Option(None, help="safetensors layout: compressed-tensors (default; transformers "
                                                    "loads it) | gptq | awq."),
    group_size: Optional[int] = typer.Option(None, min=least(Safetensors, "group_size"), help="safetensors: input "
                                             f"columns per scale (default {Safetensors().group_size})."),
    embeddings: Optional[str] = typer.Option(None, help="GGUF type of the token embedding and output head: q8_0 "
                                                        "(default), f16, f32."),
    vision: Optional[str] = typer.Option(None, help="GGUF type of the mmproj (vision tower, projector): f16 "
                                                    "(default), f32, or a GGUF grid (q8_0 .. q2_k), calibrated with "
                                                    "--method on the calibration's images, llama.cpp's width "
                                                    "fallbacks applied."),
    tensor_type: Optional[list[str]] = typer.Option(None, "--tensor-type", help="REGEX=TYPE: a GGUF type for the "
                                                    "decoder tensors whose GGUF name (blk.N.attn_v.weight) or "
                                                    "canonical name matches, as llama-quantize's --tensor-type, and "
                                                    "for the vision tensors it matches from the name's start "
                                                    "(v.blk.N.attn_q.weight, mm.0.weight); repeatable, the last "
                                                    "match wins."),
    target_bpw: Optional[float] = typer.Option(None, "--target-bpw", help="GGUF: mix the candidate types per tensor "
                                               "group to minimise the measured KLD within this many bits per "
                                               "decoder weight (real block bytes, fallbacks counted)."),
    target_size: Optional[str] = typer.Option(None, "--target-size", help="GGUF: the same within this size of the "
                                              "text GGUF, header and embeddings included (1.6GB, 500MB, 750MiB or "
                                              "bytes)."),
    budget_includes_vision: bool = typer.Option(_BUDGET.includes_vision, "--budget-includes-vision",
                                                help="--target-size counts the mmproj as well, and chooses the "
                                                "vision groups' types with the decoder's (by their sensitivity "
                                                "through images: --sensitivity-data must be a VQA JSONL)."),
    candidate_types: str = typer.Option(",".join(_BUDGET.candidate_types), "--candidate-types",
                                        help="Types --target-bpw chooses from."),
    sensitivity_data: Optional[Path] = typer.Option(None, "--sensitivity-data", help="A budget's measurement "
                                                    "data disjoint from the calibration: a VQA JSONL (the answer's "
                                                    "position) or a text file (every position of each paragraph); "
                                                    "default: the eval split (imp-tiny)."),
    sensitivity_prompts: int = typer.Option(_BUDGET.sensitivity_prompts, "--sensitivity-prompts",
                                            min=least(Budget, "sensitivity_prompts"),
                                            help="Measurement sequences (the file's last ones)."),
    sensitivity_file: Optional[Path] = typer.Option(None, "--sensitivity-file", help="A budget's sensitivity from "
                                                    "an earlier budgeted run's report.json (or impq sensitivity's "
                                                    "JSON) instead of measuring it again."),
    sensitivity: str = typer.Option(_BUDGET.sensitivity, "--sensitivity", help="scaled: measure each group's KLD "
                                    "at --type and scale it to the other candidates by the quantizer's output error "
                                    "(one pass per group); measured: measure every candidate."),
    out: Path = typer.Option(Path("quantized"), help="Output folder."),
    calib: Optional[Path] = typer.Option(None, help="Calibration JSONL ({image, prompt}) or text; default: the "
                                                    "shapes split for imp-tiny, calib_data/photos otherwise."),
    nsamples: int = typer.Option(_DEFAULT.calibration.nsamples, min=least(Calibration, "nsamples"),
                                 help="Calibration sequences."),
    seqlen: int = typer.Option(_DEFAULT.calibration.seqlen, min=least(Calibration, "seqlen"),
                               help="Longest calibration sequence (tokens, image tokens included)."),
    seed: int = typer.Option(_DEFAULT.seed, help="Seed of the calibration sampling."),
    damp: float = typer.Option(_DEFAULT.method.damp, help="GPTQ damping, as a fraction of the mean Hessian "
                                                          "diagonal."),
    act_order: bool = typer.Option(_DEFAULT.method.act_order, "--act-order", help="GPTQ: quantize columns by "
                                                                                  "decreasing activation."),
    static_groups: bool = typer.Option(_DEFAULT.method.static_groups, "--static-groups", help="GPTQ: block scales "
                                                                                              "from the original "
                                                                                              "weights."),
    device: str = typer.Option(_DEFAULT.method.device, help="Where calibration and quantization run: auto (a CUDA "
                                                            "GPU when torch sees one, else the CPU), cpu, cuda, "
                                                            "cuda:N, mps."),
    compute_dtype: str = typer.Option(_DEFAULT.method.compute_dtype, "--compute-dtype", help="The blocks' forward "
                                      "passes while quantizing: float32, or bfloat16 (2-3x faster on a CPU with "
                                      "AVX-512 BF16 or a GPU; Hessians and rounding stay float32)."),
    iterations: int = typer.Option(_DEFAULT.method.iterations, "--iterations", min=least(Method, "iterations"),
                                   help="--method signround: tuning steps per decoder block (AutoRound's default "
                                   "200; 50, its light recipe, took about half the time on SmolLM2-135M)."),
    verify_items: int = typer.Option(140, min=0, help="Eval items for the llama.cpp check (embedded model); 0 skips it."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Calibrated low-bit quantization of the LLM backbone onto an exact GGUF or safetensors grid, with recipe and
    report."""
    from .defaults import default_model_dir
    from .quantize import quantize_model
    from .recipe import recipe_run

    # the recipe's fields by their flag names (impq/recipe.py FLAGS), as the command line gives them
    converted = {"type": type_name, "tensor_types": list(tensor_type or []),
                 "target_size": None if target_size is None else _size_in_bytes(target_size),
                 "candidate_types": _comma_list(candidate_types, "--candidate-types"),
                 **{key: None if value is None else str(value) for key, value in
                    (("calib", calib), ("sensitivity_data", sensitivity_data), ("sensitivity_file", sensitivity_file))}}
    parameter = {"type": "type_name", "tensor_types": "tensor_type"}
    flags = {key: converted.get(key, ctx.params.get(parameter.get(key, key))) for key in ALL_FLAGS}
    given: list[str] = []
    if recipe is None:
        model = model or default_model_dir()
        run_recipe = Recipe.from_flags(**flags)
    else:
        # --calib is the recipe's input file, not a setting laid over it
        given = [key for key in flags if key != "calib" and getattr(
            ctx.get_parameter_source(parameter.get(key, key)), "name", None) == "COMMANDLINE"]
        model, run_recipe = recipe_run(recipe, model, calib, {key: flags[key] for key in given})
    with _progress() as progress:
        task = progress.add_task(f"{run_recipe.method.name} -> {run_recipe.grid().name}", total=None)
        report = quantize_model(model, out, run_recipe, verify_items=verify_items,
                                on_layer=lambda i, n: progress.update(task, completed=i + 1, total=n),
                                on_status=lambda text: progress.update(task, description=text),
                                flags_over_recipe=given)
    summary = {k: v for k, v in report.to_dict().items() if k != "layers"}
    summary["worst_layer_error"] = max(report.layers.values()) if report.layers else None
    summary["fallback_tensors"] = len(report.fallbacks)
    table = Table("figure", "value", title=", ".join(Path(p).name for p in report.artifacts.values()))
    for key in ("bits_per_weight_quantized", "bits_per_weight_file", "artifact_bytes", "quantize_seconds",
                "total_seconds", "peak_rss_mb", "worst_layer_error", "fallback_tensors"):
        value = summary[key]
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    for key, value in report.verification.items():
        table.add_row(f"verification {key}", f"{value:.4g}" if isinstance(value, float) else str(value))
    if report.fallbacks:
        kinds = sorted(set(report.fallbacks.values()))
        table.caption = f"{len(report.fallbacks)} tensors at another type (see the report): " + "; ".join(kinds)
    _emit(as_json, summary, table)


@app.command("sensitivity")
def sensitivity_cmd(
    model: Optional[Path] = typer.Argument(None, help="Checkpoint folder; default: the embedded imp-tiny."),
    types: str = typer.Option("q2_k,q3_k,q4_k,q6_k,q8_0", help="Candidate GGUF types, comma-separated."),
    method: str = typer.Option("gptq", help="rtn | gptq: the quantizer whose error is measured."),
    calib: Optional[Path] = typer.Option(None, help="Calibration file for the Hessians; default as impq quantize."),
    nsamples: int = typer.Option(16, min=1, help="Calibration sequences."),
    data: Optional[Path] = typer.Option(None, help="Measurement data disjoint from the calibration: a VQA JSONL (the "
                                                   "answer's position) or a text file (every position of each "
                                                   "paragraph); default: the shapes eval split (embedded model)."),
    limit: int = typer.Option(32, min=1, help="Measurement sequences."),
    seqlen: int = typer.Option(512, min=8, help="Longest calibration or measurement sequence (tokens)."),
    layers: Optional[str] = typer.Option(None, help="Only these decoder layers, comma-separated (default: all)."),
    reference_type: Optional[str] = typer.Option(None, "--reference-type", help="The type the scaled figures' rank "
                                                 "correlation is computed from (impq quantize --sensitivity scaled "
                                                 "measures --type); default: q4_k, or the middle candidate."),
    vision: bool = typer.Option(False, "--vision", help="Also the vision tower's and projector's groups (RTN, "
                                "measured at the answer position of the VQA --data prompts)."),
    out: Path = typer.Option(Path("sensitivity"), help="Folder for sensitivity.json and sensitivity.png."),
    threads: Optional[int] = typer.Option(None, min=1, help="Threads (torch and OpenMP); on Ray, each task's, and "
                                          "the CPUs it holds (default: all cores in-process, 1 on Ray)."),
    executor: str = typer.Option("in-process", "--executor", help="in-process | ray (one task per tensor group and "
                                 "candidate on a Ray cluster: pip install 'impq\\[ray]'; --vision's groups run here)."),
    ray_address: Optional[str] = _ray_address_option(),
    shared_dir: Optional[Path] = typer.Option(None, "--shared-dir", help="--executor ray: where tasks write their "
                                              "files (every node must read it); default: OUT/tasks."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Mean KLD of the next-token distribution when only one tensor group is quantized, per candidate type."""
    from .calib import calibration_embeddings, read_calibration
    from .defaults import default_calib_data, default_eval_data, default_model_dir
    from .fileio import atomic_output, ensure_writable_dir
    from .models.lmm import LMM
    from .measure.sensitivity import METHODS, measure_sensitivity, read_measurement, sensitivity_record
    from .measure.sensitivity_plot import write_sensitivity_plot
    from .sweep.graph import executor as graph_executor
    from .sweep.resolution import SWEEP_TYPES

    embedded = model is None
    model = model or default_model_dir()
    candidates = [canonical_type_name(t, [t for t in SWEEP_TYPES if t != "f16"], "--types")
                  for t in _comma_list(types, "--types")]
    if not candidates:
        raise ImpqError(None, "--types: give at least one candidate type")
    reference = (canonical_type_name(reference_type, candidates, "--reference-type") if reference_type
                 else "q4_k" if "q4_k" in candidates else candidates[len(candidates) // 2])
    if method not in METHODS:
        raise ImpqError(None, f"--method {method}: choose one of {', '.join(METHODS)}")
    runner = graph_executor(executor, ray_address, threads)
    if data is None and not embedded:
        raise ImpqError(None, "--data: give measurement data (a VQA JSONL or text) disjoint from the calibration data")
    calib = calib or default_calib_data(model)
    data = data or default_eval_data()
    samples = read_calibration(calib)                  # bad input fails here, before the long work
    lmm = LMM.from_folder(model)
    n_layers = len(lmm.llm.model.layers)
    chosen = None
    if layers is not None:
        try:
            chosen = [int(v) for v in _comma_list(layers, "--layers")]
        except ValueError:
            raise ImpqError(None, f"--layers {layers}: decoder layer numbers, comma-separated") from None
        if not chosen or any(not 0 <= i < n_layers for i in chosen):
            raise ImpqError(None, f"--layers {layers}: the model's decoder layers are 0 to {n_layers - 1}")
    measurements = read_measurement(lmm, data, limit, seqlen)
    vision_items, calib_images = [], []
    if vision:
        from .datasets.jsonl import looks_like_jsonl
        from .measure.vqa import read_vqa_jsonl
        from .models.preprocess import load_image

        if not looks_like_jsonl(Path(data)):
            raise ImpqError(data, "--vision measures through images: give --data as a VQA JSONL")
        vision_items = read_vqa_jsonl(data)[:limit]
        calib_images = [load_image(s.image) for s in samples if s.image is not None][:nsamples]
        if not calib_images:
            raise ImpqError(calib, "--vision needs calibration samples with images")
    ensure_writable_dir(out)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    calib_embeds = calibration_embeddings(lmm, samples, nsamples, seqlen)
    with _progress() as progress:
        task = progress.add_task(f"sensitivity ({method})", total=None)
        if runner.name == "in-process":
            results = measure_sensitivity(lmm, calib_embeds, measurements, candidates, method,
                                          lambda i, n: progress.update(task, completed=i), layers=chosen)
        else:
            from .sweep.sensitivity_tasks import SensitivityInputs, measure_sensitivity_tasks

            inputs = SensitivityInputs(str(Path(model).resolve()), str(Path(calib).resolve()), nsamples, seqlen,
                                       str(Path(data).resolve()), limit)
            results = measure_sensitivity_tasks(
                runner, inputs, candidates, method, chosen, ensure_writable_dir(shared_dir or out / "tasks"), threads,
                on_task=lambda t: progress.update(task, description=f"sensitivity: {t.kind} {t.key[:24]}"))
        if vision:
            from .measure.sensitivity import measure_vision_sensitivity

            progress.update(task, description="sensitivity (vision side, rtn)", completed=0)
            results += measure_vision_sensitivity(lmm, calib_images, vision_items, candidates,
                                                  lambda i, n: progress.update(task, completed=i))
    record = sensitivity_record(Path(model).name, method, candidates, Path(calib).name, len(calib_embeds),
                                Path(data).name, measurements, results, reference)
    with atomic_output(out / "sensitivity.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    write_sensitivity_plot(out / "sensitivity.png", results, candidates,
                           f"{Path(model).name}: {method}, {record['prompts']} prompts")
    table = Table("layer", "group", *[t.upper() for t in candidates], title=f"mean KLD, {out / 'sensitivity.json'}")
    for r in results:
        table.add_row(str(r.layer), r.kind, *[f"{r.kld[t]:.3g}" for t in candidates])
    correlation = record["proxy_rank_correlation"]
    if correlation["scaled_kld"] is not None:
        table.caption = (f"rank correlation with the measured KLD over {correlation['pairs']} pairs: output error "
                         f"{correlation['output_error']:.3f}, KLD scaled from {reference.upper()} "
                         f"{correlation['scaled_kld']:.3f}")
    _emit(as_json, record, table)


@app.command("package")
def package_cmd(
    source: Path = typer.Argument(..., help="An artifact folder (impq quantize or impq export output) or a sweep's "
                                            "folder (impq sweep-resolution output)."),
    out: Path = typer.Option(..., "--out", help="The bundle's folder (written whole or not at all)."),
    max_accuracy_drop: Optional[float] = typer.Option(None, "--max-accuracy-drop", help="From a sweep: the point "
                                                      "with the shortest phone time to first token within this many "
                                                      "accuracy points of the original F16 pair."),
    device_profile: str = typer.Option("snapdragon-8-gen-3", "--device-profile", help="The phone PHONE.md's "
                                       "threads and estimate are for."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """A phone bundle: the pair, its recipe, and PHONE.md (llama.cpp in Termux, llama.rn app settings, the phone
    estimate with its band)."""
    from .package import package

    bundle = package(source, out, device_profile, max_accuracy_drop)
    estimate = bundle["phone_estimate"]
    table = Table("file", "bytes", title=f"bundle in {out}: {bundle['chosen']}")
    for name, size in bundle["bytes"].items():
        table.add_row(name, str(size))
    table.caption = (f"{bundle['device_profile']}: time to first token {estimate['ttft_s']['value']:.1f} s, "
                     f"decode {estimate['decode_tokens_per_s']['value']:.1f} tokens/s (PHONE.md)")
    _emit(as_json, bundle, table)


@app.command("reproduce")
def reproduce_cmd(
    recipe: Path = typer.Argument(..., help="A <stem>.recipe.yaml written by impq quantize, or the folder that holds "
                                            "exactly one."),
    model: Optional[Path] = typer.Option(None, "--model", help="The checkpoint folder (not needed for the embedded "
                                                               "imp-tiny)."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="The calibration file (not needed for the default)."),
    check: bool = typer.Option(False, "--check", help="Compare each file's sha256 with the recipe's and with the "
                                                      "files beside it; exit 1 on any difference."),
    out: Optional[Path] = typer.Option(None, help="Keep the re-run's files here (default: a temporary folder)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Re-run the quantization a recipe describes, and with --check prove the same bytes come out."""
    from .reproduce import reproduce

    with console.status(f"re-running {recipe}"):
        result = reproduce(recipe, model, calib, out)
    table = Table("file", "recorded sha256", "re-run", "beside the recipe", title=f"reproduce {result['recipe']}")
    for row in result["files"]:
        table.add_row(row["file"], row["recorded"][:16], "same" if row["rerun_matches"] else "DIFFERENT",
                      {True: "same", False: "DIFFERENT", None: "absent"}[row["present_matches"]])
    _emit(as_json, result, table)
    if check and not result["identical"]:
        differing = [r["file"] for r in result["files"] if not r["rerun_matches"] or r["present_matches"] is False]
        if not result["calibration_matches"]:
            differing.insert(0, "the calibration digest")
        # print, not the console: one line whatever the terminal's width
        print(f"impq: reproduce: not the recipe's bytes: {', '.join(differing)}", file=sys.stderr)
        raise typer.Exit(1)


_SIZE_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30}


def _size_in_bytes(value: str) -> int:
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise ImpqError(None, f"--target-size {value}: write a size such as 1.6GB, 500MB, 750MiB or a byte count")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def _comma_list(value: str, option: str, kind=str) -> list:
    try:
        return [kind(part.strip()) for part in value.split(",") if part.strip()]
    except ValueError:
        raise ImpqError(None, f"{option} {value}: expected a comma-separated list of {kind.__name__} values") from None


@app.command("sweep-resolution")
def sweep_resolution_cmd(
    model: Optional[Path] = typer.Argument(None, help="Checkpoint folder; default: the embedded imp-tiny."),
    resolutions: Optional[str] = typer.Option(None, help="Input sizes in pixels, comma-separated (multiples of the "
                                                         "patch size, at most the native one); default: native, 3/4 "
                                                         "and 1/2."),
    token_reduction: str = typer.Option("none", "--token-reduction", help="Comma-separated: none, pool2 (2x2 "
                                                                          "pooling; PyTorch-only unless the grid is "
                                                                          "24x24)."),
    types: str = typer.Option("f16,q4_k", help="Weight types of the LLM, comma-separated: f16, the GGUF grids "
                                               "(q8_0 q6_k q5_k q5_0 q5_1 q4_k q4_0 q4_1 q3_k q2_k), and bpwB: a "
                                               "budgeted mix at B bits per decoder weight (impq quantize "
                                               "--target-bpw B; its sensitivity measured on --data's last items)."),
    vision_types: str = typer.Option("f16", "--vision-types", help="The mmproj's types, comma-separated: f16, or GGUF "
                                     "grids (the tower and projector calibrated with --method on --calib's images, "
                                     "llama.cpp's width fallbacks applied); each mmproj is written once per type and "
                                     "resolution."),
    method: str = typer.Option(_DEFAULT.method.name, help="Quantization method for the quantized types."),
    budget_ttft: Optional[float] = typer.Option(None, "--budget-ttft", min=0, help="Largest time to first token on "
                                                                                 "the phone estimate, in ms."),
    budget_size: Optional[float] = typer.Option(None, "--budget-size", min=0, help="Largest text GGUF + mmproj, MB."),
    device_profile: str = typer.Option("snapdragon-8-gen-3", "--device-profile", help="Phone profile of the "
                                                                                     "estimate (impq estimate)."),
    flash_attn: str = typer.Option("off", "--flash-attn", help="Comma-separated: on, off, auto (llama.cpp's default, "
                                                               "on for its CPU backend); each is timed, the "
                                                               "recommendation says which to use."),
    data: Optional[Path] = typer.Option(None, help="VQA JSONL; default: eval/shapes/eval.jsonl."),
    limit: Optional[int] = typer.Option(140, min=1, help="Eval items per point."),
    runs: int = typer.Option(3, min=1, help="Timed bench runs per point."),
    calib: Optional[Path] = typer.Option(None, help="Calibration file for the quantized types."),
    nsamples: int = typer.Option(_DEFAULT.calibration.nsamples, min=least(Calibration, "nsamples"),
                                 help="Calibration sequences."),
    threads: Optional[int] = typer.Option(None, min=1, help="Each task's threads, torch, OpenMP and llama.cpp alike, "
                                          "and the CPUs it holds on Ray (default: all cores in-process, "
                                          "1 on Ray)."),
    device: str = _llama_device_option(),
    gpu_layers: Optional[int] = _gpu_layers_option(),
    out: Path = typer.Option(Path("sweep"), help="Output folder (cache, CSV, JSON, plots, recommended pair)."),
    executor: str = typer.Option("in-process", "--executor", help="in-process (one task after another here) | ray "
                                 "(the same tasks on a Ray cluster: pip install 'impq\\[ray]')."),
    ray_address: Optional[str] = _ray_address_option(),
    shared_dir: Optional[Path] = typer.Option(None, "--shared-dir", help="Where tasks write their files (every node "
                                              "must read it); default: --out. Runs that share it resume each other."),
    shard_items: Optional[int] = typer.Option(None, "--shard-items", min=1, help="Items per evaluation task "
                                              "(default: a point's items in one)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the task graph (each task, and whether it is "
                                 "already done) and write nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Accuracy, speed, size and phone estimate over resolution x token reduction x weight type, with plots and
    the best configuration under the budgets; resumable, in-process or on a Ray cluster."""
    from .defaults import default_eval_data, default_model_dir
    from .models.layouts import read_spec
    from .sweep.graph import executor as graph_executor
    from .sweep.resolution import SweepSettings, plan_points, run_sweep

    model = model or default_model_dir()
    settings = SweepSettings(
        resolutions=None if resolutions is None else _comma_list(resolutions, "--resolutions", int),
        token_reductions=_comma_list(token_reduction, "--token-reduction"), types=_comma_list(types, "--types"),
        vision_types=_comma_list(vision_types, "--vision-types"),
        method=method, calib=None if calib is None else str(calib), nsamples=nsamples, limit=limit, runs=runs,
        threads=threads, gpu_layers=_gpu_layers(device, gpu_layers), flash_attn=_comma_list(flash_attn, "--flash-attn"),
        device_profile=device_profile, budget_ttft_ms=budget_ttft,
        budget_size_mb=budget_size, shard_items=shard_items)
    points = plan_points(read_spec(model), settings)           # every value is checked before anything is written
    if dry_run:
        _print_sweep_estimate(model, out, settings, data or default_eval_data(), shared_dir, len(points), as_json)
        return
    runner = graph_executor(executor, ray_address, threads)
    with _progress() as progress:
        task = progress.add_task("sweep", total=len(points))
        result = run_sweep(model, out, settings, data or default_eval_data(),
                           on_point=lambda i, n, label: progress.update(task, completed=i, total=n, description=label),
                           executor=runner, shared_dir=shared_dir)
    table = Table("point", "runtime", "accuracy", "KLD", "TTFT s", "phone TTFT s", "MB",
                  title=f"{len(result.rows)} points in {out}")
    for row in result.rows:
        tower = "" if row["vision_type"] == "F16" else f" tower-{row['vision_type']}"
        table.add_row(f"{row['type']}{tower} {row['image_size']}px {row['token_reduction']} "
                      f"fa-{row['flash_attn'] or '-'}",
                      row["runtime"],
                      f"{row['accuracy']:.1%}", f"{row['mean_kld']:.3g}",
                      "-" if row["ttft_s"] is None else f"{row['ttft_s']:.3f}", f"{row['phone_ttft_s']:.3f}",
                      f"{row['total_mb']:.1f}")
    best = result.recommended
    table.caption = ("no llama.cpp point meets the budgets" if best is None else
                     f"recommended: {best['type']} (tower {best['vision_type']}) at {best['image_size']} px, token "
                     f"reduction {best['token_reduction']}, flash attention {best['flash_attn']} -> "
                     f"{result.files['recommended']}")
    _emit(as_json, {"points": result.rows, "recommended": best, "files": result.files}, table)


def _print_sweep_estimate(model, out, settings, data, shared_dir, n_points: int, as_json: bool) -> None:
    """--dry-run: the task graph, what is cached, and the time it would take here and on Ray workers like this
    machine (sweep/estimate.py)."""
    from dataclasses import asdict

    from .measure.phone import measure_machine
    from .sweep.estimate import SLOWER_DAYS, Machine, wall_seconds
    from .sweep.resolution import run_sweep

    machine = Machine(**measure_machine(settings.threads or os.cpu_count() or 1, seconds=0.5))
    graph = run_sweep(model, out, settings, data, shared_dir=shared_dir, dry_run=True, machine=machine).tasks
    to_run = [t for t in graph if not t["done"] and t["seconds"] is not None]
    walls = {"in-process": wall_seconds(to_run, 1), **{f"ray, {n} workers": wall_seconds(to_run, n)
                                                       for n in (2, 4, 16)}}
    table = Table("task", "tasks", "done", "to run", "estimated s", title=f"the sweep's task graph ({n_points} "
                  f"points); this machine: {machine.peak_gflops:.0f} GFLOP/s FP32, {machine.bandwidth_gbs:.0f} GB/s")
    for kind in dict.fromkeys(t["kind"] for t in graph):
        of_kind = [t for t in graph if t["kind"] == kind]
        done = sum(t["done"] for t in of_kind)
        table.add_row(kind, str(len(of_kind)), str(done), str(len(of_kind) - done),
                      f"{sum(t['seconds'] for t in of_kind if not t['done']):.0f}")
    table.caption = "estimated wall time: " + "; ".join(
        f"{name} {_duration(s)} (to {_duration(s * SLOWER_DAYS)} on a slow day)" for name, s in walls.items())
    _emit(as_json, {"points": n_points, "tasks": graph, "machine": asdict(machine),
                    "estimated_wall_s": walls, "slow_day_factor": SLOWER_DAYS}, table)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


# typer >= 0.29 raises its own copy of click's exceptions, older typer raises click's: find the class through typer
_CLICK_EXCEPTION = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _usage_line(err) -> str:
    """click's usage error as one line: the command it concerns, then click's own message."""
    message = " ".join(err.format_message().split())
    ctx = getattr(err, "ctx", None)
    command = ctx.command_path.removeprefix("impq").strip() if ctx is not None else ""
    return f"{command}: {message}" if command else message


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", is_eager=True, help="Print impq's version and exit."),
          max_image_pixels: Optional[int] = typer.Option(None, "--max-image-pixels", help="Refuse images "
                                                         "with more pixels than this (default 89478485, PIL's "
                                                         "limit against decompression bombs).")):
    from .models.preprocess import DEFAULT_MAX_IMAGE_PIXELS, set_max_image_pixels
    # every command starts at the default, also where one process runs several (the tests)
    set_max_image_pixels(DEFAULT_MAX_IMAGE_PIXELS)
    if max_image_pixels is not None:
        set_max_image_pixels(max_image_pixels)
    if version:
        from . import __version__
        print(f"impq {__version__}")
        raise typer.Exit(0)


def main() -> None:
    try:
        code = app(standalone_mode=False, prog_name="impq")
    except ImpqError as err:
        print(f"impq: error: {' '.join(str(err).splitlines())}", file=sys.stderr)
        sys.exit(2)
    except _CLICK_EXCEPTION as err:
        if type(err).__name__ == "NoArgsIsHelpError":     # `impq` or a group alone: its help, as --help would
            print(err.format_message())
            sys.exit(0)
        print(f"impq: error: {_usage_line(err)}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("impq: interrupted; no partial outputs were kept", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
