"""A pair impq did not write: the text GGUF from llama.cpp's own converter (convert_hf_to_gguf.py, from the
llama-cpp-python source release installed here), the mmproj rewritten by gguf-py with llama.cpp's keys only (no
impq.* metadata). impq evaluates and verifies it from the GGUF's chat template, or with --template where the file
has none."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import gguf
import llama_cpp
import pytest
from gguf.scripts.gguf_new_metadata import copy_with_new_metadata

from impq.recipe import export_with_recipe
from impq.models.layouts import read_spec

EVAL_DATA = Path(__file__).resolve().parent.parent / "eval" / "shapes" / "eval.jsonl"
CONVERTER_FILES = ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/conversion/",
                   "vendor/llama.cpp/gguf-py/")


@pytest.fixture(scope="module")
def converter(tmp_path_factory) -> Path:
    """llama.cpp's converter and its gguf-py, from the source release of the installed llama-cpp-python."""
    folder = tmp_path_factory.mktemp("sdist")
    version = llama_cpp.__version__
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                           "-d", str(folder), f"llama-cpp-python=={version}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    archive = next(folder.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(archive) as tar:
        root = tar.getnames()[0].split("/")[0]
        members = [m for m in tar.getmembers()
                   if any(m.name.startswith(f"{root}/{part}") for part in CONVERTER_FILES)]
        tar.extractall(folder, members=members, filter="data")
    return folder / root / "vendor" / "llama.cpp"


def _convert_text(converter: Path, model: Path, out: Path) -> Path:
    done = subprocess.run([sys.executable, str(converter / "convert_hf_to_gguf.py"), str(model), "--outfile",
                           str(out), "--outtype", "f16"], capture_output=True, text=True,
                          env={"PYTHONPATH": str(converter / "gguf-py"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def _mmproj_without_impq_keys(model: Path, scratch: Path, out: Path) -> Path:
    """impq's mmproj for the model, rewritten by gguf-py keeping only llama.cpp's own keys."""
    export_with_recipe(read_spec(model), scratch, "f16")
    reader = gguf.GGUFReader(next(scratch.glob("mmproj-*.gguf")))
    writer = gguf.GGUFWriter(out, "clip")
    copy_with_new_metadata(reader, writer, {}, [name for name in reader.fields if name.startswith("impq.")])
    assert not [name for name in gguf.GGUFReader(out).fields if name.startswith("impq.")]
    return out


@pytest.fixture(scope="module")
def published_pairs(models_dir, converter, tmp_path_factory):
    """(checkpoint, pair with a chat template, pair without one)."""
    # llava-siglip: llava-clip runs into llama.cpp's class-token bug (tests/test_parity.py)
    model = models_dir / "llava-siglip"
    root = tmp_path_factory.mktemp("published")
    bare = root / "model-without-chat-template"
    shutil.copytree(model, bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    pairs = []
    for name, source in (("with-template", model), ("without-template", bare)):
        folder = root / name
        folder.mkdir()
        text = _convert_text(converter, source, folder / "Model-F16.gguf")
        _mmproj_without_impq_keys(model, root / f"impq-{name}", folder / "mmproj-model-f16.gguf")
        pairs.append(folder)
        has_template = "tokenizer.chat_template" in gguf.GGUFReader(text).fields
        assert has_template == (name == "with-template")
        assert not [f for f in gguf.GGUFReader(text).fields if f.startswith("impq.")]
    return model, *pairs


def test_a_pair_with_a_chat_template_is_evaluated_and_verified(run_cli, published_pairs):
    model, with_template, _ = published_pairs
    code, out, err = run_cli("verify", with_template, "--reference", model, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["weight_type"] == "F16" and report["passed"] is True
    assert report["top1_agreement"] == 1.0 and report["generation_match"] is True
    code, out, err = run_cli("eval", with_template, "--reference", model, "--data", EVAL_DATA, "--limit", "4",
                             "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["top1_agreement"] == 1.0 and report["mean_kld"] < 1e-3
    assert report["backend"]["device"] == "cpu"


def test_a_pair_without_a_chat_template_needs_template(run_cli, published_pairs, tmp_path):
    model, _, without_template = published_pairs
    code, out, err = run_cli("eval", without_template, "--data", EVAL_DATA, "--limit", "2",
                             "--results", tmp_path / "never.json")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("impq: error: ") and "--template" in lines[0], err
    assert not (tmp_path / "never.json").exists()
    code, out, err = run_cli("verify", without_template, "--reference", model, "--template", "llama", "--json")
    assert code == 0, err
    assert json.loads(out)["passed"] is True
    code, out, err = run_cli("eval", without_template, "--reference", model, "--template", "llama", "--data",
                             EVAL_DATA, "--limit", "4", "--json")
    assert code == 0, err
    assert json.loads(out)["top1_agreement"] == 1.0
    code, _, err = run_cli("eval", without_template, "--template", "vicuna", "--data", EVAL_DATA, "--limit", "1")
    assert code == 2 and "--template vicuna" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("template,needle", [
    ("{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}", "its chat template does not render"),
    # llama-cpp-python itself compiles the template when it loads the model
    ("{% for m in messages %}{{ m['content'] | no_such_filter }}{% endfor %}", "its chat template does not compile"),
])
def test_a_chat_template_that_fails_is_one_line(run_cli, models_dir, converter, published_pairs, tmp_path,
                                                template, needle):
    _, with_template, _ = published_pairs
    broken = tmp_path / "model"
    shutil.copytree(models_dir / "llava-siglip", broken)
    config = json.loads((broken / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "pair").mkdir()
    text = _convert_text(converter, broken, tmp_path / "pair" / "Broken-F16.gguf")
    shutil.copy(next(with_template.glob("mmproj-*.gguf")), tmp_path / "pair")
    code, _, err = run_cli("eval", tmp_path / "pair", "--data", EVAL_DATA, "--limit", "1")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"impq: error: {text}: "), err
    assert needle in lines[0]
