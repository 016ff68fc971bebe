"""The recipe: what one `impq quantize` run does, as one typed, versioned YAML document.

The CLI flags build one; `impq quantize --recipe FILE` runs one (flags given beside it override it and are
recorded). Every artifact carries the recipe without a machine path (the GGUF's `impq.settings`, the safetensors
folder's impq.json), so the same inputs give the same bytes from any folder; `<stem>.recipe.yaml` beside it adds
what was resolved on this machine (every tensor's type, the device used, library versions, input digests) and the
sha256 of each output file, which `impq reproduce RECIPE --check` compares against a fresh run.

Schema (version 1):

    schema_version: 1
    model: embedded:imp-tiny | <folder name>      # the model: the embedded one, or the checkpoint's folder name
    calibration: default | <file name>            # the shipped default for the model, or the file's name
    quantize:                                     # QuantizeSettings' fields (impq/quantize.py), calib excepted
      method: gptq
      bits: 4
      type: q4_k
      tensor_types: ["attn_v=q6_k"]               # llama-quantize style overrides, the last match wins
      ...
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import yaml

from .errors import ImpqError

SCHEMA_VERSION = 1
EMBEDDED_MODEL = "embedded:imp-tiny"
DEFAULT_CALIBRATION = "default"
PATH_FIELDS = ("sensitivity_data", "sensitivity_file")
TOP_LEVEL = ("schema_version", "model", "calibration", "quantize", "resolved", "outputs")
# the least value of each counted quantize setting: the command line's options take their `min` from here
MINIMUMS = {"nsamples": 1, "seqlen": 8, "iterations": 1, "sensitivity_prompts": 1, "group_size": 1,
            "block_size": 1}


def model_reference(model_dir: Path) -> str:
    from .defaults import is_embedded_model

    return EMBEDDED_MODEL if is_embedded_model(model_dir) else Path(model_dir).resolve().name


def calibration_reference(calib: Path, model_dir: Path) -> str:
    from .defaults import default_calib_data

    return DEFAULT_CALIBRATION if Path(calib).resolve() == default_calib_data(model_dir).resolve() else Path(calib).name


def input_recipe(settings, model_dir: Path) -> dict:
    """The recipe of a run, with no machine path in it."""
    quantize = {k: v for k, v in dataclasses.asdict(settings).items() if k != "calib"}
    for key in PATH_FIELDS:                    # files beside the calibration: their names, never a folder
        if quantize.get(key) is not None:
            quantize[key] = Path(quantize[key]).name
    return {"schema_version": SCHEMA_VERSION, "model": model_reference(model_dir),
            "calibration": calibration_reference(Path(settings.calib), model_dir), "quantize": quantize}


def read_recipe(path: Path) -> dict:
    """A recipe file, checked: its schema version, its sections and every quantize field's name (values are
    checked when the settings are built from it)."""
    from .quantize import QuantizeSettings

    if not path.is_file():
        raise ImpqError(path, "recipe not found")
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ImpqError(path, f"recipe is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ImpqError(path, f"recipe is not valid YAML: {getattr(err, 'problem', None) or err}{where}") from None
    if not isinstance(recipe, dict):
        raise ImpqError(path, "recipe needs a mapping at the top (see impq/recipe.py for the schema)")
    unknown = [key for key in recipe if key not in TOP_LEVEL]
    if unknown:
        raise ImpqError(path, f"recipe key {unknown[0]!r} is unknown at the top level (known: {', '.join(TOP_LEVEL)}; "
                              f"quantize settings go under 'quantize')")
    if not isinstance(recipe.get("quantize"), dict):
        raise ImpqError(path, "recipe needs a 'quantize' mapping (see impq/recipe.py for the schema)")
    version = recipe.get("schema_version")
    if not isinstance(version, int) or version < 1:
        raise ImpqError(path, f"recipe schema_version {version!r}: expected a positive integer")
    if version > SCHEMA_VERSION:
        raise ImpqError(path, f"recipe schema_version {version} is newer than this impq's ({SCHEMA_VERSION}): "
                              "upgrade impq")
    known = {f.name for f in dataclasses.fields(QuantizeSettings)} - {"calib"}
    unknown = sorted(set(recipe["quantize"]) - known)
    if unknown:
        raise ImpqError(path, f"recipe key {unknown[0]!r} under 'quantize' is unknown; known: {', '.join(sorted(known))}")
    return recipe


def settings_from_recipe(recipe: dict, calib: Path, overrides: dict, path: Path):
    """QuantizeSettings from a recipe's quantize section and the flags given beside it (which win; a --type given
    alone brings its own bit width)."""
    from .export.gguf_file import canonical_type_name
    from .quant.grids import GRIDS
    from .quantize import QuantizeSettings

    values = {**recipe["quantize"], **overrides}
    if overrides.get("type") and "bits" not in overrides:
        values["bits"] = GRIDS[canonical_type_name(overrides["type"], GRIDS, "--type")].bits
    try:
        return QuantizeSettings.from_bits(
            values.pop("bits", 4), values.pop("type", None), format=values.pop("format", "gguf"),
            layout=values.pop("layout", None), group_size=values.pop("group_size", None),
            embeddings=values.pop("embeddings", None), vision=values.pop("vision", None), calib=str(calib), **values)
    except ImpqError as err:
        raise ImpqError(path, f"recipe: {err.problem}") from None


def recipe_run(recipe_path: Path, model: Path | None, calib: Path | None, overrides: dict):
    """(model folder, QuantizeSettings) of a recipe: the embedded model and the default calibration resolve by
    themselves; a recipe of another checkpoint or calibration file needs MODEL / --calib, given here."""
    from .defaults import default_calib_data, default_model_dir

    recipe = read_recipe(Path(recipe_path))
    if model is None:
        if recipe.get("model") != EMBEDDED_MODEL:
            raise ImpqError(recipe_path, f"the recipe's model is {recipe.get('model')!r}: give its checkpoint folder")
        model = default_model_dir()
    if calib is None:
        if recipe.get("calibration") != DEFAULT_CALIBRATION:
            raise ImpqError(recipe_path, f"the recipe's calibration is {recipe.get('calibration')!r}: pass --calib FILE")
        calib = default_calib_data(model)
    return Path(model), settings_from_recipe(recipe, calib, overrides, Path(recipe_path))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def output_files(artifacts: dict) -> list[Path]:
    """Every file of an artifact (a GGUF pair, or a safetensors folder's files), in a stable order."""
    files = []
    for value in artifacts.values():
        path = Path(value)
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return files


def write_resolved_recipe(path: Path, recipe: dict, resolved: dict, outputs: dict[str, str]) -> None:
    path.write_text(yaml.safe_dump({**recipe, "resolved": resolved, "outputs": outputs}, sort_keys=False))


def reproduce(recipe_path: Path, model: Path | None = None, calib: Path | None = None,
              out: Path | None = None) -> dict:
    """Re-run a recipe and compare every output's sha256 with the recipe's record and with the files beside it."""
    import tempfile

    from .calib import calibration_digest
    from .models.layouts import read_spec
    from .quantize import quantize_model

    recipe_path = Path(recipe_path)
    if recipe_path.is_dir():
        found = sorted(recipe_path.glob("*.recipe.yaml"))
        if len(found) != 1:
            raise ImpqError(recipe_path, f"expected one *.recipe.yaml in this folder, found {len(found)}")
        recipe_path = found[0]
    recipe = read_recipe(recipe_path)
    if not isinstance(recipe.get("outputs"), dict) or not recipe["outputs"]:
        raise ImpqError(recipe_path, "the recipe records no outputs to compare (write it with impq quantize)")
    model_dir, settings = recipe_run(recipe_path, model, calib, {})
    spec = read_spec(model_dir)
    digest = spec.digest()
    recorded_digest = (recipe.get("resolved") or {}).get("model_digest")
    if recorded_digest and digest != recorded_digest:
        raise ImpqError(model_dir, "this checkpoint is not the recipe's model (its digest differs)")
    recorded_calibration = (recipe.get("resolved") or {}).get("calibration_digest")
    calibration_matches = recorded_calibration == calibration_digest(settings.calib)
    with tempfile.TemporaryDirectory(prefix="impq-reproduce-") as scratch:
        target = Path(out) if out is not None else Path(scratch)
        quantize_model(model_dir, target, settings, verify_items=0)
        files = []
        for name, recorded in recipe["outputs"].items():
            rerun, present = target / name, recipe_path.parent / name
            files.append({"file": name, "recorded": recorded,
                          "rerun_matches": rerun.is_file() and sha256_file(rerun) == recorded,
                          "present_matches": sha256_file(present) == recorded if present.is_file() else None})
    return {"recipe": str(recipe_path), "files": files, "calibration_matches": calibration_matches,
            "identical": calibration_matches and all(f["rerun_matches"] and f["present_matches"] is not False
                                                     for f in files)}
