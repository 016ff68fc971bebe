"""The sensitivity measurement's plot (`impq sensitivity`'s sensitivity.png): KLD by layer per candidate type."""

from __future__ import annotations

from ..fileio import atomic_output
from .sensitivity import GroupSensitivity


def write_sensitivity_plot(path, results: list[GroupSensitivity], types: list[str], title: str) -> None:
    """KLD by layer, one panel per type and a row per side (the decoder; the vision tower and projector)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def is_vision(r: GroupSensitivity) -> bool:
        return r.kind.startswith(("vision:", "projector:"))

    sides = [(label, rows) for label, rows in (("decoder layer", [r for r in results if not is_vision(r)]),
                                               ("vision layer (projector: after the last)",
                                                [r for r in results if is_vision(r)])) if rows]
    figure, axes = plt.subplots(len(sides), len(types), figsize=(4 * len(types), 3.6 * len(sides)), sharey=True,
                                squeeze=False)
    for row, (label, rows) in zip(axes, sides):
        kinds = list(dict.fromkeys(r.kind for r in rows))
        for ax, type_name in zip(row, types):
            for kind in kinds:         # a group that stays float at this type (no block fits) has nothing to show
                points = [r for r in rows if r.kind == kind and r.written_as[type_name] != "float"]
                ax.plot([r.layer for r in points], [max(r.kld[type_name], 1e-12) for r in points], marker="o",
                        label=kind)
            ax.set_yscale("log")
            ax.set_title(type_name.upper())
            ax.set_xlabel(label)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        row[0].set_ylabel("mean KLD, only this group quantized")
        row[-1].legend(fontsize=7)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
