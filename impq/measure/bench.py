"""Speed and memory of a GGUF pair in llama.cpp, as a phone app would run it: image + question prompt.

Runs in a fresh process (spawned, without torch) so that the peak RSS is the runtime's own. Each figure is
the median over the timed runs after a warm-up, with min and max beside it.
"""

from __future__ import annotations

import resource
import statistics
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path

from PIL import Image

from ..errors import ImpqError
from ..models import preprocess
from ..models.preprocess import load_image, set_max_image_pixels
from ..runtime.gguf_pair import read_gguf_header
from ..runtime.llamacpp import resolve_flash_attn
from ..runtime.llamacpp_probe import use_repacking


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _bench_in_process(text_path: str, mmproj_path: str, image_path: str, question: str, runs: int, warmup: int,
                      decode_tokens: int, n_threads: int | None, flash_attn: str, gpu_layers: int,
                      template: str | None, max_image_pixels: int) -> dict:
    from ..runtime.llamacpp import PairRunner

    set_max_image_pixels(max_image_pixels)         # the limit this command runs under, in the spawned process too
    image: Image.Image = load_image(image_path)
    samples: dict[str, list[float]] = {k: [] for k in (
        "image_encode_s", "prefill_s", "ttft_s", "prompt_tokens_per_s", "decode_tokens_per_s")}
    with PairRunner(text_path, mmproj_path, n_threads=n_threads, flash_attn=flash_attn, gpu_layers=gpu_layers,
                    template=template) as runner:
        for i in range(warmup + runs):
            result = runner.run(image, question, decode_tokens, stop_at_eos=False)
            if i < warmup:
                continue
            llm_prefill = result.prefill_s - result.image_encode_s
            samples["image_encode_s"].append(result.image_encode_s)
            samples["prefill_s"].append(result.prefill_s)
            samples["ttft_s"].append(result.ttft_s)
            samples["prompt_tokens_per_s"].append(result.n_prompt_tokens / llm_prefill)
            # the first token comes from the prefill's logits: decode speed counts the tokens decoded after it
            samples["decode_tokens_per_s"].append((len(result.tokens) - 1) / result.decode_s)
        prompt_tokens, threads = result.n_prompt_tokens, runner.n_threads
        flash, backend = runner.flash_attn, runner.backend
    return {
        "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens, "runs": runs, "warmup": warmup,
        "threads": threads, "flash_attn": flash, "backend": backend, **{k: _summary(v) for k, v in samples.items()},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "text_gguf_mb": Path(text_path).stat().st_size / 1e6, "mmproj_gguf_mb": Path(mmproj_path).stat().st_size / 1e6,
    }


def bench_pair(text_path: Path, mmproj_path: Path, image_path: Path, question: str = "What is in the image?",
               runs: int = 5, warmup: int = 1, decode_tokens: int = 32, n_threads: int | None = None,
               flash_attn: str = "off", gpu_layers: int = 0, template: str | None = None) -> dict:
    resolve_flash_attn(flash_attn)               # a bad setting fails here, before any process starts
    load_image(image_path)                       # a bad image fails here, with one line, before any process starts
    text_header = read_gguf_header(Path(text_path))   # so do damaged GGUF files
    read_gguf_header(Path(mmproj_path))
    use_repacking(text_header.quantized)         # settled (and said) here; the timed process reads the verdict
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        job = pool.submit(_bench_in_process, str(text_path), str(mmproj_path), str(image_path), question, runs,
                          warmup, decode_tokens, n_threads, flash_attn, gpu_layers, template,
                          preprocess.MAX_IMAGE_PIXELS)
        try:
            return job.result()
        except BrokenProcessPool:
            raise ImpqError(text_path, f"llama.cpp's process died while running this pair (with {Path(mmproj_path).name})"
                            ) from None
