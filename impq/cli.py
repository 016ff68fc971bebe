"""The `impq` command line: parsing and printing only; the work is done by the importable library."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import ImpqError

app = typer.Typer(help="Quantize and export small multimodal models (Imp, Bunny, LLaVA) for llama.cpp on phones.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
testing_app = typer.Typer(help="Small random-weight checkpoints in the real layouts, for tests and benchmarks.",
                          no_args_is_help=True)
app.add_typer(testing_app, name="testing")

# progress and tables go to stderr, so that --json leaves stdout holding one JSON object
console = Console(stderr=True)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


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
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Export a checkpoint to the GGUF pair llama.cpp loads (text model + mmproj)."""
    from .export.pair import export_pair
    from .models.layouts import read_spec

    spec = read_spec(model)
    with _progress() as progress:
        task = progress.add_task(f"exporting {spec.name} ({type_name})", total=len(spec.tensors))
        result = export_pair(spec, out, type_name, mmproj_type, on_tensor=lambda _: progress.advance(task))
    payload = {"text_gguf": str(result.text_path), "mmproj_gguf": str(result.mmproj_path),
               "text_bytes": result.text_path.stat().st_size, "mmproj_bytes": result.mmproj_path.stat().st_size,
               "seconds": round(result.seconds, 3), "layout": spec.layout, "source_digest": result.source_digest}
    table = Table("file", "MB", title=f"{spec.name}: {spec.layout} -> GGUF {type_name} in {result.seconds:.1f} s")
    table.add_row(str(result.text_path), f"{payload['text_bytes'] / 1e6:.2f}")
    table.add_row(str(result.mmproj_path), f"{payload['mmproj_bytes'] / 1e6:.2f}")
    _emit(as_json, payload, table)


@app.command("verify")
def verify_cmd(
    export_dir: Path = typer.Argument(..., help="Folder holding one exported GGUF pair."),
    reference: Path = typer.Option(..., "--reference", help="The checkpoint folder the pair was exported from."),
    image: Optional[list[Path]] = typer.Option(None, "--image", help="Image(s) to test; default: bundled samples."),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", help="Question(s); default: bundled prompts."),
    max_new_tokens: int = typer.Option(16, help="Greedy tokens compared per image and prompt."),
    threads: Optional[int] = typer.Option(None, help="llama.cpp threads (default: all cores)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Run the pair in llama.cpp and the checkpoint in PyTorch on the same inputs; exit 1 if F16/Q8_0 disagree."""
    from .verify import verify_pair

    with _progress() as progress:
        task = progress.add_task("verifying", total=None)
        report = verify_pair(export_dir, reference, image, prompt, max_new_tokens, threads,
                             on_case=lambda _: progress.advance(task))
    table = Table("metric", "value", title=f"{Path(report.text_gguf).name} vs PyTorch ({report.weight_type})")
    for key in ("top1_agreement", "max_abs_logit_diff", "max_abs_image_embedding_diff", "mean_kld",
                "generations_matched", "passed"):
        value = getattr(report, key)
        table.add_row(key, f"{value:.6g}" if isinstance(value, float) else str(value))
    _emit(as_json, report.to_dict(), table)
    if report.passed is False:
        console.print(f"[red]verify: {report.weight_type} export disagrees with the reference beyond "
                      f"tolerance {report.tolerance}[/red]")
        raise typer.Exit(1)


def main() -> None:
    try:
        code = app(standalone_mode=False)
    except ImpqError as err:
        print(f"impq: error: {err}", file=sys.stderr)
        sys.exit(2)
    except click.ClickException as err:
        err.show()
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt):
        print("impq: interrupted; no partial outputs were kept", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
