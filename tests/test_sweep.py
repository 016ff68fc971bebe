"""`impq sweep-resolution`: a two-point sweep on the shipped model writes its CSV, JSON and plots and a recommended
pair, a re-run recomputes nothing, and bad grids are one-line errors that write nothing."""

from __future__ import annotations

import csv
import json

import gguf
import pytest

import impq.measure.bench
import impq.sweep.resolution as sweep
import impq.sweep.tasks as sweep_tasks
from impq.defaults import default_model_dir
from impq.runtime.gguf_pair import resolve_pair
from impq.sweep.plots import pareto_front


def test_two_point_sweep_and_a_rerun_that_recomputes_nothing(run_cli, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    args = ("sweep-resolution", "--resolutions", "168,84", "--types", "f16", "--limit", "8", "--runs", "1",
            "--out", out, "--json")
    status, stdout, err = run_cli(*args)
    assert status == 0, err
    result = json.loads(stdout)
    rows = result["points"]
    assert [(r["image_size"], r["runtime"]) for r in rows] == [(168, "llama.cpp"), (84, "llama.cpp")]
    assert rows[0]["original"] and rows[0]["image_tokens"] == 144 and rows[1]["image_tokens"] == 36
    assert all(r["ttft_s"] > 0 and r["phone_ttft_s"] > 0 and 0 <= r["accuracy"] <= 1 for r in rows)
    assert rows[0]["mean_kld"] < rows[1]["mean_kld"]             # half resolution moves the distribution
    with open(out / "sweep.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [int(r["image_size"]) for r in table] == [168, 84]
    record = json.loads((out / "sweep.json").read_text())
    assert record["points"] == rows
    # every point's type ran one recipe: F16 is the export's (no method), and its files carry it
    assert list(record["recipes"]) == ["F16"] and record["recipes"]["F16"]["method"]["name"] == "none"
    carried = gguf.GGUFReader(next((out / "llm").glob("*.gguf"))).fields["impq.settings"]
    assert json.loads(bytes(carried.parts[carried.data[0]])) == record["recipes"]["F16"]
    for name in ("accuracy_vs_ttft", "accuracy_vs_phone_ttft", "accuracy_vs_size"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text, mmproj = resolve_pair(out / "recommended")
    assert result["recommended"]["image_size"] == 168 and mmproj.name.endswith("-168px.gguf")

    def must_not_run(*args, **kwargs):
        raise AssertionError("a cached point was recomputed")

    monkeypatch.setattr(sweep_tasks, "evaluate", must_not_run)           # the sweep's tasks (sweep/tasks.py)
    monkeypatch.setattr(impq.measure.bench, "bench_pair", must_not_run)
    monkeypatch.setattr(sweep_tasks, "write_text_gguf", must_not_run)
    monkeypatch.setattr(sweep_tasks, "write_mmproj_gguf", must_not_run)
    status, stdout, err = run_cli(*args)
    assert status == 0, err
    assert json.loads(stdout)["points"] == rows
    # nor does another method or calibration size: an F16 point is an export, which uses neither
    status, stdout, err = run_cli(*args, "--method", "rtn", "--nsamples", "4")
    assert status == 0, err
    assert json.loads(stdout)["points"] == rows
    status, stdout, err = run_cli(*args, "--dry-run")                # the graph of a finished sweep: nothing to run
    assert status == 0, err
    graph = json.loads(stdout)["tasks"]
    assert [t["kind"] for t in graph] == ["point", "point"] and all(t["done"] for t in graph)


def test_dry_run_prints_the_task_graph_and_writes_nothing(run_cli, tmp_path):
    out = tmp_path / "never"
    status, stdout, err = run_cli("sweep-resolution", "--resolutions", "168,84", "--types", "f16,q4_0", "--limit",
                                  "6", "--shard-items", "4", "--out", out, "--dry-run", "--json")
    assert status == 0, err
    graph = json.loads(stdout)
    kinds = [t["kind"] for t in graph["tasks"]]
    # two types, two reductions, one reference, 2 shards x 4 (type, reduction), one timing per point
    assert graph["points"] == 4 and {k: kinds.count(k) for k in set(kinds)} == {
        "quantize": 2, "mmproj": 2, "reference": 1, "evaluate": 8, "time": 4}
    assert not any(t["done"] for t in graph["tasks"]) and not out.exists()
    # timings come last, each after every accuracy task: none shares its machine with an evaluation
    accuracy = {t["key"] for t in graph["tasks"] if t["kind"] != "time"}
    assert all(set(t["after"]) == accuracy for t in graph["tasks"] if t["kind"] == "time")
    # each task says what it works on: the last shard of the Q4_0 point at 84 px holds items 4 and 5
    assert "Q4_0 84px 2 items" in {t["what"] for t in graph["tasks"] if t["kind"] == "evaluate"}
    # each task's estimate, and the graph's wall time: the sum in-process, less on more Ray workers
    seconds = [t["seconds"] for t in graph["tasks"]]
    assert all(s > 0 for s in seconds)
    walls = graph["estimated_wall_s"]
    assert walls["in-process"] == pytest.approx(sum(seconds))
    assert walls["in-process"] > walls["ray, 2 workers"] >= walls["ray, 4 workers"] >= walls["ray, 16 workers"] \
        >= max(seconds)


def test_wall_time_follows_the_graph():
    from impq.sweep.estimate import wall_seconds

    graph = [{"key": "a", "seconds": 10.0, "after": []}, {"key": "b", "seconds": 5.0, "after": ["a"]},
             {"key": "c", "seconds": 5.0, "after": []}, {"key": "d", "seconds": 1.0, "after": ["b", "c"]}]
    assert wall_seconds(graph, 1) == 21.0
    assert wall_seconds(graph, 2) == 16.0           # b waits for a; d for b
    assert wall_seconds(graph, 8) == 16.0


def test_the_estimate_reads_the_dimensions_the_exported_pair_has(tmp_path):
    """The dry run's costs come from the checkpoint's shapes: the same as those the phone estimate reads from the
    written pair."""
    from impq.defaults import default_model_dir
    from impq.measure.phone import ModelCost
    from impq.models.layouts import read_spec
    from impq.models.reduction import vision_reduction
    from impq.recipe import export_with_recipe
    from impq.sweep.estimate import model_cost

    spec = read_spec(default_model_dir())
    pair = export_with_recipe(spec, tmp_path, "f16")
    written = ModelCost.from_gguf_pair(pair.text_path, pair.mmproj_path)
    estimated = model_cost(spec, "f16", vision_reduction(spec.vision))
    for field in ("text_matmul_params", "text_layers", "text_hidden", "vision_matmul_params", "vision_layers",
                  "vision_hidden", "vision_tokens", "pooled"):
        assert getattr(estimated, field) == getattr(written, field), field
    assert estimated.text_bytes_per_token == pytest.approx(written.text_bytes_per_token, rel=0.02)


def test_budget_picks_the_cheaper_point():
    rows = [{"runtime": "llama.cpp", "accuracy": 1.0, "mean_kld": 0.0, "phone_ttft_s": 2.0, "ttft_s": 1.0, "total_mb": 10},
            {"runtime": "llama.cpp", "accuracy": 0.9, "mean_kld": 0.1, "phone_ttft_s": 0.5, "ttft_s": 0.3, "total_mb": 10},
            {"runtime": "pytorch-only", "accuracy": 0.95, "mean_kld": 0.1, "phone_ttft_s": 0.4, "ttft_s": None,
             "total_mb": 10},
            {"runtime": "llama.cpp", "accuracy": 1.0, "mean_kld": 0.0, "phone_ttft_s": 2.0, "ttft_s": 0.8, "total_mb": 10}]
    assert sweep.recommend(rows, sweep.SweepSettings()) is rows[3]          # the faster flash-attention setting
    assert sweep.recommend(rows, sweep.SweepSettings(budget_ttft_ms=1000)) is rows[1]
    assert sweep.recommend(rows, sweep.SweepSettings(budget_ttft_ms=100)) is None
    assert [r["accuracy"] for r in pareto_front(rows, "phone_ttft_s")] == [0.95, 1.0]
    assert [r["accuracy"] for r in pareto_front(rows, "ttft_s")] == [0.9, 1.0]


@pytest.mark.parametrize("args,needle", [
    (["--resolutions", "100"], "image size 100"),
    (["--resolutions", "196"], "image size 196"),
    (["--resolutions", "98", "--token-reduction", "pool2"], "odd"),
    (["--resolutions", "84,x"], "--resolutions 84,x"),
    (["--device-profile", "nokia-3310"], "nokia-3310"),
    (["--types", ""], "empty grid"),
    (["--types", "q4_k_m"], "Q4_K_M"),
    (["--token-reduction", "pool4"], "pool4"),
    (["--flash-attn", "on,sometimes"], "sometimes"),
    (["--vision-types", "f16,q9_9"], "--vision-types q9_9"),
    (["--types", "q4_0,bpw99"], "target-bpw 99"),
])
def test_bad_grids_are_one_line_errors(run_cli, tmp_path, args, needle):
    status, _, err = run_cli("sweep-resolution", "--out", tmp_path / "out", *args)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("impq: error: "), err
    assert needle.lower() in lines[0].lower(), lines[0]
    assert not (tmp_path / "out").exists()


def test_default_resolutions_hold_native_and_half():
    from impq.models.layouts import read_spec

    assert sweep.default_resolutions(read_spec(default_model_dir())) == [168, 126, 84]


def test_flash_attention_is_a_timed_dimension(run_cli, tmp_path):
    status, stdout, err = run_cli("sweep-resolution", "--resolutions", "84", "--types", "f16", "--flash-attn", "on,off",
                                  "--limit", "4", "--runs", "1", "--out", tmp_path / "out", "--json")
    assert status == 0, err
    result = json.loads(stdout)
    rows = result["points"]
    assert [r["flash_attn"] for r in rows] == ["on", "off"]
    assert rows[0]["accuracy"] == rows[1]["accuracy"] and rows[0]["key"] != rows[1]["key"]
    assert result["recommended"]["flash_attn"] in ("on", "off")


def test_the_towers_precision_is_a_dimension(run_cli, tmp_path):
    """--vision-types f16,q4_k: each mmproj written once per tower type and resolution (the Q4_K one calibrated, on
    its grids), every LLM type paired with each; the rows, the recommendation and the CSV say which tower."""
    out = tmp_path / "sweep"
    status, stdout, err = run_cli("sweep-resolution", "--resolutions", "168,84", "--types", "q4_0", "--vision-types",
                                  "f16,q4_k", "--nsamples", "8", "--limit", "6", "--runs", "1", "--out", out, "--json")
    assert status == 0, err
    rows = json.loads(stdout)["points"]
    assert sorted((r["vision_type"], r["image_size"]) for r in rows) == [("F16", 84), ("F16", 168), ("Q4_K", 84),
                                                                          ("Q4_K", 168)]
    mmprojs = sorted((out / "mmproj").glob("*.gguf"))
    assert len(mmprojs) == 4 and len({r["mmproj_gguf"] for r in rows}) == 4 and len({r["text_gguf"] for r in rows}) == 1
    for row in rows:
        types = {t.tensor_type for t in gguf.GGUFReader(out / row["mmproj_gguf"]).tensors if len(t.shape) == 2
                 and t.name != "v.patch_embd.weight"}
        quantized = types - {gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32}
        assert bool(quantized) == (row["vision_type"] == "Q4_K"), (row["vision_type"], types)
    # the tower quantized once: the 84 px mmproj holds the 168 px one's bytes but for its position table
    native, reduced = (gguf.GGUFReader(out / next(r["mmproj_gguf"] for r in rows if r["vision_type"] == "Q4_K" and
                                                  r["image_size"] == size)) for size in (168, 84))
    reduced_tensors = {t.name: t for t in reduced.tensors}
    for tensor in native.tensors:
        same = reduced_tensors[tensor.name].data.tobytes() == tensor.data.tobytes()
        assert same != tensor.name.startswith("v.position_embd"), tensor.name
    with open(out / "sweep.csv") as handle:
        assert {r["vision_type"] for r in csv.DictReader(handle)} == {"F16", "Q4_K"}
    recommended = json.loads((out / "sweep.json").read_text())["recommended"]
    assert recommended["vision_type"] in ("F16", "Q4_K") and (out / "recommended").is_dir()


def test_a_budgeted_mix_is_a_sweep_type(run_cli, tmp_path):
    """--types q4_0,bpw5: the mix is quantized once (impq quantize --target-bpw 5, its sensitivity on the data's last
    items) and measured like any type."""
    out = tmp_path / "sweep"
    status, stdout, err = run_cli("sweep-resolution", "--resolutions", "168", "--types", "q4_0,bpw5", "--nsamples",
                                  "8", "--limit", "6", "--runs", "1", "--out", out, "--json")
    assert status == 0, err
    rows = {r["type"]: r for r in json.loads(stdout)["points"]}
    assert set(rows) == {"Q4_0", "BPW5"}
    mix = gguf.GGUFReader(out / rows["BPW5"]["text_gguf"])
    decoder = [t for t in mix.tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    assert len({t.tensor_type for t in decoder}) > 1                     # a mix, not one type
    assert rows["BPW5"]["text_gguf_mb"] > rows["Q4_0"]["text_gguf_mb"]    # 5 bits per weight against Q4_0's 4.5
