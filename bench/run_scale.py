"""The sweep at scale (issue 29): imp-tiny's default sweep (`impq sweep-resolution`'s defaults: native, 3/4 and 1/2
resolution at F16 and Q4_K, 140 items a point, 3 timed runs) from an empty cache, in-process and on a local Ray
cluster of 1 and of 2 worker CPUs, each in its own process. Reported: wall time, each task's time by kind, and the
speed-up of the accuracy tasks (quantize, reference, evaluate: the ones that run in parallel; timings run after
them and hold the machine) at 2 workers over 1.

    pip install 'impq[ray]'
    python bench/run_scale.py --work /tmp/impq-scale            # results: bench/results/scale.{json,md}
    python bench/run_scale.py --work /tmp/x --limit 4 --resolutions 84 --no-write   # a quick check of the script
    python bench/run_scale.py --work /tmp/impq-bench --reduced      # results: bench/results/scale_reduced.json
    python bench/run_scale.py --work /tmp/impq-bench --projection   # results: bench/results/scale_projection.md

--reduced: at Imp-3B's dimensions (generated weights, bench/full_size_pair.py), a sub-graph of the default sweep
(its largest and smallest resolution, F16 and Q4_K, 20 items a point, RTN on 8 sequences) in-process here from an
empty cache, each task's seconds recorded beside `--dry-run`'s estimate for it (impq/sweep/estimate.py, on
speed.md's machine).
--projection: the default sweep's graph at the same dimensions, each task's estimate times its group's measured /
estimated ratio: the wall time in-process here and on 4 and 16 Ray workers like this machine, and the estimate on
one GPU. The README's scale table comes from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ACCURACY_TASKS = ("quantize", "mmproj", "reference", "evaluate")
MODES = {"in-process": None, "ray, 1 worker": 1, "ray, 2 workers": 2}
SHARD_ITEMS = 35
REDUCED_ITEMS = 20
REDUCED_METHOD = "rtn"
REDUCED_NSAMPLES = 8


def cpu_model() -> str:
    """This machine's CPU as results name it: /proc/cpuinfo's model, with AMX where the CPU reports it (on these VMs
    the kind whose native llama.cpp build crashed), and the CPU count."""
    info = Path("/proc/cpuinfo")
    first = info.read_text().split("\n\n", 1)[0] if info.is_file() else ""
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines())}
    amx = ", AMX" if "amx_tile" in fields.get("flags", "").split() else ""
    return f"{fields.get('model name', platform.machine())}{amx}, {os.cpu_count()} CPUs"


def totals(tasks: list[dict], group, fields: tuple[str, ...]) -> dict[str, dict]:
    """Per `group(task)`: how many tasks, and the sum of each of their `fields`."""
    sums: dict[str, dict] = {}
    for t in tasks:
        entry = sums.setdefault(group(t), {"tasks": 0, **{f: 0.0 for f in fields}})
        entry["tasks"] += 1
        for f in fields:
            entry[f] += t[f]
    return sums


def run_mode(work: str, workers: int | None, limit: int | None, resolutions: list[int] | None) -> dict:
    """One sweep from an empty cache in this process (`workers`: a local Ray cluster of that many CPUs)."""
    from impq.defaults import default_eval_data, default_model_dir
    from impq.sweep.graph import BENCH_RESOURCE, InProcess, RayExecutor
    from impq.sweep.resolution import SweepSettings, run_sweep

    if workers is None:
        executor = InProcess()
    else:
        import ray

        ray.init(num_cpus=workers, resources={BENCH_RESOURCE: 1}, include_dashboard=False, log_to_driver=False)
        executor = RayExecutor()
    start = time.perf_counter()
    result = run_sweep(default_model_dir(), work, SweepSettings(limit=limit, resolutions=resolutions),
                       default_eval_data(), executor=executor)
    wall = time.perf_counter() - start
    tasks = result.tasks
    accuracy = [t for t in tasks if t["kind"] in ACCURACY_TASKS]
    by_kind = totals([{**t, "seconds": t["end"] - t["start"]} for t in tasks], lambda t: t["kind"], ("seconds",))
    return {"wall_s": wall, "points": len(result.rows), "by_kind": by_kind,
            # from the first accuracy task's start to the last one's end: what parallel workers shorten
            "accuracy_span_s": max(t["end"] for t in accuracy) - min(t["start"] for t in accuracy),
            "accuracy": [r["accuracy"] for r in result.rows]}


def local_machine():
    """speed.md's machine: the estimate's bandwidth and FP32 rate for this project's 2-core VM."""
    from impq.sweep.estimate import Machine

    measured = json.loads((RESULTS / "speed.json").read_text())["machine"]
    return Machine(measured["bandwidth_gbs"], measured["peak_gflops"])


def reduced_settings(spec):
    """A sub-graph of the default sweep: its largest and smallest resolution, both types, 20 items a point. RTN on 8
    calibration sequences, not the default GPTQ on 64: GPTQ's quantize task at these dimensions is measured on its
    own (quantize_full_size.md, 8 sequences), and 64 sequences' forward passes alone take hours here."""
    from impq.sweep.resolution import SweepSettings, default_resolutions

    sizes = default_resolutions(spec)
    return SweepSettings(resolutions=[sizes[0], sizes[-1]], limit=REDUCED_ITEMS, method=REDUCED_METHOD,
                         nsamples=REDUCED_NSAMPLES)


def ratio_group(task: dict) -> str:
    """What one measured / estimated ratio stands for: quantize, evaluate and time per weight type (an export
    against a quantizer; llama.cpp's F16 and quantized kernels), the other kinds as a whole."""
    return f"{task['kind']} {task['what'].split()[0]}" if task["kind"] in ("quantize", "evaluate", "time") \
        else task["kind"]


def reduced(work: Path, write: bool) -> None:
    """The reduced sweep at the Imp-3B dimensions, in-process here from an empty cache: each task's measured
    seconds beside its estimate (scale_reduced.json, which --projection reads)."""
    from full_size_pair import full_size_spec

    from impq.defaults import default_eval_data
    from impq.sweep.resolution import run_sweep

    spec = full_size_spec(work)
    settings = reduced_settings(spec)
    out = work / "reduced-sweep"
    shutil.rmtree(out, ignore_errors=True)
    graph = {t["key"]: t for t in run_sweep(spec.folder, out, settings, default_eval_data(), dry_run=True,
                                            machine=local_machine()).tasks}
    start = time.perf_counter()
    result = run_sweep(spec.folder, out, settings, default_eval_data())
    wall = time.perf_counter() - start
    tasks = [{"kind": t["kind"], "what": graph[t["key"]]["what"], "seconds": t["end"] - t["start"],
              "estimated_s": graph[t["key"]]["seconds"]} for t in result.tasks]
    record = {"resolutions": settings.resolutions, "types": settings.types, "items": settings.limit,
              "method": settings.method, "nsamples": settings.nsamples, "machine": cpu_model(),
              "wall_s": wall, "tasks": tasks}
    print(json.dumps(record, indent=2))
    if write:
        (RESULTS / "scale_reduced.json").write_text(json.dumps(record, indent=2) + "\n")


def projection(work: Path, write: bool) -> None:
    """The default sweep's cost at the Imp-3B dimensions: the estimate on speed.md's machine, scaled by what the
    reduced sweep measured here per task kind; on 4 and 16 Ray workers like it; on one GPU (published figures)."""
    from full_size_pair import full_size_spec

    from impq.defaults import default_eval_data
    from impq.sweep.estimate import ONE_GPU, wall_seconds
    from impq.sweep.resolution import SweepSettings, run_sweep

    spec = full_size_spec(work)
    measured = json.loads((RESULTS / "scale_reduced.json").read_text())

    def graph(machine, shard_items: int | None = None) -> list[dict]:
        return run_sweep(spec.folder, work / "projection-sweep", SweepSettings(shard_items=shard_items),
                         default_eval_data(), dry_run=True, machine=machine).tasks

    # a task that shared the cores with another process (`shared_s`, written by hand beside the run) times the
    # sharing, not the task: it stays in the table and out of the ratios
    groups = totals([t for t in measured["tasks"] if not t.get("shared_s")], ratio_group, ("seconds", "estimated_s"))
    # measured / estimated per group; the quantized type ran RTN, so GPTQ's keeps the estimate (fitted on its run)
    ratio = {g: e["seconds"] / e["estimated_s"] for g, e in groups.items()
             if not g.startswith("quantize ") or g == "quantize F16"}

    def scaled(tasks: list[dict]) -> list[dict]:
        return [{**t, "seconds": t["seconds"] * ratio.get(ratio_group(t), 1.0)} for t in tasks]

    here = local_machine()
    # on workers, each point's 140 items in 4 shards of 35 (--shard-items 35): evaluation fans out too
    default, sharded = graph(here), graph(here, SHARD_ITEMS)
    projected = scaled(default)
    walls = {"in-process here": (wall_seconds(default, 1), wall_seconds(projected, 1)),
             **{f"ray, {n} workers like this machine, --shard-items {SHARD_ITEMS}":
                (wall_seconds(sharded, n), wall_seconds(scaled(sharded), n)) for n in (4, 16)},
             "one GPU (RTX 4090 figures), in-process": (wall_seconds(graph(ONE_GPU), 1), None)}
    by_kind = totals([{"kind": e["kind"], "estimated": e["seconds"], "projected": p["seconds"]}
                      for e, p in zip(default, projected)], lambda t: t["kind"], ("estimated", "projected"))
    lines = ["# The default sweep at the Imp-3B dimensions: measured tasks and projected cost", "",
             f"`python bench/run_scale.py --work W --reduced` then `--projection`. A checkpoint with Imp-3B's "
             f"dimensions (generated weights, speed only). The reduced sweep ran here in-process from an empty cache "
             f"({measured['machine']}, no GPU): {len(measured['types'])} types "
             f"({', '.join(measured['types'])}) x {len(measured['resolutions'])} resolutions "
             f"({', '.join(map(str, measured['resolutions']))} px), {measured['items']} items a point, quantized with "
             f"{measured['method']} on {measured['nsamples']} calibration sequences; wall "
             f"{measured['wall_s'] / 60:.1f} min. Each task's time beside `--dry-run`'s "
             f"estimate for it (speed.md's machine: {here.bandwidth_gbs:.1f} GB/s, {here.peak_gflops:.0f} GFLOP/s "
             f"FP32):", "", "| task | works on | measured s | estimated s |", "|---|---|---|---|"]
    lines += [f"| {t['kind']} | {t['what']} | {t['seconds']:.1f}" + (
              f" (shared the cores with another process for {t['shared_s']:.0f} s: not in the ratios)"
              if t.get("shared_s") else "") + f" | {t['estimated_s']:.1f} |" for t in measured["tasks"]]
    lines += ["", "| task group | tasks | measured s | estimated s | measured / estimated |", "|---|---|---|---|---|"]
    lines += [f"| {g} | {e['tasks']} | {e['seconds']:.1f} | {e['estimated_s']:.1f} | "
              f"{ratio[g]:.2f} |" if g in ratio else
              f"| {g} | {e['tasks']} | {e['seconds']:.1f} | {e['estimated_s']:.1f} | - ({measured['method']}: not "
              f"the default's GPTQ) |" for g, e in groups.items()]
    lines += ["", "The default sweep (F16 and Q4_K at native, 3/4 and 1/2 resolution, 140 items a point, GPTQ on 64 "
              "calibration sequences): each task's estimate, and projected = the estimate times its group's measured "
              "/ estimated ratio above. Quantize keeps the estimate, whose factor is fitted on GPTQ Q4_K at these "
              "dimensions here (quantize_full_size.md: 2868 s measured for 8 sequences).", "",
              "| task kind | tasks | estimated h | projected h |", "|---|---|---|---|"]
    lines += [f"| {k} | {e['tasks']} | {e['estimated'] / 3600:.2f} | {e['projected'] / 3600:.2f} |"
              for k, e in by_kind.items()]
    lines += ["", "| where | estimated wall time h | projected from the measured tasks h |", "|---|---|---|"]
    lines += [f"| {name} | {e / 3600:.1f} | {'-' if p is None else f'{p / 3600:.1f}'} |"
              for name, (e, p) in walls.items()]
    lines += ["", "One GPU: `impq/sweep/estimate.py`'s `ONE_GPU`, an RTX 4090 costed from published llama.cpp CUDA "
              "figures and impq's GPTQ measured on an H200 (its comment cites each); no llama.cpp GPU run was "
              "timed in this project, so it has no projected column."]
    text = "\n".join(lines) + "\n"
    print(text)
    if write:
        (RESULTS / "scale_projection.md").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=140)
    parser.add_argument("--resolutions", default=None, help="comma-separated (default: the sweep's)")
    parser.add_argument("--no-write", action="store_true", help="print, and leave bench/results alone")
    parser.add_argument("--mode", help=argparse.SUPPRESS)           # one mode, in a child process
    parser.add_argument("--reduced", action="store_true", help="the reduced sweep at the Imp-3B dimensions, timed")
    parser.add_argument("--projection", action="store_true", help="the Imp-3B default sweep's cost, from the "
                        "reduced sweep's measured tasks")
    args = parser.parse_args()
    if args.reduced:
        reduced(args.work, not args.no_write)
        return
    if args.projection:
        projection(args.work, not args.no_write)
        return
    resolutions = [int(r) for r in args.resolutions.split(",")] if args.resolutions else None
    if args.mode:
        print(json.dumps(run_mode(str(args.work / args.mode.replace(", ", "-").replace(" ", "-")),
                                  MODES[args.mode], args.limit, resolutions)))
        return
    results = {}
    for mode in MODES:
        done = subprocess.run([sys.executable, __file__, "--work", str(args.work), "--limit", str(args.limit),
                               *(["--resolutions", args.resolutions] if args.resolutions else []), "--mode", mode],
                              capture_output=True, text=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
        if done.returncode != 0:
            sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        print(mode, json.dumps({k: results[mode][k] for k in ("wall_s", "accuracy_span_s")}), flush=True)
    one, two = results["ray, 1 worker"]["accuracy_span_s"], results["ray, 2 workers"]["accuracy_span_s"]
    speedup = one / two
    same = len({json.dumps(r["accuracy"]) for r in results.values()}) == 1
    lines = ["# The sweep at scale: imp-tiny's default sweep in-process and on Ray", "",
             f"{results['in-process']['points']} points, {args.limit} items a point, from an empty cache; this "
             f"machine: {cpu_model()}, no GPU. Accuracy tasks: {', '.join(ACCURACY_TASKS)} (timings run after "
             "them, one at a time, each holding its machine's impq_bench).", "",
             "| executor | wall s | accuracy tasks' span s | " + " | ".join(f"{k} s (tasks)" for k in
                                                                         ("quantize", "reference", "evaluate", "time"))
             + " |", "|---|---|---|---|---|---|---|"]
    for mode, r in results.items():
        cells = [f"{r['by_kind'].get(k, {}).get('seconds', 0):.1f} ({r['by_kind'].get(k, {}).get('tasks', 0)})"
                 for k in ("quantize", "reference", "evaluate", "time")]
        lines.append(f"| {mode} | {r['wall_s']:.1f} | {r['accuracy_span_s']:.1f} | " + " | ".join(cells) + " |")
    lines += ["", f"Accuracy tasks' speed-up at 2 workers over 1: {speedup:.2f}x (goal: at least 1.8x): "
              f"{'met' if speedup >= 1.8 else 'missed'}. Every executor's accuracies equal: {same}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "scale.json").write_text(json.dumps({"limit": args.limit, "results": results}, indent=2) + "\n")
        (RESULTS / "scale.md").write_text(text)


if __name__ == "__main__":
    main()
