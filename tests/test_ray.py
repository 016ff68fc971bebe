"""The sweep's task graph on a real Ray cluster started on 127.0.0.1 (a head and a second node process, each with
its own resources; the machine's one `impq_bench` is the head's): the rows equal the in-process run's on every
column but timings, a worker killed mid-task loses nothing, timings never overlap, a re-run with either executor
recomputes nothing, and two tasks on one node never run more threads than its CPUs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

TIMING_COLUMNS = {"image_encode_s", "ttft_s", "prompt_tokens_per_s", "decode_tokens_per_s", "peak_rss_mb",
                  "timing_node", "timing_start", "timing_end"}
# one thread a task on both executors: the same arithmetic, so the same bytes and figures
SWEEP = ("sweep-resolution", "--resolutions", "168,84", "--types", "f16,q4_0", "--nsamples", "8", "--limit", "6",
         "--runs", "1", "--shard-items", "4", "--threads", "1")
HEAD_CPUS = 2
# no token authentication on the test's 127.0.0.1 cluster: a ~/.ray/auth_token left by an earlier local ray.init()
# would otherwise switch it on for some of its processes and not others
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """`ray start` twice: the head (2 CPUs, the machine's impq_bench) and a second node (1 CPU)."""
    root = tmp_path_factory.mktemp("ray")
    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)                              # the drivers this module starts in-process
    temp = Path("/tmp") / f"ray-impq-{os.getpid()}"          # Ray's socket paths must stay short
    port = _free_port()
    # OMP_NUM_THREADS=8, which Ray's workers inherit (Ray sets it to a task's CPUs only where it is unset): a task
    # runs 1 thread only because impq gives it its budget
    env = {**os.environ, **RAY_ENV, "OMP_NUM_THREADS": "8"}
    common = ["--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    ray_bin = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray_bin, "start", "--head", "--port", str(port), "--num-cpus", str(HEAD_CPUS), "--resources",
                    '{"impq_bench": 1}', "--include-dashboard", "false", "--temp-dir", str(temp), *common],
                   check=True, capture_output=True, env=env)
    address = f"127.0.0.1:{port}"
    try:
        subprocess.run([ray_bin, "start", "--address", address, "--num-cpus", "1", *common], check=True,
                       capture_output=True, env=env)
        yield address, root
    finally:
        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, env=env)
        shutil.rmtree(temp, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _sweep(out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from impq.cli import main; main()", *SWEEP, "--out", str(out),
                             "--json", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **RAY_ENV, **(env or {})})


def _finish(process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, stderr[-3000:]
    return json.loads(stdout)


def _table(out: Path) -> list[dict]:
    with open(out / "sweep.csv") as handle:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(handle)]


def _ray_workers_running_a_task() -> list[int]:
    """Ray workers busy with one of the sweep's tasks (their process title names the task's function)."""
    done = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True)
    return [int(line.split()[0]) for line in done.stdout.splitlines()[1:] if "ray::_on_ray" in line]


def _no_overlap(rows: list[dict]) -> bool:
    spans = sorted((float(r["timing_start"]), float(r["timing_end"])) for r in rows if r["timing_start"])
    return len(spans) == 4 and all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))


def test_a_sweep_on_ray_gives_the_in_process_rows_and_survives_a_killed_worker(cluster, tmp_path, monkeypatch,
                                                                              run_cli):
    address, _ = cluster
    local = _finish(_sweep(tmp_path / "local"))
    on_ray = _sweep(tmp_path / "ray", "--executor", "ray", "--ray-address", address)
    killed = None
    deadline = time.time() + 600
    while killed is None and on_ray.poll() is None and time.time() < deadline:
        busy = _ray_workers_running_a_task()
        if busy:                                         # a worker dies mid-task: Ray retries the task elsewhere
            os.kill(busy[0], 9)
            killed = busy[0]
        time.sleep(0.05)
    result = _finish(on_ray)
    assert killed is not None, "no task was seen running to kill"
    assert _table(tmp_path / "ray") == _table(tmp_path / "local")
    assert len(result["points"]) == len(local["points"]) == 4
    with open(tmp_path / "ray" / "sweep.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert _no_overlap(rows)                             # one impq_bench on the machine: one timing at a time
    assert all(r["timing_node"] for r in rows)           # the node each timing ran on

    # a re-run recomputes nothing, in-process or on Ray: no task function is called, no file rewritten
    import impq.measure.bench
    import impq.sweep.tasks as sweep_tasks

    def must_not_run(*args, **kwargs):
        raise AssertionError("a cached task ran again")

    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "ray").rglob("*") if p.is_file() and
               p.parent.name in ("llm", "mmproj", "evals", "times", "points", "reference")}
    for name in ("evaluate", "write_text_gguf", "write_mmproj_gguf", "reference_logits"):
        monkeypatch.setattr(sweep_tasks, name, must_not_run, raising=False)
    monkeypatch.setattr(impq.measure.bench, "bench_pair", must_not_run)
    for executor in ([], ["--executor", "ray", "--ray-address", address]):
        status, stdout, err = run_cli(*SWEEP, "--out", tmp_path / "ray", "--json", *executor)
        assert status == 0, err
        assert json.loads(stdout)["points"] == result["points"]
    assert {p: p.stat().st_mtime_ns for p in written} == written


def test_sensitivity_on_ray_gives_the_in_process_json(cluster, tmp_path, run_cli):
    """One task per tensor group and candidate on the cluster: the same sensitivity.json as in-process."""
    address, _ = cluster
    command = ("sensitivity", "--types", "q4_0,q4_k,q8_0", "--nsamples", "4", "--limit", "4", "--threads", "1",
               "--json")
    status, _, err = run_cli(*command, "--out", tmp_path / "local")
    assert status == 0, err
    status, _, err = run_cli(*command, "--out", tmp_path / "ray", "--executor", "ray", "--ray-address", address)
    assert status == 0, err
    assert (tmp_path / "ray" / "sensitivity.json").read_bytes() == (tmp_path / "local" / "sensitivity.json").read_bytes()
    groups = json.loads((tmp_path / "ray" / "sensitivity.json").read_text())["groups"]
    distinct = sum(len(set(g["written_as"].values())) for g in groups)
    assert len(list((tmp_path / "ray" / "tasks" / "sensitivity" / "figures").glob("*.json"))) == distinct


def _thread_probe(seconds: float, output: str, threads: int | None) -> None:
    """A task that records the threads it was given and holds its CPU for `seconds`."""
    import torch

    started = time.time()
    time.sleep(seconds)                                  # long enough for the two tasks to overlap
    Path(output).write_text(json.dumps({
        "torch": torch.get_num_threads(), "omp": int(os.environ["OMP_NUM_THREADS"]), "llama": threads,
        "node": ray.get_runtime_context().get_node_id(), "start": started, "end": time.time()}))


def test_two_tasks_on_one_node_never_run_more_threads_than_its_cpus(cluster, tmp_path):
    """Two one-CPU tasks placed together on the head (2 CPUs) through the executor's own entry: each runs 1 torch,
    OpenMP and llama.cpp thread."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from impq.sweep.graph import Task, _on_ray

    address, _ = cluster
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])    # the probe lives in this test module
    head = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("impq_bench"))
    placed = ray.remote(_on_ray).options(num_cpus=1,
                                         scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False))
    tasks = [Task(f"probe-{i}", "probe", str(tmp_path / f"probe-{i}.json"), _thread_probe,
                  {"seconds": 3.0, "output": str(tmp_path / f"probe-{i}.json")}) for i in range(2)]
    ray.get([placed.remote(t) for t in tasks])
    seen = [json.loads(Path(t.output).read_text()) for t in tasks]
    assert all(s["node"] == head for s in seen)
    assert seen[0]["start"] < seen[1]["end"] and seen[1]["start"] < seen[0]["end"]        # they ran together
    for kind in ("torch", "omp", "llama"):
        assert sum(s[kind] for s in seen) <= HEAD_CPUS, seen
