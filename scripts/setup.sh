#!/usr/bin/env bash
# Set up impq from this checkout: the CPU build of torch, llama-cpp-python built to run on any x86-64 CPU of its
# kind, then impq itself. `bash scripts/setup.sh` for use; `bash scripts/setup.sh dev` adds the test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install torch==2.13.0
if [ "$(uname -m)" = x86_64 ] && [ -z "${CMAKE_ARGS:-}" ]; then
  # llama-cpp-python compiles llama.cpp with -march=native by default: on a Xeon that reports AMX inside a virtual
  # machine, ggml's AMX kernels then crash on every quantized model (README, "If llama.cpp crashes"). These are the
  # portable instruction sets; a CMAKE_ARGS of your own (a CUDA build, say) is used as it is.
  export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
fi
# pip's wheel cache does not key on CMAKE_ARGS: without --no-cache-dir a wheel built earlier with other flags is
# reused silently; --force-reinstall rebuilds one that is already installed
pip install --no-cache-dir --force-reinstall --no-deps "llama-cpp-python>=0.3.36,<0.4"
if [ "${1:-}" = dev ]; then
  pip install -e ".[dev]"
else
  pip install -e .
fi
