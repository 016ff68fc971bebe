"""The sweep at scale (issue 29): imp-tiny's default sweep (`impq sweep-resolution`'s defaults: native, 3/4 and 1/2
resolution at F16 and Q4_K, 140 items a point, 3 timed runs) from an empty cache, in-process and on a local Ray
cluster of 1 and of 2 worker CPUs, each in its own process. Reported: wall time, each task's time by kind, and the
speed-up of the accuracy tasks (quantize, reference, evaluate: the ones that run in parallel; timings run after
them and hold the machine) at 2 workers over 1.

    pip install 'impq[ray]'
    python bench/run_scale.py --work /tmp/impq-scale            # results: bench/results/scale.{json,md}
    python bench/run_scale.py --work /tmp/x --limit 4 --resolutions 84 --no-write   # a quick check of the script
    python bench/run_scale.py --work /tmp/impq-bench --projection   # results: bench/results/scale_projection.md

--projection: the default sweep of a checkpoint with Imp-3B's dimensions (generated weights, bench/full_size_pair.py)
through `--dry-run`'s estimate (impq/sweep/estimate.py) on the machine bench/results/speed.md measured: each task
kind's estimated seconds and the wall time in-process and on 4 and 16 Ray workers like it; nothing is run. The
README's scale table comes from it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ACCURACY_TASKS = ("quantize", "mmproj", "reference", "evaluate")
MODES = {"in-process": None, "ray, 1 worker": 1, "ray, 2 workers": 2}
SHARD_ITEMS = 35


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
    by_kind = {}
    for t in tasks:
        entry = by_kind.setdefault(t["kind"], {"tasks": 0, "seconds": 0.0})
        entry["tasks"] += 1
        entry["seconds"] += t["end"] - t["start"]
    return {"wall_s": wall, "points": len(result.rows), "by_kind": by_kind,
            # from the first accuracy task's start to the last one's end: what parallel workers shorten
            "accuracy_span_s": max(t["end"] for t in accuracy) - min(t["start"] for t in accuracy),
            "accuracy": [r["accuracy"] for r in result.rows]}


def projection(work: Path, write: bool) -> None:
    """The default sweep's estimated cost at the Imp-3B dimensions on speed.md's machine (no task runs)."""
    from full_size_pair import full_size_spec

    from impq.defaults import default_eval_data
    from impq.sweep.estimate import SLOWER_DAYS, Machine, wall_seconds
    from impq.sweep.resolution import SweepSettings, run_sweep

    measured = json.loads((RESULTS / "speed.json").read_text())["machine"]
    machine = Machine(measured["bandwidth_gbs"], measured["peak_gflops"])
    spec = full_size_spec(work)

    def graph(shard_items: int | None) -> list[dict]:
        return run_sweep(spec.folder, work / "projection-sweep", SweepSettings(shard_items=shard_items),
                         default_eval_data(), dry_run=True, machine=machine).tasks

    # on workers, each point's 140 items in 4 shards of 35 (--shard-items 35): evaluation fans out too
    tasks, sharded = graph(None), graph(SHARD_ITEMS)
    walls = {"in-process": wall_seconds(tasks, 1),
             **{f"ray, {n} workers, --shard-items {SHARD_ITEMS}": wall_seconds(sharded, n) for n in (4, 16)}}
    kinds = {}
    for t in tasks:
        entry = kinds.setdefault(t["kind"], {"tasks": 0, "seconds": 0.0})
        entry["tasks"] += 1
        entry["seconds"] += t["seconds"]
    lines = ["# The default sweep at the Imp-3B dimensions: estimated cost", "",
             f"`python bench/run_scale.py --work W --projection`: `impq sweep-resolution --dry-run`'s estimate for a "
             f"checkpoint with Imp-3B's dimensions and the default settings, on the machine bench/results/speed.md "
             f"measured ({machine.bandwidth_gbs:.1f} GB/s, {machine.peak_gflops:.0f} GFLOP/s FP32, 2 cores). Nothing "
             f"runs; runs of the same kind of machine measured down to 1/{SLOWER_DAYS:.0f} of the fitted speed.", "",
             "| task kind | tasks | estimated h |", "|---|---|---|"]
    lines += [f"| {kind} | {e['tasks']} | {e['seconds'] / 3600:.2f} |" for kind, e in kinds.items()]
    lines += ["", "| where | estimated wall time h | on a slow day h |", "|---|---|---|"]
    lines += [f"| {name} | {s / 3600:.1f} | {s * SLOWER_DAYS / 3600:.1f} |" for name, s in walls.items()]
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
    parser.add_argument("--projection", action="store_true", help="the Imp-3B default sweep's estimate only")
    args = parser.parse_args()
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
             f"machine: {os.cpu_count()} CPUs. Accuracy tasks: {', '.join(ACCURACY_TASKS)} (timings run after "
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
