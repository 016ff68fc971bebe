"""Prove that an emitted GGUF pair computes what the PyTorch reference computes: the same images and prompts
through both, compared on next-token logits along the reference's 16-token greedy path."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import gguf
import numpy as np

from .measure.divergence import Divergence
from .memory import trim
from .models.layouts import read_spec
from .models.lmm import LMM
from .models.preprocess import load_image
from .models.reduction import VisionReduction
from .runtime.gguf_pair import read_gguf_header, require_text_arch, resolve_pair
from .runtime.llamacpp import PairRunner

DEFAULT_PROMPTS = ("What is in the image?", "What color is the largest shape? Answer in one word.")

# Pass criteria per weight type of the text GGUF. F16/F32 differ from PyTorch only by llama.cpp's arithmetic
# (F16 KV cache, kernel order): about 1e-2 in logits on the small test models, so every greedy token must
# match. Q8_0 also rounds the weights (8-bit, both files): on small random models about 0.3-0.6 in logits and
# a KLD of 1-3e-3, enough to flip near-ties, so agreement is bounded instead of required everywhere.
# Reference logits closer than this (a fifth of F16's logit tolerance) are a tie that no runtime's arithmetic decides:
# random test models have shown top-2 margins of 1e-4 and 2.5e-3 with F16 logit errors of 0.01-0.02.
TIE_MARGIN = 0.01
TOLERANCES = {
    "F32": {"max_abs_logit_diff": 0.05, "mean_kld": 1e-4, "min_top1_agreement": 1.0, "generation_match": True},
    "F16": {"max_abs_logit_diff": 0.05, "mean_kld": 1e-4, "min_top1_agreement": 1.0, "generation_match": True},
    "Q8_0": {"max_abs_logit_diff": 1.0, "mean_kld": 5e-3, "min_top1_agreement": 0.85, "generation_match": False},
}


def default_images() -> list[Path]:
    folder = resources.files("impq") / "assets" / "images"
    return sorted(Path(str(p)) for p in folder.iterdir() if p.name.endswith(".png"))


@dataclass
class CaseResult:
    image: str
    prompt: str
    reference_tokens: list[int]
    llamacpp_tokens: list[int]
    generation_match: bool
    prompt_top1_match: bool


@dataclass
class VerifyReport:
    text_gguf: str
    mmproj_gguf: str
    reference: str
    weight_type: str
    top1_agreement: float
    max_abs_logit_diff: float
    max_abs_image_embedding_diff: float          # projector output: tells vision-side errors from text-side ones
    mean_kld: float
    generation_match: bool
    generations_matched: str
    near_ties: int                               # steps counted as agreeing because the reference's top two tie
    tolerance: dict | None
    passed: bool | None
    cases: list[CaseResult] = field(default_factory=list)
    backend: dict = field(default_factory=dict)  # where llama.cpp ran (device, offloaded layers, repacking)

    def to_dict(self) -> dict:
        return asdict(self)


def weight_type(path: Path) -> str:
    """The file type the converter recorded ("unknown" where it recorded none: then no tolerance applies)."""
    header = require_text_arch(read_gguf_header(path, ("general.file_type",)), "verifies")
    if "general.file_type" not in header.fields:
        return "unknown"
    return gguf.LlamaFileType(int(header.fields["general.file_type"])).name.replace("MOSTLY_", "").replace("ALL_", "")


def verify_pair(export_dir: str | Path | None, reference_dir: str | Path, images: list[Path] | None = None,
                prompts: list[str] | None = None, max_new_tokens: int = 16, n_threads: int | None = None,
                on_case=None, text: Path | None = None, mmproj: Path | None = None, gpu_layers: int = 0,
                template: str | None = None) -> VerifyReport:
    text_path, mmproj_path = resolve_pair(export_dir, text, mmproj)
    image_paths = images or default_images()
    loaded = [(p, load_image(p)) for p in image_paths]      # unreadable images fail before any model loads
    prompts = prompts or list(DEFAULT_PROMPTS)
    wtype = weight_type(text_path)
    reference = LMM.from_folder(reference_dir)
    divergence = Divergence(tie_margin=TIE_MARGIN)
    cases: list[CaseResult] = []
    embedding_diff = 0.0
    # a pair written by another converter records no geometry: the reference's processor decides it
    with PairRunner(text_path, mmproj_path, n_threads=n_threads, gpu_layers=gpu_layers, template=template,
                    image_resize=reference.spec.vision.resize) as runner:
        # the reference runs the mmproj's vision reduction (its input size; ldpv2 is the pooled projector)
        reduction = VisionReduction(runner.image_size, reference.spec.vision.patch_size,
                                    runner.projector_type == "ldpv2")
        for path, image in loaded:
            ref_embeddings = reference.encode_image(image, reduction).float().numpy()
            for prompt in prompts:
                ref = reference.generate(image, prompt, max_new_tokens, reduction)
                # Teacher forcing along the reference's greedy tokens: llama.cpp's free-running greedy output is
                # identical exactly when its argmax agrees with the reference at every one of these steps.
                run = runner.run(image, prompt, follow=ref.tokens)
                agree = [divergence.add(r.numpy(), t) for r, t in zip(ref.logits, run.step_logits)]
                embedding_diff = max(embedding_diff, float(np.abs(run.image_embeddings - ref_embeddings).max()))
                cases.append(CaseResult(path.name, prompt, ref.tokens, run.tokens, all(agree), agree[0]))
                if on_case:
                    on_case(cases[-1])
        backend = runner.backend
    matched = sum(c.generation_match for c in cases)
    tolerance = TOLERANCES.get(wtype)
    passed = None
    if tolerance:
        passed = ((matched == len(cases) or not tolerance["generation_match"])
                  and divergence.top1_agreement >= tolerance["min_top1_agreement"]
                  and divergence.max_abs_diff <= tolerance["max_abs_logit_diff"]
                  and divergence.mean_kld <= tolerance["mean_kld"])
    return VerifyReport(str(text_path), str(mmproj_path), str(reference_dir), wtype, divergence.top1_agreement,
                        divergence.max_abs_diff, embedding_diff, divergence.mean_kld, matched == len(cases),
                        f"{matched}/{len(cases)}", divergence.near_ties, tolerance, passed, cases, backend)


def check_against_reference(make_candidate, model_dir, n_items: int) -> dict:
    """Accuracy on the first items of the shipped eval split (for the embedded model) and next-token agreement
    with the full-precision PyTorch model on the bundled images and prompts. `make_candidate()` builds the
    answerer under test; for a model other than imp-tiny it is built only once the streamed reference's logits
    exist and the reference is freed, so the two are never in memory together."""
    from .defaults import default_eval_data, is_embedded_model
    from .measure.vqa import TorchAnswerer, evaluate, read_vqa_jsonl

    out: dict = {}
    with contextlib.ExitStack() as stack:

        def opened(candidate):
            return stack.enter_context(candidate) if hasattr(candidate, "__exit__") else candidate

        if is_embedded_model(model_dir):
            reference, candidate = TorchAnswerer(model_dir), opened(make_candidate())
            items = read_vqa_jsonl(default_eval_data())[:n_items]
            report = evaluate(candidate, items, model="quantized", dataset="eval", reference=reference)
            full = evaluate(reference, items, model="pytorch", dataset="eval")
            out.update(eval_items=len(items), accuracy=report.accuracy, reference_accuracy=full.accuracy,
                       mean_kld=report.mean_kld, top1_agreement=report.top1_agreement)
        else:
            # the full-precision reference streams its decoder (one block in memory), and is gone before the
            # candidate loads
            reference = LMM(read_spec(model_dir), stream_decoder=True)
            prompts = [(load_image(path), prompt) for path in default_images() for prompt in DEFAULT_PROMPTS]
            ref_logits = reference.next_token_logits([reference.prompt_embeddings(*p) for p in prompts])
            del reference
            trim()
            candidate = opened(make_candidate())
            divergence = Divergence()
            for (image, prompt), ref in zip(prompts, ref_logits):
                _, logits = candidate.answer(image, prompt, 1)
                divergence.add(ref.numpy(), logits)
            out.update(mean_kld=divergence.mean_kld, top1_agreement=divergence.top1_agreement)
        if hasattr(candidate, "backend"):
            out["backend"] = candidate.backend          # where llama.cpp ran
    return out
