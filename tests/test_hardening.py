"""What a new user meets in the first hour: usage errors, type names as llama.cpp writes them, damaged or unusual
checkpoints, strict calibration files, pairs of any names, damaged GGUF files, counts of zero, and artifact sets
that appear whole. Every bad input: exit status 2, one line `impq: error: ...` naming the value, nothing written."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from impq import __version__
from impq.calib import read_calibration
from impq.defaults import default_model_dir
from impq.errors import ImpqError
from impq.recipe import export_with_recipe
from impq.models.layouts import read_spec
from impq.quantize import quantize_model
from impq.recipe import Recipe
from impq.verify import DEFAULT_PROMPTS, default_images, verify_pair


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _assert_one_line_error(status: int, stderr: str, *names) -> str:
    assert status == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("impq: error: "), stderr
    assert "Traceback" not in stderr
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


# ---- 1. usage errors, --version, type names --------------------------------------------------------------------

@pytest.mark.parametrize("args,names", [
    (["bogus"], ["bogus"]),
    (["export"], ["export", "model"]),
    (["export", "x", "--bogus"], ["--bogus"]),
    (["quantize", "--nsamples", "0"], ["quantize", "--nsamples"]),
    (["eval", "--limit", "0"], ["eval", "--limit"]),
    (["bench", "--runs", "x"], ["bench", "--runs"]),
    (["data", "shapes", "--split", "eval", "--n", "0", "--out", "split"], ["--n"]),
])
def test_usage_errors_are_one_line(tmp_path, args, names):
    """The real entry point in a fresh process, as a user runs it, with the typer/click installed here."""
    done = subprocess.run([sys.executable, "-m", "impq.cli", *args], capture_output=True, text=True, cwd=tmp_path)
    line = _assert_one_line_error(done.returncode, done.stderr).lower()
    assert all(name.lower() in line for name in names), line      # older click writes argument names in capitals
    assert _files(tmp_path) == []


@pytest.mark.parametrize("args", [
    ["quantize", "--calib", "missing.jsonl", "--out", "out"],
    ["quantize", "--target-bpw", "5", "--sensitivity-file", "missing.json", "--out", "out"],
])
def test_an_error_inside_a_long_command_is_exactly_one_line(tmp_path, args):
    """Raised where the progress display runs: stderr holds the error line and nothing else, not even a blank."""
    done = subprocess.run([sys.executable, "-m", "impq.cli", *args], capture_output=True, text=True, cwd=tmp_path)
    _assert_one_line_error(done.returncode, done.stderr, "missing.")
    assert done.stderr.startswith("impq: error: ") and done.stderr.count("\n") == 1, repr(done.stderr)
    assert _files(tmp_path) == []


def test_version():
    done = subprocess.run([sys.executable, "-m", "impq.cli", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"impq {__version__}"


def test_type_names_in_any_case(run_cli, models_dir, tmp_path):
    status, out, err = run_cli("export", models_dir / "imp-phi2", "--out", tmp_path, "--type", "Q4_0",
                               "--mmproj-type", "F16", "--json")
    assert status == 0, err
    written = json.loads(out)
    assert written["text_gguf"].endswith("-Q4_0.gguf")
    mmproj_types = {t.tensor_type for t in gguf.GGUFReader(written["mmproj_gguf"]).tensors}
    assert gguf.GGMLQuantizationType.F16 in mmproj_types and gguf.GGMLQuantizationType.Q4_0 not in mmproj_types
    target = Recipe.from_flags(bits=4, type="Q4_K_S", embeddings="F16", vision="Q8_0").target
    assert (target.type, target.embeddings, target.vision) == ("q4_k", "f16", "q8_0")


@pytest.mark.parametrize("command", ["export", "quantize"])
def test_llama_cpp_mix_names_point_to_impq_options(run_cli, models_dir, tmp_path, command):
    status, _, err = run_cli(command, models_dir / "imp-phi2", "--out", tmp_path / "out", "--type", "Q4_K_M")
    line = _assert_one_line_error(status, err, "Q4_K_M", "--type q4_k", "--embeddings")
    assert "mix" in line
    assert not (tmp_path / "out").exists()


# ---- 3. damaged and unusual checkpoints --------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_weight_is_refused_naming_tensor_and_index(run_cli, models_dir, tmp_path, bad):
    model = shutil.copytree(models_dir / "imp-phi2", tmp_path / "model")
    tensors = load_file(model / "model.safetensors")
    key = "transformer.h.1.mlp.fc2.weight"
    tensors[key][3, 5] = bad
    save_file(tensors, model / "model.safetensors")
    status, _, err = run_cli("export", model, "--out", tmp_path / "out")
    _assert_one_line_error(status, err, model / "model.safetensors", key, "[3, 5]")
    assert _files(tmp_path / "out") == []


def test_non_finite_weight_in_a_fused_tensor_gets_the_checkpoint_index(models_dir, tmp_path):
    model = shutil.copytree(models_dir / "imp-phi2", tmp_path / "model")
    tensors = load_file(model / "model.safetensors")
    key = "transformer.h.0.mixer.Wqkv.weight"            # split into q, k, v row ranges by the loader
    rows = tensors[key].shape[0]
    tensors[key][rows - 1, 2] = math.nan                 # the last row of v
    save_file(tensors, model / "model.safetensors")
    with pytest.raises(ImpqError, match=rf"'{key}' holds nan at index \[{rows - 1}, 2\]"):
        export_with_recipe(read_spec(model), tmp_path / "out", "f16")


def test_transformers_5_llava_siglip_save_exports_and_matches(tmp_path):
    """A folder written by LlavaForConditionalGeneration.save_pretrained itself: its SigLIP tower is stored as
    `vision_tower.embeddings...`, without the `vision_model.` level of hub checkpoints."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    from impq.models.testing import build_sentencepiece_tokenizer, realistic_init

    tokenizer, sentencepiece_model = build_sentencepiece_tokenizer("llama")
    rows = -(-tokenizer.get_vocab_size() // 32) * 32
    config = LlavaConfig(
        vision_config=SiglipVisionConfig(hidden_size=64, intermediate_size=120, num_attention_heads=2,
                                         num_hidden_layers=3, image_size=84, patch_size=14),
        text_config=LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=160, vocab_size=rows, bos_token_id=tokenizer.token_to_id("<s>"),
                                eos_token_id=tokenizer.token_to_id("</s>")),
        image_token_index=tokenizer.token_to_id("<image>"), vision_feature_layer=-2, projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(config)
    realistic_init(model)
    folder = tmp_path / "llava"
    model.save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer.model").write_bytes(sentencepiece_model)
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                              "add_bos_token": True}))
    keys = list(load_file(folder / "model.safetensors"))
    assert any(k.startswith("vision_tower.embeddings.") for k in keys) and not any("vision_model" in k for k in keys)

    spec = read_spec(folder)
    assert spec.layout == "llava-hf" and spec.vision.kind == "siglip"
    export_with_recipe(spec, tmp_path / "pair", "f16")
    report = verify_pair(tmp_path / "pair", folder)
    assert report.passed is True and report.generations_matched == "6/6", report.to_dict()


TOKENIZATION_TEXTS = ["Numbers like 12, 345 and 6789 split into digits.", "Two  spaces,   three    spaces.",
                      "A new line.\nTwo new lines.\n\nTabs\tand end.\n", "Café crème, naïve façade, 東京, Zürich, ß ∑ 😀.",
                      " leading space", "What is in the image?"]


@pytest.mark.parametrize("layout", ["imp-phi3", "llava-siglip"])
def test_sentencepiece_vocabulary_tokenizes_as_the_checkpoint(models_dir, tmp_path, layout):
    spec = read_spec(models_dir / layout)
    assert (spec.folder / "tokenizer.model").is_file()
    result = export_with_recipe(spec, tmp_path, "f16")
    reader = gguf.GGUFReader(result.text_path)
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    assert len(tokens) == len(types) == len(scores) == spec.text_config.vocab_size
    assert types[tokens.index("<0x0A>")] == gguf.TokenType.BYTE and types[tokens.index("<image>")] == gguf.TokenType.CONTROL
    assert len(set(scores[3:259 + 20])) > 1                  # real SentencePiece scores, not a placeholder
    llm = llama_cpp.Llama(str(result.text_path), vocab_only=True, verbose=False)
    try:
        for text in TOKENIZATION_TEXTS + [spec.prompt("How many?").split("<image>")[1]]:
            ids = spec.tokenizer.encode(text)
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
            assert spec.tokenizer.tokenizer.id_to_token(ids[0]).startswith("▁") or text.startswith("\n")
    finally:
        llm.close()
    assert any(t.startswith("<0x") for t in (spec.tokenizer.tokenizer.id_to_token(i)
                                             for i in spec.tokenizer.encode(TOKENIZATION_TEXTS[3])))


def test_sentencepiece_tokenizer_without_its_model_file(run_cli, models_dir, tmp_path):
    model = shutil.copytree(models_dir / "imp-phi3", tmp_path / "model")
    (model / "tokenizer.model").unlink()
    status, _, err = run_cli("export", model, "--out", tmp_path / "out")
    _assert_one_line_error(status, err, model / "tokenizer.json", "tokenizer.model")
    assert _files(tmp_path / "out") == []


# ---- 4. strict calibration files ---------------------------------------------------------------------------------

def _calibration_lines() -> list[str]:
    image = default_images()[0]
    return [json.dumps({"image": str(image), "prompt": "What is in the image?"}),
            json.dumps({"image": None, "prompt": "Plain text."})]


@pytest.mark.parametrize("bad_line,needle", [
    ('{"image": null, "prompt": "broken"', "not JSON"),
    ('{"image": null}', "prompt"),
    ('{"image": null, "prompt": "   "}', "prompt"),
    ('{"image": "missing.png", "prompt": "x"}', "missing.png not found"),
    ('["a list"]', "JSON object"),
])
def test_every_bad_calibration_line_is_an_error(run_cli, models_dir, tmp_path, bad_line, needle):
    good = _calibration_lines()
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join([good[0], bad_line, good[1]]) + "\n")
    status, _, err = run_cli("quantize", models_dir / "imp-phi2", "--calib", calib, "--out", tmp_path / "out")
    _assert_one_line_error(status, err, calib, "line 2", needle)
    assert not (tmp_path / "out").exists()


def test_json_lines_without_the_suffix_are_read_as_jsonl(tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(_calibration_lines()) + "\n")
    samples = read_calibration(calib)
    assert [s.image is not None for s in samples] == [True, False] and samples[1].text == "Plain text."
    calib.write_text("First paragraph of text.\n\nSecond one.\n")
    assert [s.text for s in read_calibration(calib)] == ["First paragraph of text.", "Second one."]


# ---- 5 and 6. pairs of any names, damaged GGUF files -----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    result = export_with_recipe(read_spec(default_model_dir()), tmp_path_factory.mktemp("tiny"), "f16")
    return result.text_path, result.mmproj_path


def _published_layout(tiny_pair, folder: Path, texts: list[str]) -> Path:
    """A published repository's layout: text quantizations under any names beside one mmproj."""
    folder.mkdir()
    for name in texts:
        shutil.copy(tiny_pair[0], folder / name)
    shutil.copy(tiny_pair[1], folder / "mmproj-imp-tiny-f16.gguf")
    return folder


def test_folder_with_one_text_gguf_and_one_mmproj_of_any_names(run_cli, tiny_pair, tmp_path):
    folder = _published_layout(tiny_pair, tmp_path / "repo", ["imp-tiny.Q8_0-by-someone.gguf"])
    status, out, err = run_cli("eval", folder, "--limit", "3", "--json")
    assert status == 0, err
    assert json.loads(out)["n_items"] == 3


def test_several_candidates_are_listed_with_the_flags(run_cli, tiny_pair, tmp_path):
    folder = _published_layout(tiny_pair, tmp_path / "repo", ["model-Q4_K_M.gguf", "model-Q8_0.gguf"])
    before = _files(folder)
    for command in (["eval", folder], ["bench", folder], ["estimate", folder],
                    ["verify", folder, "--reference", default_model_dir()]):
        status, _, err = run_cli(*command)
        _assert_one_line_error(status, err, folder, "model-Q4_K_M.gguf", "model-Q8_0.gguf", "--text")
    assert _files(folder) == before
    status, out, err = run_cli("eval", "--text", folder / "model-Q8_0.gguf", "--limit", "2", "--json")
    assert status == 0, err
    status, out, err = run_cli("verify", "--text", folder / "model-Q4_K_M.gguf", "--mmproj",
                               folder / "mmproj-imp-tiny-f16.gguf", "--reference", default_model_dir(), "--json")
    assert status == 0 and json.loads(out)["passed"] is True, err
    status, out, err = run_cli("estimate", "--text", folder / "model-Q8_0.gguf", "--json")
    assert status == 0 and json.loads(out)["estimates"], err


def test_a_file_in_the_wrong_role(run_cli, tiny_pair):
    status, _, err = run_cli("eval", "--text", tiny_pair[0], "--mmproj", tiny_pair[0])
    _assert_one_line_error(status, err, tiny_pair[0], "expected an mmproj")


@pytest.mark.parametrize("which", ["text", "mmproj"])
@pytest.mark.parametrize("command", ["eval", "verify", "bench", "estimate"])
def test_truncated_gguf_fails_cleanly(run_cli, tiny_pair, tmp_path, which, command):
    folder = tmp_path / "pair"
    folder.mkdir()
    text, mmproj = (shutil.copy(p, folder / p.name) for p in tiny_pair)
    damaged = Path(text if which == "text" else mmproj)
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size * 2 // 3])
    args = [command, folder] + (["--reference", default_model_dir()] if command == "verify" else [])
    status, _, err = run_cli(*args)
    _assert_one_line_error(status, err, damaged, "truncated")


def test_garbage_gguf_fails_cleanly(run_cli, tiny_pair, tmp_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + b"\xff" * 64)
    status, _, err = run_cli("bench", "--text", garbage, "--mmproj", tiny_pair[1])
    _assert_one_line_error(status, err, garbage, "not a readable GGUF")


def test_a_failure_in_the_bench_process_is_one_line(run_cli, models_dir, tiny_pair, tmp_path):
    """The bench runs llama.cpp in a spawned process: an mmproj that llama.cpp refuses there (another model's,
    whose projector width differs from the text model's) comes back as one line naming the file."""
    other = export_with_recipe(read_spec(models_dir / "imp-phi2"), tmp_path / "other", "f16")
    status, _, err = run_cli("bench", "--text", tiny_pair[0], "--mmproj", other.mmproj_path, "--runs", "1")
    _assert_one_line_error(status, err, other.mmproj_path)
    assert pickle.loads(pickle.dumps(ImpqError("a.gguf", "problem"))).args == ("a.gguf: problem",)


# ---- 8. artifact sets appear whole -------------------------------------------------------------------------------

def _calib(tmp_path: Path) -> Path:
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"image": str(image), "prompt": prompt})
                              for image in default_images() for prompt in DEFAULT_PROMPTS) + "\n")
    return path


def _settings(tmp_path: Path) -> Recipe:
    return Recipe.from_flags(bits=4, type="q4_0", method="rtn", calib=str(_calib(tmp_path)), nsamples=4, seqlen=128)


def test_interrupted_quantize_leaves_no_part_of_the_set(models_dir, tmp_path):
    out = tmp_path / "out"
    stages = []

    def interrupt(text):
        stages.append(text)
        if text.startswith("verifying"):               # the text GGUF, mmproj and recipe are written by now
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_model(models_dir / "imp-phi2", out, _settings(tmp_path), verify_items=4, on_status=interrupt)
    assert stages[-1].startswith("verifying")
    assert _files(out) == [] and list(out.iterdir()) == []


def test_rerun_replaces_a_stale_set(models_dir, tmp_path):
    out = tmp_path / "out"
    first = quantize_model(models_dir / "imp-phi2", out, _settings(tmp_path), verify_items=0)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([Path(first.artifacts["text_gguf"]).name, Path(first.artifacts["mmproj_gguf"]).name,
                            Path(first.recipe).name, Path(first.recipe).name.replace(".recipe.yaml", ".report.json")])
    for path in out.iterdir():
        path.write_bytes(b"stale")
    second = quantize_model(models_dir / "imp-phi2", out, _settings(tmp_path), verify_items=0)
    assert sorted(p.name for p in out.iterdir()) == names
    assert all(p.read_bytes() != b"stale" for p in out.iterdir())
    # the report names its files relative to its folder: no path of the machine it ran on
    assert json.loads(Path(out / names[-1]).read_text() if names[-1].endswith(".json") else
                      next(out.glob("*.report.json")).read_text())["artifacts"] == {
        key: Path(value).name for key, value in second.artifacts.items()}
    assert gguf.GGUFReader(second.artifacts["text_gguf"]).tensors


# ---- 5. inputs a fresh install still met with a traceback (issue 26) ------------------------------------------

def _bomb_png(path: Path, side: int = 30000) -> Path:
    """A 1-bit PNG of side x side pixels (900 million at the default) in about 100 kB: written row by row with zlib,
    so the test itself never holds the image."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    squeeze = zlib.compressobj(9)
    row = bytes(1 + (side + 7) // 8)                            # filter byte, then the packed bits
    body = b"".join(squeeze.compress(row) for _ in range(side)) + squeeze.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bomb")
    image = _bomb_png(folder / "bomb.png")
    assert image.stat().st_size < 1_000_000
    (folder / "bomb.jsonl").write_text(json.dumps({"image": "bomb.png", "question": "What shape?", "answer": "x",
                                                   "prompt": "What shape?"}) + "\n")
    return image


@pytest.fixture(scope="module")
def imp_tiny_pair(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imp-tiny-f16")
    export_with_recipe(read_spec(default_model_dir()), out, "f16")
    return out


def test_a_decompression_bomb_is_one_line_everywhere(run_cli, models_dir, bomb, imp_tiny_pair, tmp_path):
    model, data = default_model_dir(), bomb.with_suffix(".jsonl")
    commands = [
        ("quantize", model, "--calib", data, "--method", "rtn", "--nsamples", "1", "--verify-items", "0",
         "--out", tmp_path / "q"),                                            # calibration
        ("eval", model, "--data", data),                                      # PyTorch
        ("eval", imp_tiny_pair, "--data", data, "--results", tmp_path / "r.json"),   # llama.cpp
        ("bench", imp_tiny_pair, "--image", bomb, "--runs", "1"),
        ("verify", imp_tiny_pair, "--reference", model, "--image", bomb),
    ]
    for args in commands:
        status, _, err = run_cli(*args)
        line = _assert_one_line_error(status, err, bomb, "30000x30000", "--max-image-pixels")
        assert "900000000 pixels" in line
    assert _files(tmp_path) == []


def test_the_image_limit_is_a_flag(run_cli, imp_tiny_pair, tmp_path):
    image = default_images()[0]
    status, _, err = run_cli("--max-image-pixels", "100", "bench", imp_tiny_pair, "--image", image, "--runs", "1")
    _assert_one_line_error(status, err, image, "over the limit of 100")
    status, _, err = run_cli("--max-image-pixels", "0", "bench", imp_tiny_pair)
    _assert_one_line_error(status, err, "--max-image-pixels")


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    from impq.models.preprocess import load_image

    values = np.linspace(0, 255, 64 * 48).round().astype(np.uint8).reshape(48, 64)
    Image.fromarray(values).save(tmp_path / "eight.png")
    Image.fromarray(values.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    assert Image.open(tmp_path / "sixteen.png").mode.startswith("I")
    wide, narrow = np.asarray(load_image(tmp_path / "sixteen.png")), np.asarray(load_image(tmp_path / "eight.png"))
    assert wide.shape == (48, 64, 3) and np.array_equal(wide, narrow)    # PIL's own convert clips at 255


@pytest.mark.parametrize("data", ["missing.txt", "a-folder"])
def test_sensitivity_data_that_is_no_file(run_cli, models_dir, tmp_path, data):
    (tmp_path / "a-folder").mkdir()
    status, _, err = run_cli("sensitivity", models_dir / "imp-phi2", "--data", tmp_path / data, "--out",
                             tmp_path / "out")
    _assert_one_line_error(status, err, tmp_path / data)
    assert not (tmp_path / "out").exists()


def _mamba_gguf(path: Path) -> Path:
    writer = gguf.GGUFWriter(path, "mamba")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_text_architecture_impq_does_not_run_is_refused(run_cli, imp_tiny_pair, tmp_path):
    mamba = _mamba_gguf(tmp_path / "mamba.gguf")
    mmproj = next(imp_tiny_pair.glob("mmproj-*.gguf"))
    status, _, err = run_cli("verify", "--text", mamba, "--mmproj", mmproj, "--reference", default_model_dir())
    _assert_one_line_error(status, err, mamba, "architecture 'mamba'")
    status, out, err = run_cli("estimate", "--text", mamba, "--mmproj", mmproj)
    _assert_one_line_error(status, err, mamba, "architecture 'mamba'")
    assert out == ""


def test_no_output_file_holds_a_path_of_this_machine(run_cli, models_dir, imp_tiny_pair, tmp_path):
    out = tmp_path / "q"
    status, _, err = run_cli("quantize", models_dir / "imp-phi2", "--calib", _calib(tmp_path), "--method", "rtn",
                             "--type", "q4_0", "--nsamples", "2", "--seqlen", "64", "--verify-items", "0",
                             "--out", out)
    assert status == 0, err
    status, _, err = run_cli("eval", imp_tiny_pair, "--limit", "2", "--results", out / "eval.json")
    assert status == 0, err
    assert len(_files(out)) == 5
    for path in _files(out):
        data = path.read_bytes()
        assert str(tmp_path).encode() not in data and str(Path.cwd()).encode() not in data, path.name
    report = json.loads(next(out.glob("*.report.json")).read_text())
    assert all((out / name).is_file() for name in report["artifacts"].values()) and (out / report["recipe"]).is_file()


def test_a_killed_runs_staging_folder_is_removed_by_the_next_run(models_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / f".impq-stage-{int(dead.stdout)}"             # that process has exited
    stale.mkdir()
    (stale / "half.gguf").write_bytes(b"partial")
    alive = out / f".impq-stage-{os.getppid()}"                 # a running process's staging stays
    alive.mkdir()
    quantize_model(models_dir / "imp-phi2", out, _settings(tmp_path), verify_items=0)
    assert not stale.exists() and alive.is_dir()
