"""A size budget (--target-bpw, --target-size): each decoder tensor group's type chosen among the candidate types
to minimise the predicted KLD (its measured sensitivity) within the bytes the budget leaves for the decoder, as
the target counts them. `prepare_budget` checks the budget and reads what it needs before any long work;
`budgeted_plan` measures (or takes) the sensitivities and allocates."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from .errors import ImpqError
from .measure.sensitivity import measure_sensitivity, measure_vision_sensitivity, read_measurement, read_sensitivity
from .quant.allocate import Option, allocate
from .quant.grids import GRIDS
from .quant.plan import TensorPlan, decoder_part, plan_llm, plan_model, plan_vision


FLOAT = "f16"                         # a vision group's option to stay at 16 bits


@dataclasses.dataclass
class VisionChoice:
    """--budget-includes-vision: the vision side's groups chosen with the decoder's, from the same candidates or
    16 bits, by their sensitivity measured through images (measure_vision_sensitivity)."""
    candidates: dict                  # candidate type -> the vision side's plan at it
    float_bytes: dict                 # vision tensor -> its bytes at 16 bits
    images: list                      # calibration images (each group's RTN importance)
    items: list                       # VQA items the sensitivity is measured on


@dataclasses.dataclass
class Budget:
    candidates: dict                  # candidate type -> its plan
    decoder_bytes: int                # what the decoder tensors (and a chosen vision side's) may take
    beside: int                       # the artifact's bytes besides those tensors (0 for --target-bpw)
    measured: list                    # the measurement sequences, or (--sensitivity-file) the groups already read
    vision: VisionChoice | None = None


def prepare_budget(lmm, recipe, plan, target, model_dir, digest: str, longest_recorded: dict, samples: list
                   ) -> Budget:
    """The decoder's byte budget under the recipe's (checked against the smallest possible mix) and the sensitivity
    inputs, read before any work. `longest_recorded`: the artifact's recorded recipe at its longest, which a
    --target-size counts in the header."""
    spec, wanted = lmm.spec, recipe.budget
    candidates = {t: plan_llm(lmm.llm, GRIDS[t]) for t in wanted.candidate_types}
    decoder = decoder_part(plan)
    weights = sum(spec.numel(n) for n in decoder)
    smallest = sum(min(target.tensor_bytes(c[n]) for c in candidates.values()) for n in decoder)
    vision = _vision_choice(lmm, recipe, target, samples) if wanted.includes_vision else None
    if vision is not None:
        smallest += sum(min([target.tensor_bytes(c[n]) for c in vision.candidates.values()] + [size])
                        for n, size in vision.float_bytes.items())
    if wanted.target_size is not None:
        # the vision side's chosen tensors count against the budget like the decoder's, the rest of it beside
        beside = target.bytes_beside_decoder(spec, recipe, plan, digest, longest_recorded,
                                             None if vision is None else dict.fromkeys(vision.float_bytes, "f16"))
        if vision is not None:
            beside -= sum(vision.float_bytes.values())
        budget = wanted.target_size - beside
        if budget < smallest:
            raise ImpqError(None, f"--target-size {wanted.target_size}: below the smallest possible file, "
                                  f"{beside + smallest} bytes with {', '.join(wanted.candidate_types)}")
    else:
        beside, budget = 0, int(wanted.target_bpw * weights / 8)
        if budget < smallest:
            raise ImpqError(None, f"--target-bpw {wanted.target_bpw}: below the smallest possible mix of "
                                  f"{', '.join(wanted.candidate_types)} ({8 * smallest / weights:.3f} bits per "
                                  "weight)")
    if wanted.sensitivity_file:            # read (and checked) before any work
        measured = read_sensitivity(wanted.sensitivity_file, list(candidates), list(next(iter(candidates.values()))))
    else:
        measured = _measurement_prompts(lmm, model_dir, wanted, recipe.calibration.seqlen)
    return Budget(candidates, budget, beside, measured, vision)


def _vision_choice(lmm, recipe, target, samples) -> VisionChoice:
    """What choosing the vision side's types needs, checked before any work: calibration images and VQA items."""
    from .datasets.jsonl import looks_like_jsonl
    from .defaults import default_eval_data
    from .measure.vqa import read_vqa_jsonl
    from .models.preprocess import load_image

    wanted = recipe.budget
    images = [load_image(s.image) for s in samples if s.image is not None][:recipe.calibration.nsamples]
    if not images:
        raise ImpqError(None, "--budget-includes-vision chooses the vision side's types, quantized on the "
                              "calibration's images: this calibration has none")
    data = wanted.sensitivity_data or default_eval_data()
    if not looks_like_jsonl(Path(data)):
        raise ImpqError(data, "--budget-includes-vision measures the vision side through images: give "
                              "--sensitivity-data as a VQA JSONL")
    linears = lmm.vision_linears()
    candidates = {t: plan_vision(linears, GRIDS[t]) for t in wanted.candidate_types}
    float_bytes = {n: target.tensor_bytes(TensorPlan(None, GRIDS["q8_0"], m.in_features, m.out_features))
                   for n, m in linears.items()}
    return VisionChoice(candidates, float_bytes, images, read_vqa_jsonl(data)[-wanted.sensitivity_prompts:])


def _measurement_prompts(lmm, model_dir, wanted, seqlen: int) -> list:
    """The sensitivity's measurement sequences (measure/sensitivity.read_measurement), disjoint from the calibration:
    the file's last ones, since impq eval and the report's verification take the first."""
    from .defaults import default_eval_data, is_embedded_model

    data = wanted.sensitivity_data
    if data is None:
        if not is_embedded_model(model_dir):
            raise ImpqError(None, "a size budget measures sensitivity: give --sensitivity-data (a VQA JSONL or a text "
                                  "file, disjoint from the calibration data)")
        data = default_eval_data()
    return read_measurement(lmm, data, wanted.sensitivity_prompts, seqlen, from_end=True)


def budgeted_plan(lmm, embeddings, budget: Budget, recipe, aliases: dict, tensor_bytes) -> tuple[dict, dict]:
    """The plan that minimises the predicted KLD (measured sensitivity per tensor group) within the budget's bytes
    of decoder tensors (`tensor_bytes(plan entry)`: the target's count), and what the report says about it."""
    candidates, wanted = budget.candidates, recipe.budget
    method = "gptq" if recipe.method.name in ("gptq", "signround") else "rtn"
    reference = None
    if wanted.sensitivity == "scaled":
        reference = recipe.target.type if recipe.target.type in candidates else list(candidates)[len(candidates) // 2]
    if wanted.sensitivity_file:
        groups, prompts = budget.measured, []
    else:
        prompts = budget.measured
        groups = measure_sensitivity(lmm, embeddings, prompts, list(candidates), method, reference_type=reference)
    options = [[Option(t, sum(tensor_bytes(candidates[t][n]) for n in g.tensors), g.kld[t])
                for t in candidates] for g in groups]
    plans = [candidates] * len(groups)
    vision, vision_groups = budget.vision, []
    if vision is not None:
        vision_groups = measure_vision_sensitivity(lmm, vision.images, vision.items, list(vision.candidates))
        # each vision group may also stay at 16 bits: the file's own type where nothing is chosen
        options += [[Option(t, sum(tensor_bytes(vision.candidates[t][n]) for n in g.tensors), g.kld[t])
                     for t in vision.candidates] + [Option(FLOAT, sum(vision.float_bytes[n] for n in g.tensors), 0.0)]
                    for g in vision_groups]
        plans += [vision.candidates] * len(vision_groups)
    chosen = groups + vision_groups
    choice = allocate(options, budget.decoder_bytes)
    overrides = [(f"^{re.escape(name)}$", plans[i][options[i][c].type][name].requested)
                 for i, g in enumerate(chosen) for name in g.tensors for c in [choice[i]]
                 if options[i][c].type != FLOAT]
    # the allocation as exact-name overrides, then the user's own --tensor-type overrides, which win; the vision
    # side as the recipe plans it, or where it is chosen, only what the allocation names
    plan = plan_model(lmm.llm, lmm.vision_linears(), recipe.grid(), None if vision else recipe.vision_grid(),
                      overrides + recipe.tensor_overrides(), aliases)
    decoder = decoder_part(plan)
    decoder_bytes = sum(tensor_bytes(entry) for entry in decoder.values())
    vision_bytes = 0 if vision is None else sum(tensor_bytes(plan[n]) if n in plan else size
                                                for n, size in vision.float_bytes.items())
    achieved = decoder_bytes + vision_bytes
    weights = sum(lmm.spec.numel(n) for n in decoder)
    allocation = {"target_bpw": wanted.target_bpw, "budget_bytes": budget.decoder_bytes, "achieved_bytes": achieved,
                  "achieved_bpw": 8 * decoder_bytes / weights,
                  "predicted_kld": sum(options[i][c].kld for i, c in enumerate(choice)),
                  "groups": {"+".join(g.tensors): options[i][choice[i]].type for i, g in enumerate(chosen)},
                  "sensitivity_method": method, "sensitivity_prompts": len(prompts),
                  "sensitivity_positions": sum(p.embeds.shape[1] - p.first for p in prompts),
                  "sensitivity": wanted.sensitivity, "sensitivity_reference_type": reference,
                  "sensitivity_groups": [dataclasses.asdict(g) for g in groups]}
    if vision is not None:
        # measured by RTN through images at the answer position; 0 KLD at 16 bits
        allocation.update(vision_bytes=vision_bytes, vision_sensitivity_items=len(vision.items),
                          vision_sensitivity_groups=[dataclasses.asdict(g) for g in vision_groups])
    if wanted.target_size is not None:
        allocation.update(target_size=wanted.target_size, predicted_file_bytes=budget.beside + achieved)
    return plan, allocation
