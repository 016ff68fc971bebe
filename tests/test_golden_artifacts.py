"""Byte-identical artifacts across refactors (issue 27): every file impq writes for the shipped imp-tiny, for each
method at Q4_K and Q4_0, a budgeted mix, each safetensors layout, `impq export` at F16 and Q8_0 and a two-point
sweep, hashed and compared with the hashes committed in tests/golden/artifacts.json, which were written by the
code before the change:

    python tests/test_golden_artifacts.py --write      # only where a change is meant to change the bytes

What is hashed is each file's content without the recipe it carries: a GGUF's tensors and every metadata key but
`impq.settings`, a safetensors file's tensors and metadata but its recipe, impq.json's keys but `recipe`, every
other file whole. The recipe's
own schema is meant to change (issue 27's schema 2); what it records is checked by the recipe tests. Reports and
recipe files are not hashed (reports hold times). Each command runs in a fresh process under settings that make
float results the same on any x86-64 CPU with AVX2 (MKL's conditional numerical reproducibility, ATen's and
oneDNN's kernels capped at AVX2, one thread), so the hashes do not depend on which machine of the project's kind
runs them."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parent / "golden" / "artifacts.json"
FAST = ("--nsamples", "8", "--verify-items", "0")
QUANTIZE = {f"{method}-{type_name}": ("quantize", "--method", method, "--type", type_name, *FAST,
                                      *(("--iterations", "4") if method == "signround" else ()))
            for method in ("rtn", "gptq", "awq", "signround") for type_name in ("q4_k", "q4_0")}
COMMANDS = {
    **QUANTIZE,
    "mix-bpw4.5": ("quantize", "--method", "gptq", "--target-bpw", "4.5", "--sensitivity-prompts", "4", *FAST),
    **{f"safetensors-{layout}": ("quantize", "--format", "safetensors", "--layout", layout, "--bits", "4", *FAST)
       for layout in ("compressed-tensors", "gptq", "awq")},
    "export-f16": ("export", "MODEL", "--type", "f16"),
    "export-q8_0": ("export", "MODEL", "--type", "q8_0"),
    "sweep-two-points": ("sweep-resolution", "--resolutions", "168,84", "--types", "q4_0", "--nsamples", "8",
                         "--limit", "2", "--runs", "1"),
}
# the same float results on any AVX2 machine: MKL's reproducible mode, kernels capped at AVX2, one thread
REPRODUCIBLE = {"MKL_CBWR": "AVX2,STRICT", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
NOT_HASHED = (".report.json", ".recipe.yaml", "report.json")     # times; the recipe's schema is meant to change


def _gguf_content(path: Path) -> str:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    digest = hashlib.sha256()
    for name, field in sorted(reader.fields.items()):
        if name == "impq.settings" or name.startswith("GGUF."):
            continue
        digest.update(name.encode())
        for part in field.parts:
            digest.update(part.tobytes())
    for tensor in reader.tensors:
        digest.update(f"{tensor.name}:{int(tensor.tensor_type)}:{list(tensor.shape)}".encode())
        digest.update(tensor.data.tobytes())
    return digest.hexdigest()


def _safetensors_content(path: Path) -> str:
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(path, "np") as f:
        metadata = {k: v for k, v in (f.metadata() or {}).items() if "recipe" not in k}
        digest.update(json.dumps(metadata, sort_keys=True).encode())
        for name in sorted(f.keys()):
            tensor = f.get_tensor(name)
            digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
            digest.update(tensor.tobytes())
    return digest.hexdigest()


def content_hashes(folder: Path, only_gguf: bool = False) -> dict[str, str]:
    """relative path -> content hash of every artifact file under `folder` (`only_gguf`: of its GGUF files: a
    sweep's tables and plots hold timings)."""
    hashes = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if path.suffix == ".gguf":
            hashes[relative] = _gguf_content(path)
        elif only_gguf or relative.endswith(NOT_HASHED):
            continue
        elif path.suffix == ".safetensors":
            hashes[relative] = _safetensors_content(path)
        elif path.name == "impq.json":           # the safetensors folder's manifest, but its recipe
            manifest = {k: v for k, v in json.loads(path.read_text()).items() if k != "recipe"}
            hashes[relative] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
        else:
            hashes[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def run_command(name: str, out: Path) -> dict[str, str]:
    from impq.defaults import default_model_dir

    args = [str(default_model_dir()) if a == "MODEL" else a for a in COMMANDS[name]]
    env = {**os.environ, **REPRODUCIBLE, "IMPQ_CACHE_DIR": str(out.parent / "impq-cache")}
    done = subprocess.run([sys.executable, "-c", "from impq.cli import main; main()", *args, "--out", str(out)],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return content_hashes(out, only_gguf=COMMANDS[name][0] == "sweep-resolution")


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_artifacts_are_byte_identical_to_the_committed_hashes(name, tmp_path):
    golden = json.loads(GOLDEN.read_text())
    assert name in golden, f"no committed hashes for {name}: run python {Path(__file__).name} --write"
    hashes = run_command(name, tmp_path / "out")
    assert hashes and hashes == golden[name]


def write_golden() -> None:
    golden = {}
    for name in sorted(COMMANDS):
        with tempfile.TemporaryDirectory() as tmp:
            golden[name] = run_command(name, Path(tmp) / "out")
            print(name, len(golden[name]), "files", flush=True)
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    write_golden()
