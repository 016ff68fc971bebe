"""The sweep's work as a graph of tasks, and the executors that run it.

A task is a module-level function with picklable arguments, keyed by the digests of its inputs, that writes one
file (atomically) which any executor finds: a task whose file exists is done and is never run again, whichever
executor wrote it. Executors:

- `InProcess` (the default): each task in turn in this process, with --threads threads (or the process's own).
- `RayExecutor` (`impq[ray]`): the same tasks on a Ray cluster (or a local one it starts). A task holds the CPUs it
  asks for and runs with that many torch, OpenMP and llama.cpp threads: two processes whose OpenMP threads spin for
  the same cores slow each other many times over. A timing task also holds `impq_bench`, a resource each node has
  one of, so no two timings share a machine. A task whose worker dies is retried (Ray's `max_retries`); a driver
  that dies is resumed by a re-run, which finds every file already written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import ImpqError

BENCH_RESOURCE = "impq_bench"
RETRIES = 3


def task_key(*parts) -> str:
    """A short digest of a task's inputs (the digests and settings that key the cache): what names its file."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Task:
    key: str                          # its inputs' digest: unique in the graph
    kind: str                         # quantize | mmproj | reference | evaluate | time
    output: str                       # the file it writes; its existence means done
    function: Callable                # a module-level function: function(**arguments, threads=N) writes `output`
    arguments: dict = field(default_factory=dict)
    after: tuple[str, ...] = ()       # keys of the tasks whose files it reads
    cpus: int = 1                     # what it holds on a cluster, and its thread budget there
    timing: bool = False              # holds a machine's BENCH_RESOURCE: never beside another timing
    accelerated: bool = False         # runs on a GPU where the cluster has one

    @property
    def done(self) -> bool:
        return os.path.isfile(self.output)


def run_task(task: Task, threads: int | None) -> dict:
    """Run `task` unless its file exists, with `threads` for torch, OpenMP and llama.cpp (None: the process's own);
    where and when it ran."""
    start = time.time()
    if not task.done:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
            os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
        task.function(**task.arguments, threads=threads)
    return {"key": task.key, "kind": task.kind, "node": _node(), "start": start, "end": time.time(),
            "threads": threads}


def _node() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return socket.gethostname()


def ordered(tasks: list[Task]) -> list[Task]:
    """The tasks whose files are missing, each after those it reads (a task's own order otherwise)."""
    pending = {t.key: t for t in tasks if not t.done}
    placed, order = set(), []

    def place(task: Task) -> None:
        if task.key in placed:
            return
        for key in task.after:
            if key in pending:
                place(pending[key])
        placed.add(task.key)
        order.append(task)

    for task in pending.values():
        place(task)
    return order


class InProcess:
    """Every task here, in order, with `threads` (the sweep's --threads; None: this process's own)."""
    name = "in-process"

    def __init__(self, threads: int | None = None):
        self.threads = threads

    def run(self, tasks: list[Task], on_task: Callable[[Task], None] | None = None) -> list[dict]:
        records = []
        for task in ordered(tasks):
            if on_task:
                on_task(task)
            records.append(run_task(task, self.threads))
        return records


def _on_ray(task: Task, *_inputs) -> dict:
    """A Ray task: `_inputs` are the records of the tasks it reads, passed so that Ray runs it after them."""
    return run_task(task, task.cpus)


class RayExecutor:
    """The tasks on a Ray cluster: `address` (ray://..., host:port, or "auto"), or None for a local cluster of this
    machine's CPUs with one BENCH_RESOURCE."""
    name = "ray"

    def __init__(self, address: str | None = None):
        try:
            import ray
        except ImportError:
            raise ImpqError(None, "--executor ray needs Ray: pip install 'impq[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            options = {"address": address} if address else {"resources": {BENCH_RESOURCE: 1}}
            try:
                ray.init(**options, log_to_driver=False, include_dashboard=False, ignore_reinit_error=True)
            except ConnectionError as err:
                raise ImpqError(None, f"--ray-address {address}: no Ray cluster there ({err})") from None
        if not ray.cluster_resources().get(BENCH_RESOURCE):
            raise ImpqError(None, f"the Ray cluster has no '{BENCH_RESOURCE}' resource: start each node with "
                                  f"--resources '{{\"{BENCH_RESOURCE}\": 1}}' so that timings never share a machine")
        self.gpus = ray.cluster_resources().get("GPU", 0) > 0

    def run(self, tasks: list[Task], on_task: Callable[[Task], None] | None = None) -> list[dict]:
        remote = self.ray.remote(_on_ray)
        refs = {}
        # Ray prints its workers' failures (a retried task's) on the driver's stdout: stdout holds --json's object
        with contextlib.redirect_stdout(sys.stderr):
            for task in ordered(tasks):
                options = {"num_cpus": task.cpus, "max_retries": RETRIES,
                           "num_gpus": 1 if task.accelerated and self.gpus else 0}
                if task.timing:
                    options["resources"] = {BENCH_RESOURCE: 1}
                refs[task.key] = remote.options(**options).remote(task, *(refs[k] for k in task.after if k in refs))
                if on_task:
                    on_task(task)
            return self.ray.get(list(refs.values()))


def executor(name: str, address: str | None = None, threads: int | None = None):
    """`threads`: in this process, every task's thread budget (None: the process's own)."""
    if name == InProcess.name:
        if address is not None:
            raise ImpqError(None, "--ray-address goes with --executor ray")
        return InProcess(threads)
    if name == RayExecutor.name:
        return RayExecutor(address)
    raise ImpqError(None, f"--executor {name}: choose in-process or ray")
