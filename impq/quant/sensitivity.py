"""Per-tensor sensitivity: how far the model's next-token distribution moves (mean KLD against full precision)
when only one tensor group is quantized to a candidate type with the method that will be used.

Groups are the tensors that read one input (q/k/v, gate/up, and Phi-2's q/k/v with fc1, which share the parallel
block's layernorm output): they share a Hessian, and an allocation gives them one decision. Measured directly,
no proxy: each (group, type) is quantized from full precision with its Hessian from the calibration inputs, the
measurement prompts (image + text, disjoint from the calibration data) run through the whole model, and the
group is restored. Each decoder layer's Hessians are computed only while its groups are measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..measure.divergence import kl_divergence
from ..models.lmm import LMM
from .gptq import gptq
from .grids import GRIDS
from .plan import plan_llm
from .rtn import rtn

METHODS = ("rtn", "gptq")


@dataclass
class GroupSensitivity:
    layer: int
    tensors: list[str]             # canonical names
    kind: str                      # the group's linear names within the layer, e.g. "q_proj+k_proj+v_proj"
    kld: dict[str, float]          # requested type -> mean KLD against full precision
    written_as: dict[str, str]     # requested type -> the type the plan writes (width fallbacks)


def _linears(layer: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def _layer_statistics(lmm: LMM, index: int, calib: list[torch.Tensor]) -> tuple[list[list[str]], dict]:
    """The layer's groups of linears that read one input, and each linear's mean X^T X on the calibration inputs."""
    linears = _linears(lmm.llm.model.layers[index])
    hessians = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for name, m in linears.items()}
    counts = dict.fromkeys(linears, 0)
    inputs_seen: dict[str, str] = {}
    first_input: dict[int, str] = {}
    alive: list[torch.Tensor] = []       # inputs held for the forward, so that no id() is reused within it

    def hook(name):
        def record(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            hessians[name] += (x.T @ x).double()
            counts[name] += x.shape[0]
            alive.append(args[0])
            inputs_seen.setdefault(name, first_input.setdefault(id(args[0]), name))
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in linears.items()]
    try:
        for embeds in calib:
            first_input.clear()
            alive.clear()
            lmm.llm(inputs_embeds=embeds, use_cache=False)
        alive.clear()
    finally:
        for handle in handles:
            handle.remove()
    groups: dict[str, list[str]] = {}
    for name in linears:
        groups.setdefault(inputs_seen[name], []).append(name)
    return list(groups.values()), {name: (h / max(1, counts[name])).float() for name, h in hessians.items()}


@torch.no_grad()
def _mean_kld(lmm: LMM, prompts: list[torch.Tensor], reference: list[np.ndarray]) -> float:
    klds = [kl_divergence(ref, lmm.llm(inputs_embeds=p, use_cache=False).logits[0, -1].float().numpy())
            for p, ref in zip(prompts, reference)]
    return float(np.mean(klds))


@torch.no_grad()
def measure_sensitivity(lmm: LMM, calib: list[torch.Tensor], prompts: list[torch.Tensor], types: list[str],
                        method: str = "gptq", on_group: Callable[[int, int], None] | None = None
                        ) -> list[GroupSensitivity]:
    """`calib`: calibration input embeddings (the Hessians); `prompts`: measurement prompts' input embeddings, up to
    the answer; `types`: GGUF grid names. Every tensor is restored afterwards."""
    reference = [lmm.llm(inputs_embeds=p, use_cache=False).logits[0, -1].float().numpy() for p in prompts]
    plans = {t: plan_llm(lmm.llm, GRIDS[t]) for t in types}
    layers = lmm.llm.model.layers
    results = []
    for index, layer in enumerate(layers):
        groups, hessians = _layer_statistics(lmm, index, calib)
        linears = _linears(layer)
        for group in groups:
            names = [f"llm.model.layers.{index}.{name}.weight" for name in group]
            original = {name: linears[name].weight.detach().clone() for name in group}
            kld, written = {}, {}
            for type_name in types:
                for name, canonical in zip(group, names):
                    grid = plans[type_name][canonical].grid
                    if grid is None:
                        continue
                    w = original[name].float()
                    if method == "gptq":
                        fit = gptq(w, hessians[name], grid)
                        codes, params = fit.codes, fit.params
                    else:
                        codes, params = rtn(w, hessians[name], grid)
                    linears[name].weight.copy_(grid.values(codes, params).to(w.dtype))
                kld[type_name] = _mean_kld(lmm, prompts, reference)
                written[type_name] = "/".join(sorted({plans[type_name][c].grid.name if plans[type_name][c].grid
                                                      else "float" for c in names}))
                for name in group:
                    linears[name].weight.copy_(original[name])
            results.append(GroupSensitivity(index, names, "+".join(n.split(".")[-1] for n in group), kld, written))
            if on_group:
                on_group(len(results), len(layers))
    return results


def write_sensitivity_plot(path, results: list[GroupSensitivity], types: list[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from ..fileio import atomic_output

    kinds = list(dict.fromkeys(r.kind for r in results))
    figure, axes = plt.subplots(1, len(types), figsize=(4 * len(types), 3.6), sharey=True, squeeze=False)
    for ax, type_name in zip(axes[0], types):
        for kind in kinds:
            rows = [r for r in results if r.kind == kind]
            ax.plot([r.layer for r in rows], [max(r.kld[type_name], 1e-12) for r in rows], marker="o", label=kind)
        ax.set_yscale("log")
        ax.set_title(type_name.upper())
        ax.set_xlabel("decoder layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean KLD, only this group quantized")
    axes[0][-1].legend(fontsize=7)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
