"""Allocation under a size budget: never over it, optimal on instances small enough to enumerate (and within the
rounding on large ones), between two
uniform sizes for a budget between them, and end to end through impq quantize --target-bpw and llama.cpp."""

from __future__ import annotations

import itertools
import json
import random

import gguf
import pytest

from impq.defaults import default_eval_data
from impq.errors import ImpqError
from impq.quant.allocate import Option, allocate
from impq.runtime.llamacpp import PairRunner
from impq.verify import DEFAULT_PROMPTS, default_images


def _instance(seed: int, groups: int = 5):
    rng = random.Random(seed)
    types = [("q2", 2.6), ("q3", 3.4), ("q4", 4.5), ("q6", 6.6), ("q8", 8.5)]
    options = []
    for _ in range(groups):
        weights, sensitivity = rng.choice([1000, 4000, 16000]), rng.uniform(0.1, 10)
        options.append([Option(name, int(weights * bpw / 8), sensitivity * 2 ** -bpw * rng.uniform(0.5, 2))
                        for name, bpw in types])
    return options


@pytest.mark.parametrize("seed", range(12))
def test_never_over_budget_and_the_exhaustive_optimum(seed):
    options = _instance(seed)
    smallest, largest = (sum(f(o.bytes for o in opts) for opts in options) for f in (min, max))
    budget = random.Random(seed).randint(smallest, largest)
    choice = allocate(options, budget)
    size = sum(opts[i].bytes for opts, i in zip(options, choice))
    assert size <= budget
    kld = sum(opts[i].kld for opts, i in zip(options, choice))
    best = min(sum(o.kld for o in combo) for combo in itertools.product(*options)
               if sum(o.bytes for o in combo) <= budget)
    assert kld <= best + 1e-12                  # budgets under 20000 bytes: whole-byte units, exactly optimal


def test_large_budgets_stay_within_the_budget_and_the_rounding():
    rng = random.Random(7)
    options = [[Option(t, int(w * b / 8), s * 2 ** -b) for t, b in (("q3", 3.4), ("q4", 4.5), ("q6", 6.6))]
               for w, s in ((rng.choice([4e6, 2.6e7]), rng.uniform(0.1, 10)) for _ in range(64))]
    q4 = sum(opts[1].bytes for opts in options)
    choice = allocate(options, q4)
    assert sum(opts[i].bytes for opts, i in zip(options, choice)) <= q4
    # no worse than uniform q4, which fits the same budget
    assert sum(opts[i].kld for opts, i in zip(options, choice)) <= sum(opts[1].kld for opts in options)


def test_a_budget_between_two_uniform_types_gives_a_mix_between_them():
    options = _instance(3, groups=8)
    q4, q6 = (sum(opts[k].bytes for opts in options) for k in (2, 3))
    choice = allocate(options, (q4 + q6) // 2)
    size = sum(opts[i].bytes for opts, i in zip(options, choice))
    assert q4 <= size <= (q4 + q6) // 2 and len(set(choice)) > 1


def test_a_budget_below_the_smallest_file_is_refused():
    options = _instance(0)
    with pytest.raises(ImpqError, match="below the smallest possible"):
        allocate(options, sum(min(o.bytes for o in opts) for opts in options) - 1)


def _calib(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"image": str(i), "prompt": p}) for i in default_images()
                              for p in DEFAULT_PROMPTS) + "\n")
    return path


def test_target_bpw_end_to_end(run_cli, models_dir, tmp_path):
    out = tmp_path / "out"
    status, stdout, err = run_cli("quantize", models_dir / "imp-phi2", "--type", "q4_0", "--method", "rtn",
                                  "--target-bpw", "6.0", "--candidate-types", "q4_0,q8_0", "--sensitivity-data",
                                  default_eval_data(), "--calib", _calib(tmp_path), "--nsamples", "4", "--out", out,
                                  "--verify-items", "0", "--json")
    assert status == 0, err
    allocation = json.loads(stdout)["allocation"]
    assert allocation["achieved_bytes"] <= allocation["budget_bytes"] and allocation["achieved_bpw"] <= 6.0
    assert set(allocation["groups"].values()) == {"q4_0", "q8_0"}          # 4.5 < 6.0 < 8.5: a real mix
    text = next(p for p in out.glob("*.gguf") if not p.name.startswith("mmproj-"))
    assert text.name == "imp-phi2-MIX6BPW-rtn.gguf"
    types = {t.tensor_type for t in gguf.GGUFReader(text).tensors if t.name.startswith("blk.") and len(t.shape) == 2}
    assert types == {gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0}
    with PairRunner(text, next(out.glob("mmproj-*.gguf"))) as runner:
        assert runner.run(None, "hello", 2).tokens


def test_target_bpw_below_the_smallest_mix(run_cli, models_dir, tmp_path):
    status, _, err = run_cli("quantize", models_dir / "imp-phi2", "--target-bpw", "3.0", "--candidate-types",
                             "q4_0,q8_0", "--sensitivity-data", default_eval_data(), "--calib", _calib(tmp_path),
                             "--out", tmp_path / "out")
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and "--target-bpw 3.0" in lines[0] and "4.500" in lines[0], err
    assert not (tmp_path / "out").exists()


def test_target_size_counts_the_whole_file(run_cli, models_dir, tmp_path):
    calib = _calib(tmp_path)
    common = ("--method", "rtn", "--calib", calib, "--nsamples", "4", "--verify-items", "0", "--json")
    sizes = {}
    for type_name, bits in (("q4_0", "4"), ("q8_0", "8")):
        status, stdout, err = run_cli("quantize", models_dir / "imp-phi2", "--bits", bits, "--type", type_name, "--out",
                                      tmp_path / type_name, *common)
        assert status == 0, err
        sizes[type_name] = next(p for p in (tmp_path / type_name).glob("*.gguf")
                                if not p.name.startswith("mmproj-")).stat().st_size
    target = (sizes["q4_0"] + sizes["q8_0"]) // 2
    status, stdout, err = run_cli("quantize", models_dir / "imp-phi2", "--type", "q4_0", "--target-size", str(target),
                                  "--candidate-types", "q4_0,q8_0", "--sensitivity-data", default_eval_data(),
                                  "--out", tmp_path / "mix", *common)
    assert status == 0, err
    allocation = json.loads(stdout)["allocation"]
    achieved = next(p for p in (tmp_path / "mix").glob("*.gguf") if not p.name.startswith("mmproj-")).stat().st_size
    assert allocation["achieved_file_bytes"] == achieved
    assert sizes["q4_0"] < achieved <= target
    assert 0 <= allocation["predicted_file_bytes"] - achieved <= 64       # the header's recipe, counted at its longest
    status, _, err = run_cli("quantize", models_dir / "imp-phi2", "--target-size", str(sizes["q4_0"] - 1000),
                             "--candidate-types", "q4_0,q8_0", "--sensitivity-data", default_eval_data(),
                             "--calib", calib, "--out", tmp_path / "never")
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and "below the smallest possible file" in lines[0], err
    assert not (tmp_path / "never").exists()
    status, _, err = run_cli("quantize", models_dir / "imp-phi2", "--target-size", "big", "--out", tmp_path / "never")
    assert status == 2 and "--target-size big" in err


def test_a_size_budget_can_include_the_mmproj(run_cli, models_dir, tmp_path):
    """--budget-includes-vision: the vision side's groups are chosen with the decoder's (from the candidates or 16
    bits, by their sensitivity through images); the pair never exceeds the budget, with room above the uniform
    Q4_0 pair and with too little for its F16 tower."""
    calib = _calib(tmp_path)
    common = ("--method", "rtn", "--calib", calib, "--nsamples", "4", "--verify-items", "0", "--json")
    status, stdout, err = run_cli("quantize", models_dir / "imp-phi2", "--type", "q4_0", "--out", tmp_path / "u",
                                  *common)
    assert status == 0, err
    files = {p.name.startswith("mmproj-"): p.stat().st_size for p in (tmp_path / "u").glob("*.gguf")}
    for target in (files[False] + files[True] + 3000, files[False] + int(0.7 * files[True])):
        out = tmp_path / f"mix-{target}"
        status, stdout, err = run_cli("quantize", models_dir / "imp-phi2", "--type", "q4_0", "--target-size",
                                      str(target), "--budget-includes-vision", "--candidate-types", "q4_0,q8_0",
                                      "--sensitivity-data", default_eval_data(), "--out", out, *common)
        assert status == 0, err
        allocation = json.loads(stdout)["allocation"]
        written = sum(p.stat().st_size for p in out.glob("*.gguf"))
        assert allocation["achieved_file_bytes"] == written <= target and allocation["vision_sensitivity_groups"]
        mmproj = next(out.glob("mmproj-*.gguf"))
        quantized = [t for t in gguf.GGUFReader(mmproj).tensors
                     if t.tensor_type not in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32)]
        assert all(t.tensor_type in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0)
                   for t in quantized)
        if target < files[False] + files[True]:
            assert quantized                                # the F16 tower does not fit: part of it shrank
    status, _, err = run_cli("quantize", models_dir / "imp-phi2", "--budget-includes-vision", "--out",
                             tmp_path / "never")
    assert status == 2 and "--budget-includes-vision goes with --target-size" in err
    assert not (tmp_path / "never").exists()
    text = tmp_path / "text.txt"
    text.write_text("Plain text cannot measure the tower.\n")
    status, _, err = run_cli("quantize", models_dir / "imp-phi2", "--target-size", str(target),
                             "--budget-includes-vision", "--sensitivity-data", text, "--calib", calib,
                             "--out", tmp_path / "never")
    assert status == 2 and "VQA JSONL" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "never").exists()


def test_a_report_s_sensitivity_serves_another_budget(run_cli, models_dir, tmp_path):
    """--sensitivity-file: the groups measured by one budgeted run allocate another budget exactly as measuring
    them again would; no machine path reaches the recipe."""
    common = ("--type", "q4_0", "--method", "rtn", "--candidate-types", "q4_0,q8_0", "--calib", _calib(tmp_path),
              "--nsamples", "4", "--verify-items", "0", "--json")
    data = ("--sensitivity-data", default_eval_data())
    status, stdout, err = run_cli("quantize", models_dir / "imp-phi2", "--target-bpw", "6.0", *data, *common,
                                  "--out", tmp_path / "first")
    assert status == 0, err
    report = next((tmp_path / "first").glob("*.report.json"))
    assert json.loads(report.read_text())["allocation"]["sensitivity_groups"]
    measured = run_cli("quantize", models_dir / "imp-phi2", "--target-bpw", "7.0", *data, *common,
                       "--out", tmp_path / "measured")
    reused = run_cli("quantize", models_dir / "imp-phi2", "--target-bpw", "7.0", "--sensitivity-file", report,
                     *common, "--out", tmp_path / "reused")
    assert measured[0] == reused[0] == 0, reused[2]
    assert json.loads(reused[1])["allocation"]["groups"] == json.loads(measured[1])["allocation"]["groups"]
    recipe = next((tmp_path / "reused").glob("*.recipe.yaml")).read_text()
    assert f"sensitivity_file: {report.name}" in recipe and str(tmp_path) not in recipe

    status, _, err = run_cli("quantize", models_dir / "imp-phi2", "--target-bpw", "7.0", "--sensitivity-file",
                             report, "--type", "q4_0", "--method", "rtn", "--candidate-types", "q4_0,q5_0",
                             "--calib", _calib(tmp_path), "--nsamples", "4", "--out", tmp_path / "bad")
    assert status == 2 and "no sensitivity at q5_0" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
