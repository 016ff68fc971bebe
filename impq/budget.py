"""A size budget (--target-bpw, --target-size): each decoder tensor group's type chosen among the candidate types
to minimise the predicted KLD (its measured sensitivity) within the bytes the budget leaves for the decoder, as
the target counts them. `prepare_budget` checks the budget and reads what it needs before any long work;
`budgeted_plan` measures (or takes) the sensitivities and allocates."""

from __future__ import annotations

import dataclasses
import re

from .errors import ImpqError
from .measure.sensitivity import measure_sensitivity, read_measurement, read_sensitivity
from .quant.allocate import Option, allocate
from .quant.grids import GRIDS
from .quant.plan import decoder_part, plan_llm, plan_model


@dataclasses.dataclass
class Budget:
    candidates: dict                  # candidate type -> its plan
    decoder_bytes: int                # what the decoder tensors may take
    beside: int                       # the artifact's bytes besides the decoder tensors (0 for --target-bpw)
    measured: list                    # the measurement sequences, or (--sensitivity-file) the groups already read


def prepare_budget(lmm, recipe, plan, target, model_dir, digest: str, longest_recorded: dict) -> Budget:
    """The decoder's byte budget under the recipe's (checked against the smallest possible mix) and the sensitivity
    inputs, read before any work. `longest_recorded`: the artifact's recorded recipe at its longest, which a
    --target-size counts in the header."""
    spec, wanted = lmm.spec, recipe.budget
    candidates = {t: plan_llm(lmm.llm, GRIDS[t]) for t in wanted.candidate_types}
    decoder = decoder_part(plan)
    weights = sum(spec.numel(n) for n in decoder)
    smallest = sum(min(target.tensor_bytes(c[n]) for c in candidates.values()) for n in decoder)
    if wanted.target_size is not None:
        beside = target.bytes_beside_decoder(spec, recipe, plan, digest, longest_recorded)
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
    return Budget(candidates, budget, beside, measured)


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
    choice = allocate(options, budget.decoder_bytes)
    overrides = [(f"^{re.escape(name)}$", candidates[options[i][c].type][name].requested)
                 for i, g in enumerate(groups) for name in g.tensors for c in [choice[i]]]
    # the allocation as exact-name overrides, then the user's own --tensor-type overrides, which win; the vision
    # side as the recipe plans it
    plan = plan_model(lmm.llm, lmm.vision_linears(), recipe.grid(), recipe.vision_grid(),
                      overrides + recipe.tensor_overrides(), aliases)
    decoder = decoder_part(plan)
    achieved = sum(tensor_bytes(entry) for entry in decoder.values())
    weights = sum(lmm.spec.numel(n) for n in decoder)
    allocation = {"target_bpw": wanted.target_bpw, "budget_bytes": budget.decoder_bytes, "achieved_bytes": achieved,
                  "achieved_bpw": 8 * achieved / weights,
                  "predicted_kld": sum(options[i][c].kld for i, c in enumerate(choice)),
                  "groups": {"+".join(g.tensors): options[i][choice[i]].type for i, g in enumerate(groups)},
                  "sensitivity_method": method, "sensitivity_prompts": len(prompts),
                  "sensitivity_positions": sum(p.embeds.shape[1] - p.first for p in prompts),
                  "sensitivity": wanted.sensitivity, "sensitivity_reference_type": reference,
                  "sensitivity_groups": [dataclasses.asdict(g) for g in groups]}
    if wanted.target_size is not None:
        allocation.update(target_size=wanted.target_size, predicted_file_bytes=budget.beside + achieved)
    return plan, allocation
