"""The sweep's PNG plots: accuracy against time to first token (measured here, and estimated on the phone
profile) and against artifact size, with the Pareto frontier drawn and the original configuration marked.
PyTorch-only points (a reduction stock llama.cpp has no graph for) are drawn hollow and say so in the legend."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from ..fileio import atomic_output  # noqa: E402

PLOTS = {
    "accuracy_vs_ttft.png": ("ttft_s", "time to first token measured here (s)"),
    "accuracy_vs_phone_ttft.png": ("phone_ttft_s", "time to first token estimated on {device} (s)"),
    "accuracy_vs_size.png": ("total_mb", "text GGUF + mmproj (MB)"),
}


def pareto_front(rows: list[dict], cost: str) -> list[dict]:
    """Points no other point beats on both accuracy (higher) and `cost` (lower), by increasing cost."""
    candidates = sorted((r for r in rows if r.get(cost) is not None), key=lambda r: (r[cost], -r["accuracy"]))
    front, best = [], -1.0
    for row in candidates:
        if row["accuracy"] > best:
            front.append(row)
            best = row["accuracy"]
    return front


def _series(row: dict) -> str:
    """A point's colour: its weight type, and its tower's where the mmproj is quantized."""
    tower = row.get("vision_type", "F16")
    return row["type"] if tower == "F16" else f"{row['type']} + {tower} tower"


def write_plots(out: Path, rows: list[dict], device: str) -> dict:
    files = {}
    types = sorted({_series(r) for r in rows})
    colours = dict(zip(types, plt.get_cmap("tab10").colors))
    for name, (cost, label) in PLOTS.items():
        figure, axes = plt.subplots(figsize=(7, 4.5))
        for row in rows:
            if row.get(cost) is None:
                continue
            hollow = row["runtime"] != "llama.cpp"
            axes.scatter(row[cost], row["accuracy"], s=40, marker="^" if row["token_reduction"] == "pool2" else "o",
                         facecolors="none" if hollow else colours[_series(row)], edgecolors=colours[_series(row)])
            axes.annotate(f"{row['image_size']}", (row[cost], row["accuracy"]), fontsize=7, xytext=(3, 3),
                          textcoords="offset points")
        # the frontier of what a phone can load: PyTorch-only points show what a pooling runtime would gain
        front = pareto_front([r for r in rows if r["runtime"] == "llama.cpp"], cost)
        axes.plot([r[cost] for r in front], [r["accuracy"] for r in front], "k--", lw=1,
                  label="Pareto frontier (llama.cpp points)")
        originals = [r for r in rows if r["original"] and r.get(cost) is not None]
        axes.scatter([r[cost] for r in originals], [r["accuracy"] for r in originals], s=220, marker="*",
                     facecolors="none", edgecolors="black", label="original (F16, native, all tokens)")
        for type_name in types:
            axes.scatter([], [], color=colours[type_name], label=type_name)
        axes.scatter([], [], marker="^", facecolors="none", edgecolors="grey", label="2x2 pooled, hollow: PyTorch-only")
        skipped = sum(r.get(cost) is None for r in rows)
        axes.set_xlabel(label.format(device=device) + (f" ({skipped} PyTorch-only points have none)" if skipped else ""))
        axes.set_ylabel("accuracy")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, loc="lower right")
        figure.tight_layout()
        with atomic_output(out / name) as tmp:
            figure.savefig(tmp, format="png", dpi=110)
        plt.close(figure)
        files[name.removesuffix(".png")] = str(out / name)
    return files
