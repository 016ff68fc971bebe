"""`impq sensitivity` as a task graph (sweep/graph.py), for a Ray cluster: the same steps as
measure/sensitivity.measure_sensitivity, each a task whose file any executor finds.

- statistics (one): the full-precision calibration pass, each measured layer's groups and Hessians to a file;
- reference (one): the full-precision measurement pass, the inputs of the measured layers and the log-probs;
- figures (one per tensor group and distinct candidate): the group quantized alone onto the candidate's grids,
  its output error and mean KLD; these run in parallel.

The driver assembles the groups' rows from the figures exactly as the in-process measurement does, so both give
the same sensitivity.json (with one thread a task on both: GPTQ's sums depend on the thread count).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import __version__
from ..calib import calibration_digest, calibration_embeddings, read_calibration
from ..fileio import atomic_output
from ..measure.sensitivity import (Candidate, GroupSensitivity, Reference, assemble_group, group_candidates,
                                   group_figures, layer_statistics, read_measurement)
from ..models.layouts import read_spec
from ..models.lmm import LMM, decoder_name
from ..quant.grids import GRIDS
from ..quant.plan import plan_llm
from .graph import Task, task_key


@dataclass(frozen=True)
class SensitivityInputs:
    """What every task rebuilds its model, calibration and measurement sequences from (picklable, hashable)."""
    model_dir: str
    calib: str
    nsamples: int
    seqlen: int
    data: str
    limit: int


@functools.lru_cache(maxsize=1)
def _model(model_dir: str) -> LMM:
    """A worker's model, kept for its next task (every figures task restores the weights it changed)."""
    return LMM.from_folder(model_dir)


@functools.lru_cache(maxsize=1)
def _reference(model_dir: str, path: str) -> Reference:
    return Reference.load(_model(model_dir), path)


@functools.lru_cache(maxsize=4)
def _plan(model_dir: str, type_name: str):
    return plan_llm(_model(model_dir).llm, GRIDS[type_name])


def _layer_file(statistics: str, index: int) -> Path:
    return Path(statistics).with_suffix("") / f"layer-{index}.pt"


def write_statistics(inputs: SensitivityInputs, layers: list[int], output: str, threads: int | None) -> None:
    """Each measured layer's groups and Hessians (its own file), then `output`, the list of groups per layer:
    written last, so that its existence means every layer file is whole."""
    lmm = _model(inputs.model_dir)
    calib = calibration_embeddings(lmm, read_calibration(inputs.calib), inputs.nsamples, inputs.seqlen)
    groups_of = {}
    for index, groups, hessians in layer_statistics(lmm, calib, layers):
        path = _layer_file(output, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp:
            torch.save(hessians, tmp)
        groups_of[index] = groups
    with atomic_output(Path(output)) as tmp:
        tmp.write_text(json.dumps({"layers": groups_of}) + "\n")


def write_reference(inputs: SensitivityInputs, layers: list[int], output: str, threads: int | None) -> None:
    lmm = _model(inputs.model_dir)
    measurements = read_measurement(lmm, inputs.data, inputs.limit, inputs.seqlen)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(Path(output)) as tmp:
        Reference(lmm, measurements, layers).save(tmp)


def write_figures(inputs: SensitivityInputs, statistics: str, reference: str, layer: int, group: list[str],
                  type_name: str, measured: bool, method: str, output: str, threads: int | None) -> None:
    """One group and candidate: {"output_error", "kld"} (kld null where the candidate is scaled, not measured)."""
    lmm = _model(inputs.model_dir)
    names = [decoder_name(layer, name) for name in group]
    plan = _plan(inputs.model_dir, type_name)
    candidate = Candidate(type_name, tuple(plan[n].grid for n in names), type_name, measured)
    hessians = torch.load(_layer_file(statistics, layer), weights_only=True)
    linears = dict(lmm.llm.model.layers[layer].named_modules())
    error, kld = group_figures(_reference(inputs.model_dir, reference), layer, {n: linears[n] for n in group},
                               hessians, candidate, method)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(Path(output)) as tmp:
        tmp.write_text(json.dumps({"output_error": error, "kld": kld}) + "\n")


def measure_sensitivity_tasks(executor, inputs: SensitivityInputs, types: list[str], method: str,
                              layers: list[int] | None, shared: Path, threads: int | None,
                              reference_type: str | None = None,
                              on_task: Callable[[Task], None] | None = None) -> list[GroupSensitivity]:
    """measure_sensitivity's rows, computed by `executor`'s tasks under `shared` (every node must read it)."""
    spec = read_spec(inputs.model_dir)
    lmm = _model(inputs.model_dir)
    chosen = list(range(len(lmm.llm.model.layers))) if layers is None else sorted(layers)
    cpus = threads or 1
    model_digest = spec.digest()
    statistics_key = task_key(model_digest, calibration_digest(inputs.calib), inputs.nsamples, inputs.seqlen, chosen,
                             __version__)
    # the measurement data as the calibration's is keyed: its file and every image it names
    reference_key = task_key(model_digest, calibration_digest(inputs.data), inputs.limit, inputs.seqlen, chosen,
                             __version__)
    statistics = shared / "sensitivity" / f"statistics-{statistics_key}.json"
    reference = shared / "sensitivity" / f"reference-{reference_key}.pt"
    arguments = {"inputs": inputs, "layers": chosen}
    executor.run([Task(statistics.name, "statistics", str(statistics), write_statistics,
                       {**arguments, "output": str(statistics)}, cpus=cpus, accelerated=True),
                  Task(reference.name, "reference", str(reference), write_reference,
                       {**arguments, "output": str(reference)}, cpus=cpus, accelerated=True)], on_task)

    groups_of = json.loads(statistics.read_text())["layers"]
    plans = {t: _plan(inputs.model_dir, t) for t in types}
    rows, tasks = [], []
    for index in chosen:
        for group in groups_of[str(index)]:
            names = [decoder_name(index, name) for name in group]
            candidates = group_candidates(names, types, plans, reference_type)
            outputs = {}
            for c in candidates:
                if c.same_as != c.type_name:
                    continue
                key = task_key(statistics_key, reference_key, index, group, c.type_name, c.measured, method)
                path = shared / "sensitivity" / "figures" / f"{key}.json"
                outputs[c.type_name] = path
                tasks.append(Task(path.name, "figures", str(path), write_figures,
                                  {"inputs": inputs, "statistics": str(statistics), "reference": str(reference),
                                   "layer": index, "group": group, "type_name": c.type_name, "measured": c.measured,
                                   "method": method, "output": str(path)},
                                  after=(statistics.name, reference.name), cpus=cpus, accelerated=True))
            rows.append((index, names, group, candidates, outputs))
    executor.run(tasks, on_task)

    def figures(outputs: dict[str, Path]) -> dict:
        read = {t: json.loads(p.read_text()) for t, p in outputs.items()}
        return {t: (r["output_error"], r["kld"]) for t, r in read.items()}

    return [assemble_group(index, names, group, candidates, figures(outputs), reference_type)
            for index, names, group, candidates, outputs in rows]
