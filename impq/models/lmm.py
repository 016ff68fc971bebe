"""The PyTorch reference: vision tower + projector + language model from transformers' own modules.
Image features are spliced in at `<image>`; this forward is the ground truth that every export is checked against."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn
from transformers import AutoModelForCausalLM, CLIPVisionModel, SiglipVisionModel

from .layouts import ModelSpec, VisionSpec, read_spec
from .preprocess import normalized, to_model_square
from .reduction import VisionReduction, pool_tokens


def build_vision_model(vision: VisionSpec) -> nn.Module:
    """The vision transformer itself (embeddings, encoder, layernorms), whose tensors are `vision.vision_model.*`."""
    if vision.kind == "siglip":
        vision.config.vision_use_head = False
        tower = SiglipVisionModel(vision.config)
    else:
        tower = CLIPVisionModel(vision.config)
    # older transformers wrap the transformer in `.vision_model`; 5.x does not
    return getattr(tower, "vision_model", tower)


@dataclass
class Generation:
    tokens: list[int]
    logits: torch.Tensor          # [steps, vocab]: the distribution each generated token was taken from


class LMM(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.spec = spec
        self.tokenizer = spec.tokenizer
        # Built on the CPU (not the meta device) so that non-persistent buffers such as rotary frequencies and
        # position ids are real; the random initial weights are then overwritten.
        self.llm = AutoModelForCausalLM.from_config(spec.text_config, attn_implementation="eager", dtype=dtype)
        self.vision = build_vision_model(spec.vision).to(dtype)
        hidden = spec.text_config.hidden_size
        self.projector = nn.Sequential(nn.Linear(spec.vision.config.hidden_size, hidden), nn.GELU(),
                                       nn.Linear(hidden, hidden)).to(dtype)
        for prefix, module in (("llm.", self.llm), ("vision.vision_model.", self.vision),
                               ("projector.", self.projector)):
            # one tensor at a time: a whole state dict beside the model would double a 3B model's peak memory.
            # read_spec checked every tensor that runs; what is not copied here (post-layernorm) is never used
            targets = module.state_dict(keep_vars=True)
            with torch.no_grad():
                for name in spec.tensors:
                    if name.startswith(prefix) and name[len(prefix):] in targets:
                        targets[name[len(prefix):]].copy_(spec.load(name))
        if getattr(spec.text_config, "tie_word_embeddings", False) and "llm.lm_head.weight" not in spec.tensors:
            self.llm.lm_head.weight = self.llm.model.embed_tokens.weight
        self.eval()

    @classmethod
    def from_folder(cls, folder) -> "LMM":
        return cls(read_spec(folder))

    def image_features(self, pixels: torch.Tensor, pool: bool = False) -> torch.Tensor:
        """[B, n_tokens, llm_hidden] from [B, 3, S, S] pixels: the selected vision layer (no post-layernorm),
        projected, then 2x2-pooled if asked. A size other than the native one interpolates the position embeddings
        (models/reduction.py states the method)."""
        features = self.projector(self.vision_states(pixels))
        return pool_tokens(features) if pool else features

    def vision_states(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, n_tokens, vision_hidden]: the selected vision layer's output, before the projector."""
        model = self.vision
        interpolate = pixels.shape[-1] != self.spec.vision.image_size
        hidden = model.embeddings(pixels.to(self.vision_device, self.dtype), interpolate_pos_encoding=interpolate)
        if self.spec.vision.kind == "clip":
            hidden = model.pre_layrnorm(hidden)
        hidden = model.encoder(inputs_embeds=hidden).last_hidden_state
        if self.spec.vision.has_class_token:
            hidden = hidden[:, 1:]
        return hidden

    def pixels(self, image: Image.Image, size: int | None = None) -> torch.Tensor:
        vision = self.spec.vision
        square = to_model_square(image, size or vision.image_size, vision.resize)
        return torch.from_numpy(normalized(square, vision.image_mean, vision.image_std)).unsqueeze(0)

    @torch.no_grad()
    def encode_image(self, image: Image.Image, reduction: VisionReduction | None = None) -> torch.Tensor:
        """[n_tokens, llm_hidden] for one image, at the native input size unless a reduction is given."""
        size = reduction.image_size if reduction else None
        return self.image_features(self.pixels(image, size), pool=bool(reduction and reduction.pool))[0]

    @property
    def vision_device(self) -> torch.device:
        return self.vision.embeddings.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.model.embed_tokens.weight.dtype

    @torch.no_grad()
    def prompt_embeddings(self, image: Image.Image | None, question: str,
                          reduction: VisionReduction | None = None) -> torch.Tensor:
        """[1, seq, hidden] input embeddings with the image's projected features at `<image>`."""
        pieces = self.tokenizer.encode_prompt(self.spec.prompt(question), self.spec.image_token)
        embed = self.llm.get_input_embeddings()
        parts: list[torch.Tensor] = []
        for i, ids in enumerate(pieces):
            if i > 0 and image is not None:
                parts.append(self.encode_image(image, reduction))
            if ids:
                parts.append(embed(torch.tensor(ids, device=embed.weight.device)))
        return torch.cat(parts).unsqueeze(0)

    @torch.no_grad()
    def generate(self, image: Image.Image | None, question: str, max_new_tokens: int = 16,
                 reduction: VisionReduction | None = None) -> Generation:
        """Greedy decoding; stops early at the end-of-sequence token."""
        embeds = self.prompt_embeddings(image, question, reduction)
        out = self.llm(inputs_embeds=embeds, use_cache=True)
        cache, step_logits, tokens = out.cache, [out.logits[0, -1].float()], []
        for _ in range(max_new_tokens):
            token = int(step_logits[-1].argmax())
            tokens.append(token)
            if token == self.tokenizer.eos_id or len(tokens) == max_new_tokens:
                break
            out = self.llm(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)
            cache = out.cache
            step_logits.append(out.logits[0, -1].float())
        return Generation(tokens, torch.stack(step_logits))
