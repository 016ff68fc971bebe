"""How far llama.cpp running a written pair is from the PyTorch model it was written from, and from the original
model: shared by the tests that write quantized tensors."""

from __future__ import annotations

from PIL import Image

from impq.measure.divergence import Divergence
from impq.runtime.llamacpp import PairRunner
from impq.verify import DEFAULT_PROMPTS, default_images


def divergences(lmm, original, text, mmproj, tokens: int) -> tuple[Divergence, Divergence]:
    """(llama.cpp against `lmm` at every step of its greedy answer, llama.cpp against `original` at the first
    step), on two default images."""
    vs_fake, vs_original = Divergence(), Divergence()
    with PairRunner(text, mmproj) as runner:
        for image_path in default_images()[:2]:
            image = Image.open(image_path)
            ref = lmm.generate(image, DEFAULT_PROMPTS[0], tokens)
            run = runner.run(image, DEFAULT_PROMPTS[0], follow=ref.tokens)
            orig = original.generate(image, DEFAULT_PROMPTS[0], tokens)
            for r, t in zip(ref.logits, run.step_logits):
                vs_fake.add(r.numpy(), t)
            vs_original.add(orig.logits[0].numpy(), run.step_logits[0])
    return vs_fake, vs_original
