"""Does llama.cpp's weight repacking work on this machine? Found out once, in a child process, and remembered.

llama-cpp-python builds llama.cpp with `GGML_NATIVE=ON`. On a CPU that reports AMX, ggml then registers its AMX
kernels as an "extra buffer type", and every quantized matrix product of a text model goes through them; inside some
virtual machines those tile instructions fault (SIGILL or SIGSEGV), killing the process on the first product of a
Q4_0/Q4_K/Q8_0 file. Loading with `llama_model_params.use_extra_bufts = false` (llama.cpp's `--no-repack`) avoids
them, but also turns off the AVX2/ARM repacking that is a real speed-up where it works: so impq decides per llama.cpp
library and CPU. The probe loads a tiny quantized model impq writes itself and evaluates a few tokens; a child that
dies by a signal means "repacking off". The verdict is cached under the user's cache folder (IMPQ_CACHE_DIR,
XDG_CACHE_HOME/impq or ~/.cache/impq), keyed by the library files and the CPU.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import platform
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import llama_cpp
import llama_cpp.llama_cpp as llama_lib

from ..fileio import atomic_output

# the build that needs no probe: portable x86-64 instruction sets, no -march=native (so no AMX kernels)
PORTABLE_BUILD = ('CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON '
                  '-DGGML_BMI2=ON" pip install --no-cache-dir --force-reinstall --no-deps "llama-cpp-python>=0.3.36,<0.4"')
PROBE_TYPE = "q4_0"         # AMX and the AVX2/ARM repacking both take Q4_0


@dataclass(frozen=True)
class RepackVerdict:
    extra_bufts: bool       # llama.cpp's extra buffer types (weight repacking, AMX) are safe to use here
    detail: str             # how the probe ended
    key: str                # which library and CPU the verdict is for


def cache_dir() -> Path:
    if os.environ.get("IMPQ_CACHE_DIR"):
        return Path(os.environ["IMPQ_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "impq"


def _cpu_identity() -> str:
    """The CPU's model and instruction-set flags (what decides which kernels ggml runs), else the platform's name."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    wanted = ("model name", "flags", "Features", "CPU implementer", "CPU part")
    first = text.split("\n\n", 1)[0]
    return "\n".join(line for line in first.splitlines() if line.split(":", 1)[0].strip() in wanted)


def _library_identity() -> str:
    """Names, sizes and modification times of the installed llama.cpp libraries: a rebuild changes them."""
    folder = Path(llama_lib._base_path)
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    return f"llama-cpp-python {llama_cpp.__version__}\n" + "\n".join(
        f"{p.name} {p.stat().st_size} {p.stat().st_mtime_ns}" for p in files)


def verdict_key() -> str:
    return hashlib.sha256(f"{_library_identity()}\n{_cpu_identity()}".encode()).hexdigest()[:20]


def _write_probe_model(folder: Path) -> Path:
    """A tiny random-weight Imp checkpoint exported to a quantized text GGUF by impq's own exporter."""
    from ..models.layouts import read_spec
    from ..models.testing import make_model
    from ..recipe import export_with_recipe

    make_model("imp-phi2", folder / "model")
    return export_with_recipe(read_spec(folder / "model"), folder / "gguf", PROBE_TYPE).text_path


def _child_command(text_gguf: Path) -> list[str]:
    return [sys.executable, "-m", "impq.runtime.llamacpp_probe", str(text_gguf)]


def run_probe(timeout_s: float = 300) -> tuple[bool, str]:
    """(extra buffer types work, how the child ended). Only a death by a signal turns repacking off: any other
    failure is impq's or the file's, reported where the real model loads."""
    with tempfile.TemporaryDirectory(prefix="impq-probe-") as scratch:
        text_gguf = _write_probe_model(Path(scratch))
        try:
            child = subprocess.run(_child_command(text_gguf), capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False, f"the probe hung for {timeout_s:.0f} s"
    if child.returncode < 0:
        try:
            name = signal.Signals(-child.returncode).name
        except ValueError:
            name = f"signal {-child.returncode}"
        return False, f"the probe died by {name}"
    if child.returncode != 0:
        return True, f"the probe exited with status {child.returncode} ({child.stderr.strip()[-200:]})"
    return True, "the probe ran"


def repack_verdict() -> RepackVerdict:
    """The cached verdict for this library and CPU, probing first where there is none."""
    key = verdict_key()
    path = cache_dir() / f"llamacpp-repack-{key}.json"
    try:
        return RepackVerdict(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        pass
    works, detail = run_probe()
    verdict = RepackVerdict(works, detail, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(asdict(verdict), indent=2) + "\n")
    except OSError:
        pass                # an unwritable cache only costs a probe per process
    return verdict


# the verdict this process runs under, once decided (llama.cpp's model parameters are patched at most once)
_in_use: RepackVerdict | None = None


def _without_extra_bufts(default_params):
    def params():
        value = default_params()
        value.use_extra_bufts = False
        return value
    return params


def use_repacking(quantized: bool = True) -> bool:
    """Called before llama.cpp loads a text model in this process; True where weight repacking stays on. For a
    quantized model the verdict is settled first (IMPQ_LLAMACPP_REPACK=on|off overrides the probe); where it is
    "off", every later load in this process runs with extra buffer types off, and one line says so on stderr.
    llama-cpp-python's Llama takes no such argument: it reads llama_model_default_params() at load, so impq wraps
    that function."""
    global _in_use
    if _in_use is None and quantized:
        forced = os.environ.get("IMPQ_LLAMACPP_REPACK", "").lower()
        if forced in ("on", "off"):
            _in_use = RepackVerdict(forced == "on", "set by IMPQ_LLAMACPP_REPACK", verdict_key())
        else:
            _in_use = repack_verdict()
            # said by the process the user started, not again by the worker processes it spawns
            if not _in_use.extra_bufts and multiprocessing.parent_process() is None:
                print(f"impq: note: llama.cpp's weight repacking (extra buffer types, AMX) crashed on this CPU "
                      f"({_in_use.detail}), so impq runs it with repacking off, which is slower; to restore full "
                      f"speed, rebuild llama-cpp-python without -march=native: {PORTABLE_BUILD}", file=sys.stderr)
        if not _in_use.extra_bufts:
            llama_lib.llama_model_default_params = _without_extra_bufts(llama_lib.llama_model_default_params)
    return _in_use is None or _in_use.extra_bufts


def _probe_main(text_gguf: str) -> None:
    """The child: load the quantized model as impq does (repacking on) and evaluate a few tokens."""
    import llama_cpp._logger as llama_logger

    llama_logger.set_verbose(False)
    llama = llama_cpp.Llama(text_gguf, n_ctx=64, n_threads=min(2, os.cpu_count() or 1), n_gpu_layers=0,
                            verbose=False)
    llama.eval([1, 2, 3, 4, 5, 6, 7, 8])
    llama.eval([9])
    llama.close()


if __name__ == "__main__":
    _probe_main(sys.argv[1])
