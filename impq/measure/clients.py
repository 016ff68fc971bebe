"""The same VQA items through the clients people load a GGUF pair with, so that their answers can be compared
with impq's own runner: llama-cpp-python's high-level chat API (MTMDChatHandler), an OpenAI-compatible server
on 127.0.0.1 (llama-cpp-python's `llama_cpp.server`, or llama.cpp's `llama-server` where built) and
`llama-mtmd-cli`. Every client gets the image file as it is and the question as a user message; the GGUF's
embedded chat template turns that into the model's own prompt.

Decoding is greedy (temperature 0) with the repetition penalty off: llama-cpp-python's default of 1.1 also
penalises tokens of the prompt, so an answer word that occurs in the question would be pushed down.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from ..errors import ImpqError
from ..runtime.gguf_pair import read_gguf_header
from ..runtime.llamacpp_probe import use_repacking
from .vqa import VQAItem

MAX_TOKENS = 6                  # as impq eval
# `python -m llama_cpp.server`, after the model parameters follow IMPQ_LLAMACPP_REPACK
SERVER_WITH_VERDICT = ("import runpy, sys; from impq.runtime.llamacpp_probe import use_repacking; use_repacking(); "
                       "sys.argv[0] = 'llama_cpp.server'; runpy.run_module('llama_cpp.server', run_name='__main__')")


def _data_url(image: Path) -> str:
    return f"data:image/png;base64,{base64.b64encode(image.read_bytes()).decode()}"


def chat_message(item: VQAItem) -> list[dict]:
    """One OpenAI-style user message: the image part, then the question."""
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(item.image)}},
                                         {"type": "text", "text": item.question}]}]


def answers_llama_cpp_python(text_gguf: Path, mmproj_gguf: Path, items: list[VQAItem],
                             n_threads: int | None = None) -> list[str]:
    """llama-cpp-python's high-level API: `Llama(chat_handler=MTMDChatHandler(...)).create_chat_completion`."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler

    use_repacking(read_gguf_header(text_gguf).quantized)
    handler = MTMDChatHandler(clip_model_path=str(mmproj_gguf), verbose=False)
    llm = Llama(str(text_gguf), chat_handler=handler, n_ctx=2048, n_threads=n_threads, verbose=False)
    try:
        return [llm.create_chat_completion(messages=chat_message(item), temperature=0.0, repeat_penalty=1.0,
                                           max_tokens=MAX_TOKENS)["choices"][0]["message"]["content"]
                for item in items]
    finally:
        llm.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def openai_server(text_gguf: Path, mmproj_gguf: Path, llama_server: Path | None = None, n_threads: int = 2,
                  startup_s: float = 120.0) -> Iterator[str]:
    """An OpenAI-compatible server for the pair on a free port of 127.0.0.1; yields its base URL and stops it.
    Without `llama_server` (llama.cpp's binary), llama-cpp-python's own `python -m llama_cpp.server` runs."""
    port = _free_port()
    env = _library_env(llama_server)
    if llama_server is None:
        # the server process loads the model with the repacking verdict this process runs under
        env = {**os.environ, "IMPQ_LLAMACPP_REPACK": "on" if use_repacking(read_gguf_header(text_gguf).quantized)
               else "off"}
        command = [sys.executable, "-c", SERVER_WITH_VERDICT, "--model", str(text_gguf), "--clip_model_path",
                   str(mmproj_gguf), "--chat_format", "mtmd", "--host", "127.0.0.1", "--port", str(port),
                   "--n_ctx", "2048", "--n_threads", str(n_threads), "--verbose", "False"]
    else:
        command = [str(llama_server), "-m", str(text_gguf), "--mmproj", str(mmproj_gguf), "--host", "127.0.0.1",
                   "--port", str(port), "-c", "2048", "-t", str(n_threads), "--no-warmup"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if process.poll() is not None:
                raise ImpqError(llama_server or "llama_cpp.server", f"server exited at start ({process.stderr.read()[-400:]})")
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ImpqError(llama_server or "llama_cpp.server", f"server not up after {startup_s:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _library_env(binary: Path | None) -> dict | None:
    """llama.cpp's tools find their shared libraries beside them."""
    if binary is None:
        return None
    return {**os.environ, "LD_LIBRARY_PATH": f"{Path(binary).parent}:{os.environ.get('LD_LIBRARY_PATH', '')}"}


def answers_openai(url: str, items: list[VQAItem], timeout_s: float = 120.0) -> list[str]:
    """POST /v1/chat/completions for each item, as any OpenAI-style client (curl, the openai package) does."""
    answers = []
    for item in items:
        body = json.dumps({"model": "impq", "messages": chat_message(item), "temperature": 0.0, "repeat_penalty": 1.0,
                           "max_tokens": MAX_TOKENS}).encode()
        request = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            answers.append(json.loads(reply.read())["choices"][0]["message"]["content"])
    return answers


def answers_mtmd_cli(mtmd_cli: Path, text_gguf: Path, mmproj_gguf: Path, items: list[VQAItem],
                     n_threads: int = 2) -> list[str]:
    """llama.cpp's `llama-mtmd-cli -m TEXT --mmproj MMPROJ --image IMG -p QUESTION --jinja` (greedy), one run an item.
    `--jinja` makes it render the GGUF's own chat template; without it, llama-mtmd-cli matches the template against
    its built-in formats by keywords, takes Imp's for Vicuna's and drops the system prompt and the newline."""
    answers = []
    for item in items:
        done = subprocess.run(
            [str(mtmd_cli), "-m", str(text_gguf), "--mmproj", str(mmproj_gguf), "--image", str(item.image), "-p",
             item.question, "-n", str(MAX_TOKENS), "--temp", "0", "--repeat-penalty", "1.0", "-t", str(n_threads),
             "--no-warmup", "--jinja"], capture_output=True, text=True, timeout=300, env=_library_env(mtmd_cli))
        if done.returncode != 0:
            raise ImpqError(mtmd_cli, f"exit status {done.returncode} ({done.stderr[-400:]})")
        answers.append(done.stdout)
    return answers
