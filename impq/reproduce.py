"""`impq reproduce`: re-run the recipe a `<stem>.recipe.yaml` records and compare every output's sha256 with the
recipe's record and with the files beside it."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .calib import calibration_digest
from .errors import ImpqError
from .models.layouts import read_spec
from .quantize import quantize_model
from .recipe import calibration_path, read_document, recipe_run, sha256_file


def reproduce(recipe_path: Path, model: Path | None = None, calib: Path | None = None,
              out: Path | None = None) -> dict:
    recipe_path = Path(recipe_path)
    if recipe_path.is_dir():
        found = sorted(recipe_path.glob("*.recipe.yaml"))
        if len(found) != 1:
            raise ImpqError(recipe_path, f"expected one *.recipe.yaml in this folder, found {len(found)}")
        recipe_path = found[0]
    document = read_document(recipe_path)
    if not isinstance(document.get("outputs"), dict) or not document["outputs"]:
        raise ImpqError(recipe_path, "the recipe records no outputs to compare (write it with impq quantize)")
    model_dir, recipe = recipe_run(recipe_path, model, calib, {})
    digest = read_spec(model_dir).digest()
    resolved = document.get("resolved") or {}
    if resolved.get("model_digest") and digest != resolved["model_digest"]:
        raise ImpqError(model_dir, "this checkpoint is not the recipe's model (its digest differs)")
    calibration_matches = resolved.get("calibration_digest") == calibration_digest(calibration_path(recipe,
                                                                                                     model_dir))
    with tempfile.TemporaryDirectory(prefix="impq-reproduce-") as scratch:
        target = Path(out) if out is not None else Path(scratch)
        # the artifact carries the recipe as the file states it, in the schema the original run wrote
        quantize_model(model_dir, target, recipe, verify_items=0,
                       carried={k: v for k, v in document.items() if k not in ("resolved", "outputs")})
        files = []
        for name, recorded in document["outputs"].items():
            rerun, present = target / name, recipe_path.parent / name
            files.append({"file": name, "recorded": recorded,
                          "rerun_matches": rerun.is_file() and sha256_file(rerun) == recorded,
                          "present_matches": sha256_file(present) == recorded if present.is_file() else None})
    return {"recipe": str(recipe_path), "files": files, "calibration_matches": calibration_matches,
            "identical": calibration_matches and all(f["rerun_matches"] and f["present_matches"] is not False
                                                     for f in files)}
