"""Per-tensor sensitivity: how far the model's next-token distribution moves (mean KLD against full precision)
when only one tensor group is quantized to a candidate type with the method that will be used.

Groups are the tensors that read one input (q/k/v, gate/up, and Phi-2's q/k/v with fc1, which share the parallel
block's layernorm output): they share a Hessian, and an allocation gives them one decision. Each (group, type) is
quantized from full precision with its Hessian from the calibration inputs, the measurement sequences (disjoint
from the calibration data) run from that group's decoder layer to the logits, and the group is restored; types
whose fallbacks write the same grids as a type already measured share its figure.

`reference_type` measures one type per group and scales it to the others by the quantizer's own output error:
to second order, a small perturbation's KLD is proportional to its squared output error, tr(dW H dW^T) summed
over the group, so KLD(t) = KLD(ref) * error(t) / error(ref). The measured gain carries what the error alone
cannot (where in the network the group sits and how the following layers amplify it); measure_sensitivity
without it measures every type, which is how the scaled figures' rank correlation is checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..models.lmm import LMM, decoder_name
from .divergence import kl_terms
from .rank_correlation import spearman
from ..quant.error import output_error
from ..quant.gptq import gptq
from ..quant.grids import GRIDS
from ..quant.plan import plan_llm
from ..quant.rtn import rtn
from ..quant.statistics import InputStatistics

METHODS = ("rtn", "gptq")


@dataclass
class Measurement:
    """One measurement sequence: the LLM's input embeddings [1, n, hidden], compared from position `first` on
    (a VQA prompt: its last position, where the answer is predicted; a text: every position)."""
    embeds: torch.Tensor
    first: int


@dataclass
class GroupSensitivity:
    layer: int
    tensors: list[str]             # canonical names
    kind: str                      # the group's linear names within the layer, e.g. "q_proj+k_proj+v_proj"
    kld: dict[str, float]          # requested type -> mean KLD against full precision
    written_as: dict[str, str]     # requested type -> the type the plan writes (width fallbacks)
    output_error: dict[str, float] = field(default_factory=dict)   # type -> sum of tr(dW H dW^T) over the group
    measured: list[str] = field(default_factory=list)   # the types whose KLD was measured (the rest are scaled)


def read_measurement(lmm: LMM, path: str | Path, limit: int, seqlen: int = 512, from_end: bool = False
                     ) -> list[Measurement]:
    """A VQA JSONL's first (`from_end`: last) `limit` items (image + question up to the answer), or a text file's
    paragraphs likewise (up to `seqlen` tokens each, every position compared)."""
    from ..calib import read_calibration
    from ..datasets.jsonl import looks_like_jsonl
    from .vqa import read_vqa_jsonl
    from ..models.preprocess import load_image

    if looks_like_jsonl(Path(path)):
        items = read_vqa_jsonl(path)
        prompts = [lmm.prompt_embeddings(load_image(item.image), item.question)
                   for item in (items[-limit:] if from_end else items[:limit])]
        return [Measurement(p, p.shape[1] - 1) for p in prompts]
    embed = lmm.llm.get_input_embeddings()
    out = []
    with torch.no_grad():
        samples = read_calibration(path)
        for sample in samples[-limit:] if from_end else samples[:limit]:
            ids = lmm.tokenizer.encode(sample.text)[:seqlen]
            if len(ids) > 1:
                out.append(Measurement(embed(torch.tensor(ids)).unsqueeze(0), 0))
    return out


def sensitivity_record(model: str, method: str, types: list[str], calibration: str, calibration_sequences: int,
                       measurement: str, measurements: list[Measurement], results: list[GroupSensitivity],
                       reference_type: str) -> dict:
    """`impq sensitivity`'s JSON (sensitivity.json), which read_sensitivity reads back."""
    from dataclasses import asdict

    return {"model": model, "method": method, "types": types, "calibration": calibration,
            "calibration_sequences": calibration_sequences, "measurement": measurement,
            "prompts": len(measurements), "positions": sum(m.embeds.shape[1] - m.first for m in measurements),
            "proxy_rank_correlation": proxy_rank_correlation(results, types, reference_type),
            "groups": [asdict(r) for r in results]}


def read_sensitivity(path: str | Path, types: list[str], tensors: list[str]) -> list[GroupSensitivity]:
    """Sensitivities measured earlier: `impq sensitivity`'s JSON, or an `impq quantize` report of a budgeted run
    (its allocation's sensitivity_groups). Every group must have a figure for each of `types`, and the groups
    must cover exactly the quantized `tensors`."""
    import json

    from ..errors import ImpqError

    path = Path(path)
    try:
        record = json.loads(path.read_text())
        rows = record["groups"] if isinstance(record.get("groups"), list) else record["allocation"]["sensitivity_groups"]
        groups = [GroupSensitivity(**row) for row in rows]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ImpqError(path, f"not a sensitivity file (impq sensitivity's JSON or a budgeted run's report): {err}") from None
    for group in groups:
        missing = [t for t in types if t not in group.kld]
        if missing:
            raise ImpqError(path, f"no sensitivity at {missing[0]} for {group.tensors[0]}: measure the candidate "
                                  "types this run chooses from")
    covered = sorted(t for g in groups for t in g.tensors)
    if covered != sorted(tensors):
        raise ImpqError(path, "its tensor groups are not this model's quantized tensors")
    return groups


def _linears(layer: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def _input_statistics(module: nn.Module, forwards: list[Callable[[], object]]) -> tuple[list[list[str]], dict, list]:
    """`module`'s linears grouped by the input they share, each one's mean X^T X over what the forwards feed
    them, and what each forward returns."""
    results = []
    with InputStatistics(module) as statistics:
        for forward in forwards:
            results.append(forward())
            statistics.next_pass()
    return statistics.groups(), statistics.mean_hessians(), results


def _layer_statistics(layer: nn.Module, inputs: list[tuple[torch.Tensor, dict]]) -> tuple[list[list[str]], dict, list]:
    """A decoder layer's groups and Hessians on the calibration inputs, and its full-precision outputs (the next
    layer's inputs): one pass through the model in all."""
    return _input_statistics(layer, [lambda h=hidden, k=kwargs: (layer(h, **k), k) for hidden, kwargs in inputs])


class Reference:
    """The full-precision model's log-probabilities at the compared positions, and the inputs of the decoder
    layers measured (`layers`; None: all), so that a group in layer i is measured by running layers i.. only."""

    @torch.no_grad()
    def __init__(self, lmm: LMM, measurements: list[Measurement], layers: list[int] | None = None):
        self.lmm, self.firsts = lmm, [m.first for m in measurements]
        self.layer_inputs, self.log_probs = [], []
        n_layers = len(lmm.llm.model.layers)
        kept = range(n_layers) if layers is None else sorted(set(layers))
        for m in measurements:
            out = lmm.llm(inputs_embeds=m.embeds, use_cache=False, output_hidden_states=True)
            self.layer_inputs.append({i: out.hidden_states[i] for i in kept})   # [i]: the input of decoder layer i
            self.log_probs.append(torch.log_softmax(out.logits[0, m.first:].float(), -1))

    def save(self, path: Path) -> None:
        torch.save({"firsts": self.firsts, "layer_inputs": self.layer_inputs, "log_probs": self.log_probs}, path)

    @classmethod
    def load(cls, lmm: LMM, path: str | Path) -> "Reference":
        reference = cls.__new__(cls)
        reference.lmm = lmm
        state = torch.load(path, weights_only=True)
        reference.firsts, reference.layer_inputs, reference.log_probs = (state["firsts"], state["layer_inputs"],
                                                                         state["log_probs"])
        return reference

    @torch.no_grad()
    def mean_kld(self, index: int) -> float:
        """Mean KLD over every compared position, the model as it is now from decoder layer `index` on."""
        model = self.lmm.llm.model
        layers = model.layers
        model.layers = layers[index:]          # the earlier layers' outputs are the cached full-precision ones
        try:
            total, count = 0.0, 0
            for first, inputs, ref in zip(self.firsts, self.layer_inputs, self.log_probs):
                logits = self.lmm.llm(inputs_embeds=inputs[index], use_cache=False).logits[0, first:].float()
                total += float(kl_terms(ref, logits).sum())
                count += ref.shape[0]
        finally:
            model.layers = layers
        return total / count


def _quantized(weight: torch.Tensor, hessian: torch.Tensor, grid, method: str) -> torch.Tensor:
    w = weight.float()
    if method == "gptq":
        fit = gptq(w, hessian, grid)
        return grid.values(fit.codes, fit.params)
    return grid.values(*rtn(w, hessian, grid))


def _written_as(grids) -> str:
    return "/".join(sorted({g.name if g else "float" for g in grids}))


def _quantize_group(linears: dict[str, nn.Linear], original: dict[str, torch.Tensor], grids, hessians: dict,
                    method: str) -> float:
    """Put each of the group's linears (`original`'s names) on its grid, in place; their summed output error."""
    error = 0.0
    for (name, weight), grid in zip(original.items(), grids):
        if grid is not None:
            q = _quantized(weight, hessians[name], grid, method)
            error += output_error(weight.float() - q, hessians[name])
            linears[name].weight.copy_(q.to(weight.dtype))
    return error


@dataclass(frozen=True)
class Candidate:
    """A type as one group sees it: the grids it writes there (width fallbacks applied), the first type that
    writes the same grids (measured once, its figures shared), and whether its KLD is measured or scaled."""
    type_name: str
    grids: tuple
    same_as: str
    measured: bool


def group_candidates(names: list[str], types: list[str], plans: dict, reference_type: str | None
                     ) -> list[Candidate]:
    """`plans`: each type's plan_llm. With `reference_type`, only the types that write its grids are measured."""
    first: dict[tuple, str] = {}
    out = []
    for type_name in types:
        grids = tuple(plans[type_name][c].grid for c in names)
        measured = reference_type is None or grids == tuple(plans[reference_type][c].grid for c in names)
        out.append(Candidate(type_name, grids, first.setdefault(grids, type_name), measured))
    return out


@torch.no_grad()
def group_figures(reference: Reference, index: int, linears: dict[str, nn.Linear], hessians: dict,
                  candidate: Candidate, method: str) -> tuple[float, float | None]:
    """One group (`linears`, by their names in layer `index`) quantized alone onto the candidate's grids: its
    summed output error and, where the candidate is measured, the mean KLD; the weights are restored after."""
    original = {name: linear.weight.detach().clone() for name, linear in linears.items()}
    try:
        error = _quantize_group(linears, original, candidate.grids, hessians, method)
        return error, reference.mean_kld(index) if candidate.measured else None
    finally:
        for name, linear in linears.items():
            linear.weight.copy_(original[name])


def assemble_group(layer: int, names: list[str], group: list[str], candidates: list[Candidate],
                   figures: dict[str, tuple[float, float | None]], reference_type: str | None) -> GroupSensitivity:
    """The group's row from the figures of its distinct candidates (`figures[c.same_as]`): types that write the
    same grids share them, and with `reference_type` the unmeasured types' KLD is scaled from it."""
    entry = GroupSensitivity(layer, names, "+".join(n.split(".")[-1] for n in group), {}, {})
    for c in candidates:
        entry.written_as[c.type_name] = _written_as(c.grids)
        error, kld = figures[c.same_as]
        entry.output_error[c.type_name] = error
        if c.measured:
            entry.kld[c.type_name] = kld
            entry.measured.append(c.type_name)
    if reference_type is not None:
        ref_kld, ref_error = entry.kld[reference_type], entry.output_error[reference_type]
        for c in candidates:
            if c.type_name not in entry.kld:
                entry.kld[c.type_name] = ref_kld * entry.output_error[c.type_name] / max(ref_error, 1e-30)
    return entry


def layer_statistics(lmm: LMM, calib: list[torch.Tensor], layers: list[int]):
    """Each of `layers`' (index, groups, Hessians) on the full-precision model's calibration inputs, in order: one
    pass through the decoder layers up to the last of them."""
    decoder = lmm.llm.model.layers
    inputs = lmm.first_block_inputs(calib)
    for index in range(max(layers) + 1):
        groups, hessians, inputs = _layer_statistics(decoder[index], inputs)
        if index in layers:
            yield index, groups, hessians


@torch.no_grad()
def measure_sensitivity(lmm: LMM, calib: list[torch.Tensor], measurements: list[Measurement], types: list[str],
                        method: str = "gptq", on_group: Callable[[int, int], None] | None = None,
                        reference_type: str | None = None, layers: list[int] | None = None
                        ) -> list[GroupSensitivity]:
    """`calib`: calibration input embeddings (the Hessians); `types`: GGUF grid names; `reference_type`: measure
    that type only and scale it to the others (see the module's docstring); `layers`: only these decoder layers.
    Every tensor is restored afterwards. sweep/sensitivity_tasks.py runs the same steps as a task graph."""
    chosen = list(range(len(lmm.llm.model.layers))) if layers is None else layers
    reference = Reference(lmm, measurements, chosen)
    plans = {t: plan_llm(lmm.llm, GRIDS[t]) for t in types}
    results = []
    for index, groups, hessians in layer_statistics(lmm, calib, chosen):
        linears = _linears(lmm.llm.model.layers[index])
        for group in groups:
            names = [decoder_name(index, name) for name in group]
            candidates = group_candidates(names, types, plans, reference_type)
            figures = {c.type_name: group_figures(reference, index, {n: linears[n] for n in group}, hessians, c,
                                                  method)
                       for c in candidates if c.same_as == c.type_name}
            results.append(assemble_group(index, names, group, candidates, figures, reference_type))
            if on_group:
                on_group(len(results), len(chosen))
    return results


@torch.no_grad()
def measure_vision_sensitivity(lmm: LMM, calib_images: list, items: list, types: list[str],
                               on_group: Callable[[int, int], None] | None = None) -> list[GroupSensitivity]:
    """The vision tower's and projector's groups: each quantized alone onto each type (RTN with its input
    importance on the calibration images; the mmproj is written by a type policy, not calibrated), measured by
    the mean KLD at the answer position of VQA `items` (image + question) through the whole model. `layer` is
    the tower layer; the projector's groups come after the last one."""
    import re

    from ..models.preprocess import load_image
    from ..quant.plan import fitting_grid

    side = nn.ModuleDict({"vision": lmm.vision, "projector": lmm.projector})
    pixels = [lmm.pixels(image) for image in calib_images]
    groups, hessians, _ = _input_statistics(side, [lambda p=p: lmm.image_features(p) for p in pixels])
    images = [load_image(item.image) for item in items]

    def answer_logits() -> list[torch.Tensor]:
        return [lmm.llm(inputs_embeds=lmm.prompt_embeddings(image, item.question), use_cache=False).logits[0, -1]
                .float() for image, item in zip(images, items)]

    reference = [torch.log_softmax(logits, -1) for logits in answer_logits()]
    linears = _linears(side)
    n_layers = len(lmm.vision.encoder.layers)
    results = []
    for group in groups:
        names = [re.sub(r"^vision\.", "vision.vision_model.", f"{name}.weight") for name in group]
        found = re.search(r"layers\.(\d+)\.", group[0])
        entry = GroupSensitivity(int(found.group(1)) if found else n_layers, names,
                                 ("vision:" if found else "projector:") + "+".join(n.split(".")[-1] for n in group),
                                 {}, {})
        original = {name: linears[name].weight.detach().clone() for name in group}
        for type_name in types:
            grids = [fitting_grid(GRIDS[type_name], linears[name].in_features) for name in group]
            entry.written_as[type_name] = _written_as(grids)
            entry.output_error[type_name] = _quantize_group(linears, original, grids, hessians, "rtn")
            entry.kld[type_name] = float(np.mean([float(kl_terms(ref, now).sum())
                                                  for ref, now in zip(reference, answer_logits())]))
            entry.measured.append(type_name)
            for name in group:
                linears[name].weight.copy_(original[name])
        results.append(entry)
        if on_group:
            on_group(len(results), len(groups))
    return results


def proxy_rank_correlation(results: list[GroupSensitivity], types: list[str], reference_type: str) -> dict:
    """How well cheaper figures rank the measured KLDs over every (group, type) measured, the reference type's
    own (exact by construction) and its fallback twins left out: the quantizer's output error alone, and the
    scaled KLD that --sensitivity scaled uses."""
    pairs = [(r, t) for r in results for t in types
             if t in r.measured and reference_type in r.measured and r.written_as[t] != r.written_as[reference_type]]
    measured = [r.kld[t] for r, t in pairs]
    scaled = [r.kld[reference_type] * r.output_error[t] / max(r.output_error[reference_type], 1e-30)
              for r, t in pairs]
    return {"pairs": len(pairs), "reference_type": reference_type,
            "output_error": spearman([r.output_error[t] for r, t in pairs], measured) if len(pairs) > 2 else None,
            "scaled_kld": spearman(scaled, measured) if len(pairs) > 2 else None}
