"""Load a GGUF text model + mmproj pair in llama.cpp and run an image + question through it: next-token
logits, greedy generation and timings. Images are squashed/cropped to the model's square size here, as the
PyTorch reference does, so that mtmd only normalises them."""

from __future__ import annotations

import ctypes
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import llama_cpp
import llama_cpp._logger as llama_logger
import numpy as np
from llama_cpp import mtmd_cpp
from PIL import Image

from ..errors import ImpqError
from ..families import TEXT_FAMILIES
from ..models.preprocess import to_model_square
from .gguf_pair import read_gguf_header
from .llamacpp_probe import use_repacking

llama_logger.set_verbose(False)
mtmd_cpp.mtmd_log_set(llama_logger.llama_log_callback, ctypes.c_void_p(0))
mtmd_cpp.mtmd_helper_log_set(llama_logger.llama_log_callback, ctypes.c_void_p(0))


FLASH_ATTN = ("on", "off", "auto")


def resolve_flash_attn(setting: str, use_gpu: bool = False) -> str:
    """on | off. llama.cpp's own "auto" turns flash attention on wherever the backend has it, which includes its
    CPU backend; llama-cpp-python's Llama takes only on or off (default off), so impq resolves auto itself."""
    if setting not in FLASH_ATTN:
        raise ImpqError(None, f"--flash-attn {setting}: choose one of {', '.join(FLASH_ATTN)}")
    return "on" if setting == "auto" else setting


@dataclass
class RunResult:
    prompt_logits: np.ndarray                     # [vocab] after the whole prompt
    tokens: list[int] = field(default_factory=list)
    step_logits: list[np.ndarray] = field(default_factory=list)   # the distribution each token was taken from
    n_prompt_tokens: int = 0
    image_embeddings: np.ndarray | None = None    # [vision tokens, LLM hidden]: the projector's output
    image_encode_s: float = 0.0                   # vision tower + projector only
    prefill_s: float = 0.0                        # image encode + LLM prefill (tokenized prompt to logits)
    ttft_s: float = 0.0                           # from the call (image preprocessing included) to the first token
    decode_s: float = 0.0


DEVICES = ("auto", "cpu", "gpu")


def resolve_gpu_layers(device: str = "auto", gpu_layers: int | None = None) -> int:
    """How many text-model layers llama.cpp offloads (the mmproj goes with them when any do): --gpu-layers N as
    given (-1: all); --device cpu: none; gpu: all, where this llama.cpp build can offload; auto: all where it can
    (a CUDA, Metal or Vulkan build of llama-cpp-python), else none."""
    if device not in DEVICES:
        raise ImpqError(None, f"--device {device}: choose one of {', '.join(DEVICES)}")
    if gpu_layers is not None:
        if gpu_layers < -1:
            raise ImpqError(None, f"--gpu-layers {gpu_layers}: a layer count, or -1 for all")
        return gpu_layers
    offload = bool(llama_cpp.llama_supports_gpu_offload())
    if device == "gpu" and not offload:
        raise ImpqError(None, "--device gpu: this llama-cpp-python build cannot offload to a GPU (see the README "
                              "for a CUDA or Metal build)")
    return -1 if device != "cpu" and offload else 0


def prompt_templates() -> dict[str, str]:
    return {name: family.prompt_template for name, family in TEXT_FAMILIES.items()}


def chat_prompt_renderer(path: Path, chat_template: str, bos: str, eos: str, add_bos: bool):
    """(question, image?) -> one user turn through the GGUF's own chat template, as llama-mtmd-cli renders it
    (--jinja): the media marker before the question, the generation prompt after. A leading BOS the template writes
    is dropped where llama.cpp adds one itself, as llama.cpp's chat code does. The template is compiled once and
    tried once here, so that a broken one fails before any item."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    marker = mtmd_cpp.mtmd_default_marker().decode()

    def render(question: str, image: bool) -> str:
        content = (marker if image else "") + question
        prompt = formatter(messages=[{"role": "user", "content": content}]).prompt
        return prompt[len(bos):] if add_bos and bos and prompt.startswith(bos) else prompt

    try:
        formatter = Jinja2ChatFormatter(chat_template, eos_token=eos, bos_token=bos)
        render("", True)
    except Exception as err:  # jinja2's TemplateError and whatever the template raises
        raise ImpqError(path, f"its chat template does not render ({type(err).__name__}: {err}); choose impq's "
                              f"with --template") from None
    return render


class PairRunner:
    def __init__(self, text_path: str | Path, mmproj_path: str | Path, *, n_ctx: int = 0,
                 n_threads: int | None = None, gpu_layers: int = 0, flash_attn: str = "off",
                 template: str | None = None, image_resize: str = "squash"):
        """`image_resize`: the image geometry where the mmproj records none (impq's record impq.image_resize):
        squash (Imp) or shortest_crop (CLIP processors)."""
        self.text_path, self.mmproj_path = Path(text_path), Path(mmproj_path)
        # damaged files fail here with one line, not inside llama.cpp
        quantized = read_gguf_header(self.text_path).quantized
        mmproj_meta = read_gguf_header(self.mmproj_path, ("clip.vision.image_size", "impq.image_resize",
                                                          "clip.projector_type")).fields
        if "clip.vision.image_size" not in mmproj_meta:
            raise ImpqError(self.mmproj_path, "not an mmproj: no clip.vision.image_size")
        if template is not None and template not in prompt_templates():
            raise ImpqError(None, f"--template {template}: choose one of {', '.join(prompt_templates())}")
        self.image_size = int(mmproj_meta["clip.vision.image_size"])
        self.image_resize = mmproj_meta.get("impq.image_resize", image_resize)
        self.projector_type = mmproj_meta.get("clip.projector_type", "mlp")
        use_gpu = gpu_layers != 0
        self.flash_attn = resolve_flash_attn(flash_attn, use_gpu)
        self.repack = use_repacking(quantized)
        self.gpu_layers = gpu_layers
        threads = self.n_threads = n_threads or os.cpu_count() or 1
        try:
            self.llama = llama_cpp.Llama(str(self.text_path), n_ctx=n_ctx, n_batch=2048, n_ubatch=512,
                                         n_threads=threads, n_threads_batch=threads, n_gpu_layers=gpu_layers,
                                         flash_attn=self.flash_attn == "on", verbose=False)
        except ValueError as err:
            raise ImpqError(self.text_path, f"llama.cpp cannot load this model ({err})") from None
        except jinja2.TemplateError as err:     # llama-cpp-python compiles the GGUF's chat template at load
            raise ImpqError(self.text_path, f"llama-cpp-python cannot load this model: its chat template does not "
                                            f"compile ({type(err).__name__}: {err})") from None
        self.marker = mtmd_cpp.mtmd_default_marker().decode()
        self._prompt = self._prompt_renderer(template)
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.print_timings = False
        params.n_threads = threads
        params.warmup = False
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.flash_attn == "on"
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self.mtmd = mtmd_cpp.mtmd_init_from_file(str(self.mmproj_path).encode(), self.llama.model, params)
        if not self.mtmd:
            raise ImpqError(self.mmproj_path, "llama.cpp's mtmd cannot load this mmproj")
        self.eos_id = self.llama.token_eos()
        self.n_vocab = self.llama.n_vocab()

    @property
    def backend(self) -> dict:
        """Where llama.cpp ran: recorded beside every figure it produced."""
        # layers asked for on a build without a GPU backend still run on the CPU
        on_gpu = self.gpu_layers != 0 and bool(llama_cpp.llama_supports_gpu_offload())
        return {"device": "gpu" if on_gpu else "cpu", "gpu_layers": self.gpu_layers if on_gpu else 0,
                "repack": self.repack, "llama_cpp_python": llama_cpp.__version__}

    def _prompt_renderer(self, template: str | None):
        """question, image? -> the prompt text with the media marker: --template NAME (impq's family templates),
        else impq's own template recorded in the GGUF, else the GGUF's chat template (any converter's)."""
        meta = self.llama.metadata
        own = prompt_templates()[template] if template else meta.get("impq.prompt_template")
        if own:
            image_token = "<image>" if template else meta.get("impq.image_token", "<image>")
            return lambda question, image: own.replace("{question}", question).replace(
                image_token, self.marker if image else "")
        chat_template = meta.get("tokenizer.chat_template")
        if not chat_template:
            raise ImpqError(self.text_path, f"GGUF has no chat template (tokenizer.chat_template); name the model's "
                                            f"prompt format with --template ({', '.join(prompt_templates())})")
        special = {}
        for role in ("bos", "eos"):
            token = meta.get(f"tokenizer.ggml.{role}_token_id")
            special[role] = "" if token is None else self.llama.detokenize([int(token)], special=True).decode(
                "utf-8", errors="replace")
        add_bos = meta.get("tokenizer.ggml.add_bos_token", "false") == "true"
        return chat_prompt_renderer(self.text_path, chat_template, special["bos"], special["eos"], add_bos)

    def close(self) -> None:
        if getattr(self, "mtmd", None):
            mtmd_cpp.mtmd_free(self.mtmd)
            self.mtmd = None
        if getattr(self, "llama", None):
            self.llama.close()
            self.llama = None

    def __enter__(self) -> "PairRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _bitmap(self, image: Image.Image):
        square = to_model_square(image.convert("RGB"), self.image_size, self.image_resize)
        data = np.ascontiguousarray(np.asarray(square, dtype=np.uint8))
        buffer = (ctypes.c_uint8 * data.size).from_buffer_copy(data.tobytes())
        return mtmd_cpp.mtmd_bitmap_init(square.width, square.height, buffer)

    def _last_logits(self) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(self.llama._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    @contextmanager
    def _chunks(self, image: Image.Image | None, question: str):
        """The prompt's mtmd chunks (text and image), freed on exit."""
        prompt = self._prompt(question, image is not None)
        bitmaps = [self._bitmap(image)] if image is not None else []
        text = mtmd_cpp.mtmd_input_text()
        raw = prompt.encode("utf-8")
        text.text, text.text_len, text.add_special, text.parse_special = raw, len(raw), True, True
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        try:
            array = (mtmd_cpp.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
            if mtmd_cpp.mtmd_tokenize(self.mtmd, chunks, ctypes.byref(text), array, len(bitmaps)) != 0:
                raise ImpqError(self.mmproj_path, "mtmd could not tokenize the prompt and image")
            yield [mtmd_cpp.mtmd_input_chunks_get(chunks, i) for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks))]
        finally:
            mtmd_cpp.mtmd_input_chunks_free(chunks)
            for bitmap in bitmaps:
                mtmd_cpp.mtmd_bitmap_free(bitmap)

    def prefill(self, image: Image.Image | None, question: str, result: RunResult) -> None:
        llama = self.llama
        with self._chunks(image, question) as chunks:
            llama.reset()
            llama._ctx.kv_cache_clear()
            start = time.perf_counter()
            for i, chunk in enumerate(chunks):
                last = i == len(chunks) - 1
                if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    count = ctypes.c_size_t()
                    ptr = mtmd_cpp.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
                    llama.eval([ptr[j] for j in range(count.value)])
                else:
                    if last:
                        raise ImpqError(self.text_path, "the prompt template must have text after the image")
                    self._eval_image_chunk(chunk, result)
            result.prefill_s = time.perf_counter() - start
            result.n_prompt_tokens = llama.n_tokens
            result.prompt_logits = self._last_logits()

    def encode_image_s(self, image: Image.Image) -> float:
        """Seconds llama.cpp takes to encode `image` (vision tower and projector), without the LLM's prefill."""
        with self._chunks(image, "") as chunks:
            text_type = mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT
            return self._encode(next(c for c in chunks if mtmd_cpp.mtmd_input_chunk_get_type(c) != text_type))

    def _encode(self, chunk) -> float:
        """Encode an image chunk (its embeddings left in mtmd's output); the seconds it took."""
        start = time.perf_counter()
        if mtmd_cpp.mtmd_encode_chunk(self.mtmd, chunk) != 0:
            raise ImpqError(self.mmproj_path, "llama.cpp failed to encode the image")
        return time.perf_counter() - start

    def _eval_image_chunk(self, chunk, result: RunResult) -> None:
        """Vision encode (timed on its own), then the LLM's prefill of the image embeddings."""
        llama = self.llama
        result.image_encode_s += self._encode(chunk)
        n_tokens = mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
        embd = mtmd_cpp.mtmd_get_output_embd(self.mtmd)
        result.image_embeddings = np.ctypeslib.as_array(embd, shape=(n_tokens * llama.n_embd(),)).reshape(
            n_tokens, llama.n_embd()).copy()
        new_past = llama_cpp.llama_pos(0)
        status = mtmd_cpp.mtmd_helper_decode_image_chunk(
            self.mtmd, llama._ctx.ctx, chunk, embd, llama_cpp.llama_pos(llama.n_tokens), llama_cpp.llama_seq_id(0),
            llama.n_batch, ctypes.byref(new_past), ctypes.cast(None, mtmd_cpp.mtmd_helper_post_decode_callback), None)
        if status != 0:
            raise ImpqError(self.text_path, f"llama.cpp failed to decode the image embeddings (status {status})")
        llama.n_tokens = new_past.value

    def run(self, image: Image.Image | None, question: str, max_new_tokens: int = 16,
            follow: list[int] | None = None, stop_at_eos: bool = True) -> RunResult:
        """Greedy decoding, stopping at end-of-sequence unless `stop_at_eos` is off. With `follow`, those tokens are
        fed instead (teacher forcing) while `tokens` still records llama.cpp's own greedy choice at each step."""
        start = time.perf_counter()
        result = RunResult(prompt_logits=np.empty(0))
        self.prefill(image, question, result)
        logits = result.prompt_logits
        steps = len(follow) if follow is not None else max_new_tokens
        decode_start = time.perf_counter()
        for i in range(steps):
            result.step_logits.append(logits)
            result.tokens.append(int(np.argmax(logits)))
            if i == 0:
                result.ttft_s = time.perf_counter() - start
            token = follow[i] if follow is not None else result.tokens[-1]
            if i == steps - 1 or (follow is None and stop_at_eos and token == self.eos_id):
                break
            self.llama.eval([token])
            logits = self._last_logits()
        result.decode_s = time.perf_counter() - decode_start
        return result
