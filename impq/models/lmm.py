"""The PyTorch reference: vision tower + projector + language model from transformers' own modules.
Image features are spliced in at `<image>`; this forward is the ground truth that every export is checked against."""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn
from transformers import AutoModelForCausalLM

from ..memory import trim
from .layouts import ModelSpec, build_vision_model, read_spec
from .preprocess import normalized, to_model_square
from .reduction import VisionReduction, pool_tokens


@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters created inside are moved to the meta device as they are registered (one real tensor at a time);
    buffers stay real (rotary frequencies, position ids). accelerate's init_empty_weights(include_buffers=False)
    does the same; impq does not depend on accelerate for these few lines."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class _StopForward(Exception):
    pass


DECODER = "llm.model.layers."


def decoder_name(index: int, module: str | None = None) -> str:
    """The canonical name of decoder layer `index`, or of its linear layer `module`'s weight."""
    return f"{DECODER}{index}" if module is None else f"{DECODER}{index}.{module}.weight"


VISION_ENCODER = "vision.vision_model.encoder.layers."


def vision_block_name(index: int, module: str | None = None) -> str:
    """The canonical name of vision encoder layer `index`, or of its linear layer `module`'s weight."""
    return f"{VISION_ENCODER}{index}" if module is None else f"{VISION_ENCODER}{index}.{module}.weight"


def _first_block_inputs(layers: nn.ModuleList, runs: list) -> list[tuple[torch.Tensor, dict]]:
    """What `layers[0]` receives in each of `runs` (each a forward pass through the model that holds `layers`),
    positional arguments by their names in its forward: the pass stops there."""
    first = layers[0]
    names = list(inspect.signature(first.forward).parameters)[1:]
    captured = []

    class Catcher(nn.Module):
        def forward(self, hidden_states, *args, **kwargs):
            captured.append((hidden_states, {**dict(zip(names, args)), **kwargs}))
            raise _StopForward

    layers[0] = Catcher()
    try:
        for run in runs:
            try:
                run()
            except _StopForward:
                pass
    finally:
        layers[0] = first
    return captured


@dataclass
class Generation:
    tokens: list[int]
    logits: torch.Tensor          # [steps, vocab]: the distribution each generated token was taken from


class LMM(nn.Module):
    """`stream_decoder`: the decoder blocks' parameters stay on the meta device until `load_block` reads one from
    the checkpoint (memory-mapped safetensors), so the whole LLM is never in memory (quantization, and the
    streamed reference of `next_token_logits`); everything else is loaded as usual."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype = torch.float32, stream_decoder: bool = False):
        super().__init__()
        self.spec = spec
        self.tokenizer = spec.tokenizer
        self.streams_decoder = stream_decoder
        # Built on the CPU (not the meta device) so that non-persistent buffers such as rotary frequencies and
        # position ids are real; the random initial weights are then overwritten. A streamed decoder's
        # parameters are created on the meta device and only the rest is allocated.
        with _parameters_on_meta() if stream_decoder else contextlib.nullcontext():
            self.llm = AutoModelForCausalLM.from_config(spec.text_config, attn_implementation="eager", dtype=dtype)
        if stream_decoder:
            for name, param in self._outside_decoder():
                self._assign(self.llm, name, torch.empty(param.shape, dtype=param.dtype))
        self.vision = build_vision_model(spec.vision.family, spec.vision.config).to(dtype)
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
                    if name.startswith(prefix) and name[len(prefix):] in targets and not (
                            stream_decoder and name.startswith(DECODER)):
                        targets[name[len(prefix):]].copy_(spec.load(name))
        if getattr(spec.text_config, "tie_word_embeddings", False) and "llm.lm_head.weight" not in spec.tensors:
            self.llm.lm_head.weight = self.llm.model.embed_tokens.weight
        self.eval()

    @classmethod
    def from_folder(cls, folder) -> "LMM":
        return cls(read_spec(folder))

    @staticmethod
    def _assign(root: nn.Module, name: str, value: torch.Tensor) -> None:
        module_name, _, param_name = name.rpartition(".")
        module = root.get_submodule(module_name)
        module._parameters[param_name] = nn.Parameter(value, requires_grad=False)

    def load_block(self, index: int) -> nn.Module:
        """Decoder block `index` with its tensors read from the checkpoint (a no-op when it is already loaded)."""
        layer = self.llm.model.layers[index]
        prefix = f"{DECODER}{index}."
        for name, param in list(layer.named_parameters()):
            if param.is_meta:
                self._assign(layer, name, self.spec.load(prefix + name).to(param.dtype))
        return layer

    def release_block(self, index: int) -> None:
        """Back to the meta device: the block's tensors can be read again from the checkpoint."""
        layer = self.llm.model.layers[index]
        for name, param in list(layer.named_parameters()):
            self._assign(layer, name, param.to("meta"))

    def release_all_but_decoder(self, keep_vision: bool = False) -> None:
        """The vision tower, projector (unless `keep_vision`), token embedding and head to the meta device: once
        the calibration embeddings exist, quantizing and exporting a GGUF need only the decoder, and the export
        reads these tensors from the checkpoint again."""
        for root in () if keep_vision else (self.vision, self.projector):
            for name, param in list(root.named_parameters(remove_duplicate=False)):
                self._assign(root, name, param.to("meta"))
        for name, param in self._outside_decoder():
            self._assign(self.llm, name, param.to("meta"))

    def _outside_decoder(self) -> list[tuple[str, nn.Parameter]]:
        """The LLM's parameters that are not in a decoder block (embedding, final norm, head), tied ones by each
        of their names."""
        return [(name, param) for name, param in self.llm.named_parameters(remove_duplicate=False)
                if not f"llm.{name}".startswith(DECODER)]

    def first_block_inputs(self, embeddings: list[torch.Tensor]) -> list[tuple[torch.Tensor, dict]]:
        """(hidden states, keyword arguments) that the first decoder block receives for each input embedding."""
        return _first_block_inputs(self.llm.model.layers,
                                   [lambda e=e: self.llm(inputs_embeds=e, use_cache=False) for e in embeddings])

    def first_vision_block_inputs(self, pixels: list[torch.Tensor]) -> list[tuple[torch.Tensor, dict]]:
        """(hidden states, keyword arguments) that the vision tower's first encoder layer receives per image."""
        return _first_block_inputs(self.vision.encoder.layers, [lambda p=p: self.vision_states(p) for p in pixels])

    def vision_linears(self) -> dict[str, nn.Linear]:
        """The vision tower's encoder-layer linears and the projector's, by canonical name: what a calibrated
        mmproj quantizes."""
        tower = {vision_block_name(index, name): module for index, layer in enumerate(self.vision.encoder.layers)
                 for name, module in layer.named_modules() if isinstance(module, nn.Linear)}
        return {**tower, **{f"projector.{name}.weight": module for name, module in self.projector.named_modules()
                            if isinstance(module, nn.Linear)}}

    @torch.no_grad()
    def next_token_logits(self, embeddings: list[torch.Tensor]) -> list[torch.Tensor]:
        """The last position's logits for each input embedding, computed block by block: with a streamed decoder
        each block is read once for all inputs and released, so at most one block is in memory."""
        inputs = self.first_block_inputs(embeddings)
        layers = self.llm.model.layers
        for index, layer in enumerate(layers):
            if self.streams_decoder:
                self.load_block(index)
            inputs = [(layer(hidden, **kwargs), kwargs) for hidden, kwargs in inputs]
            if self.streams_decoder:
                self.release_block(index)
                trim()
        # the model's own final norm and head, run on the last block's output with no blocks in between
        self.llm.model.layers = nn.ModuleList()
        try:
            return [self.llm(inputs_embeds=hidden, use_cache=False).logits[0, -1].float() for hidden, _ in inputs]
        finally:
            self.llm.model.layers = layers

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
        if self.spec.vision.family.has_class_token:       # CLIP's pre-layernorm comes with its class token
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
