"""Proven on ARM kernels without a phone: llama.cpp's `llama-mtmd-cli` cross-built for aarch64 from the sources the
installed llama-cpp-python ships (Debian's gcc-aarch64-linux-gnu, `-march=armv8.2-a+dotprod+i8mm`, so the
repacked Q4_0 and K-quant kernels a phone runs are the ones compiled) runs a phone bundle under `qemu-aarch64`
(Debian's qemu-user); its greedy answers on eval items must equal the x86 build's. Speed under emulation means
nothing and is not reported. Written to bench/results/arm_check.{json,md}.

    apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user
    python bench/run_arm_check.py --work /tmp/impq-arm --llama-src /tmp/llama-tools/llama.cpp \\
        --x86-bin /tmp/llama-tools/llama.cpp/build/bin BUNDLE [BUNDLE ...]

Each BUNDLE is an `impq package` folder; the answers are llama-mtmd-cli's at temperature 0 on the first --items
items of the shapes eval split (each image squashed to the mmproj's size first, as PHONE.md says), one thread on
both sides. The x86 build here now and then exits 0 without printing an answer to a command that answers on the
next run (with 2 threads in 2 of 4 runs of one item, with 1 thread more rarely; seen on the Intel Xeon VM, not
investigated): such a run is repeated (up to 3 times) and counted in the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from impq.defaults import default_eval_data
from impq.measure.vqa import normalize_answer, read_vqa_jsonl
from impq.models.preprocess import load_image

RESULTS = Path(__file__).resolve().parent / "results"
ARM_FLAGS = "armv8.2-a+dotprod+i8mm"
SYSROOT = "/usr/aarch64-linux-gnu"


def cross_build(src: Path, build: Path) -> Path:
    """llama-mtmd-cli for aarch64, statically linked (qemu-aarch64 then needs only the sysroot's libc)."""
    binary = build / "bin" / "llama-mtmd-cli"
    if binary.is_file():
        return binary
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    "-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
                    "-DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc", "-DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++",
                    "-DGGML_NATIVE=OFF", f"-DGGML_CPU_ARM_ARCH={ARM_FLAGS}", "-DGGML_OPENMP=OFF",
                    "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_SERVER=OFF"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", "llama-mtmd-cli"],
                   check=True, capture_output=True)
    return binary


def _type_counts(path: Path) -> dict:
    from collections import Counter

    import gguf

    return dict(Counter(gguf.GGMLQuantizationType(t.tensor_type).name for t in gguf.GGUFReader(path).tensors
                        if len(t.shape) == 2))


def answer(command: list[str], bundle: dict, folder: Path, image: Path, question: str, env: dict) -> str:
    done = subprocess.run([*command, "-m", str(folder / bundle["text"]), "--mmproj", str(folder / bundle["mmproj"]),
                           "--image", str(image), "-p", question, "--jinja", "--temp", "0", "-n", "8",
                           "-t", "1", "-c", str(bundle["context"]), "--no-warmup"],
                          capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"bench: {command[0]} failed on {image.name}: {done.stderr[-1500:]}")
    return done.stdout.strip()


def steady_answer(command: list[str], *args) -> tuple[str, int]:
    """The answer, and how many runs before it printed nothing: the x86 build here now and then exits 0 having
    printed no answer to the very same command (seen 1 to 2 times in 4 runs), so a run is repeated up to 3 times."""
    for empty in range(3):
        text = answer(command, *args)
        if text:
            return text, empty
    return "", 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", type=Path, nargs="+")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--llama-src", type=Path, required=True, help="llama.cpp's source (llama-cpp-python's "
                        "vendor/llama.cpp; ../shared/tools/build-llama-cpp-tools.sh unpacks it)")
    parser.add_argument("--x86-bin", type=Path, required=True, help="the x86 build's bin folder")
    parser.add_argument("--items", type=int, default=8)
    args = parser.parse_args()
    arm = cross_build(args.llama_src, args.work / "build-aarch64")
    x86_env = {**os.environ, "LD_LIBRARY_PATH": str(args.x86_bin)}
    arm_env = {**os.environ, "QEMU_LD_PREFIX": SYSROOT}
    file_info = subprocess.run(["file", str(arm)], capture_output=True, text=True).stdout.strip()
    items = read_vqa_jsonl(default_eval_data())[:args.items]
    record = {"arm_binary": file_info.split(":", 1)[-1].strip(), "march": ARM_FLAGS,
              "qemu": subprocess.run(["qemu-aarch64", "--version"], capture_output=True, text=True).stdout.split(
                  "\n")[0], "machine": platform.platform(), "bundles": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for folder in args.bundles:
            bundle = json.loads((folder / "bundle.json").read_text())
            rows = []
            for item in items:
                image = Path(scratch) / f"{item.image.stem}-{bundle['image_size']}.png"
                load_image(item.image).resize((bundle["image_size"],) * 2).save(image)
                x86, x86_empty = steady_answer([str(args.x86_bin / "llama-mtmd-cli")], bundle, folder, image,
                                               item.question, x86_env)
                on_arm, arm_empty = steady_answer(["qemu-aarch64", str(arm)], bundle, folder, image, item.question,
                                                  arm_env)
                rows.append({"image": item.image.name, "question": item.question, "expected": item.answer,
                             "x86": x86, "aarch64": on_arm, "equal": x86 == on_arm and bool(x86),
                             "empty_runs": {"x86": x86_empty, "aarch64": arm_empty},
                             "correct": normalize_answer(on_arm) == normalize_answer(item.answer)})
                print(folder.name, rows[-1], flush=True)
            types = {side: _type_counts(folder / bundle[side]) for side in ("text", "mmproj")}
            record["bundles"][folder.name] = {"text": bundle["text"], "mmproj": bundle["mmproj"], "types": types,
                                              "items": len(rows), "equal": sum(r["equal"] for r in rows),
                                              "empty_runs": {side: sum(r["empty_runs"][side] for r in rows)
                                                             for side in ("x86", "aarch64")},
                                              "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "arm_check.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["# The phone bundle on ARM kernels, under emulation", "", __doc__.split("\n\n")[0].replace("\n", " "),
             "", f"aarch64 build: {record['arm_binary']} (`-march={ARM_FLAGS}`); {record['qemu']}; host "
             f"{record['machine']}.", "", "| bundle | text tensors | mmproj tensors | items | answers equal to x86 | "
             "correct (aarch64) | runs that printed nothing, repeated (x86 / aarch64) |", "|---|---|---|---|---|---|---|"]
    for name, b in record["bundles"].items():
        lines.append(f"| {name} | {b['types']['text']} | {b['types']['mmproj']} | {b['items']} | "
                     f"{b['equal']} of {b['items']} | {sum(r['correct'] for r in b['rows'])} | "
                     f"{b['empty_runs']['x86']} / {b['empty_runs']['aarch64']} |")
    lines += ["", "Checked by hand on the uniform bundle with `-v`: the aarch64 run put the text GGUF's Q4_0 weights in "
              "llama.cpp's CPU_REPACK buffer, i.e. the repacked ARM kernels ran (what the mmproj's CLIP graph used was "
              "not read from the log)."]
    (RESULTS / "arm_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if any(b["equal"] != b["items"] for b in record["bundles"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
