"""The mmproj GGUF (`general.architecture = clip`, projector `mlp`): vision tower + mlp2x_gelu projector.

Depth: the file stores exactly the tower layers that run and names the last with `clip.vision.feature_layer`
(llama.cpp's default without it would run `block_count - 1` layers). This covers both checkpoint conventions:
a full tower with select layer -2, and Imp's tower saved without its last layer.
No `v.post_ln` is written: Imp and LLaVA take features before SigLIP's/CLIP's post-layernorm.

Vision reductions (models/reduction.py): a lower resolution stores its `clip.vision.image_size` and the
interpolated position table (F32); 2x2 token pooling is written as llama.cpp's `ldpv2` projector (Linear, GELU,
Linear, 2x2 average pooling of a 24x24 grid, then a depthwise 3x3 convolution added back) with the convolution's
weight and bias zero, which is exactly Imp's mlp2x_gelu followed by 2x2 pooling.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch

from ..errors import ImpqError
from ..models.layouts import ModelSpec
from ..models.reduction import LLAMA_CPP_POOL_GRID, VisionReduction, interpolate_positions, vision_reduction
from .gguf_blocks import chosen_blocks
from .gguf_file import FILE_TYPES, PlannedTensor, QType, add_provenance, gguf_bytes, matrix_type, write_gguf

MMPROJ_ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ]      # llama.cpp names every mmproj's architecture "clip"

# projector tensors by llama.cpp projector type: "mlp" (Imp's mlp2x_gelu) and "ldpv2" (the same MLP, then pooling)
PROJECTOR_NAMES = {"mlp": {"projector.0.weight": "mm.0.weight", "projector.0.bias": "mm.0.bias",
                           "projector.2.weight": "mm.2.weight", "projector.2.bias": "mm.2.bias"},
                   "ldpv2": {"projector.0.weight": "mm.model.mlp.0.weight", "projector.0.bias": "mm.model.mlp.0.bias",
                             "projector.2.weight": "mm.model.mlp.2.weight", "projector.2.bias": "mm.model.mlp.2.bias"}}


def projector_type(reduction: VisionReduction) -> str:
    if not reduction.pool:
        return "mlp"
    if not reduction.runs_in_llama_cpp:
        raise ImpqError(None, f"token reduction pool2 at {reduction.image_size} px ({reduction.grid}x{reduction.grid} "
                              f"patches): stock llama.cpp pools only a {LLAMA_CPP_POOL_GRID}x{LLAMA_CPP_POOL_GRID} grid "
                              "(its ldpv2 projector); this reduction runs in PyTorch only")
    return "ldpv2"


def mmproj_tensors(spec: ModelSpec, qtype: QType, reduction: VisionReduction | None = None,
                   quantized: dict | None = None, source: Callable[[str], torch.Tensor] | None = None
                   ) -> list[PlannedTensor]:
    """The vision tower's and projector's tensors; those in `quantized` (canonical name -> driver.QuantizedTensor)
    are written as the codes an impq algorithm chose, the rest by the type policy (`qtype` where a matrix's width
    fits its blocks, else F16) from `source` (default: the checkpoint; the quantized model's own values where an
    algorithm changed norms, as AWQ does)."""
    quantized = quantized or {}
    load = source or spec.load
    vision = spec.vision
    reduction = reduction or vision_reduction(vision)
    projector = projector_type(reduction)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, vision.config.num_hidden_layers)
    planned = []
    for canonical, src in spec.tensors.items():
        if canonical.startswith("projector."):
            name = PROJECTOR_NAMES[projector][canonical]
        elif canonical.startswith("vision."):
            # gguf's map knows the LLaVA-style "vision_tower.vision_model.*" names
            name = names.get_name("vision_tower." + canonical[len("vision."):], try_suffixes=(".weight", ".bias"))
            if name is None and canonical.endswith("class_embedding"):
                name = "v.class_embd"
            if name is None:
                raise ImpqError(spec.folder, f"no mmproj name for vision tensor '{canonical}'")
        else:
            continue
        shape = spec.shape(canonical)
        if canonical in quantized:
            planned.append(chosen_blocks(name, shape, quantized[canonical], canonical))
            continue
        produce = lambda c=canonical: load(c)
        if name.startswith("v.position_embd") and reduction.image_size != vision.image_size:
            shape = (reduction.grid ** 2 + int(vision.has_class_token), shape[1])
            produce = lambda c=canonical: interpolate_positions(load(c), reduction.grid, vision.has_class_token)
        if name.startswith("v.position_embd") or len(shape) == 1:
            tensor_type = QType.F32
        elif name.startswith("v.patch_embd"):
            tensor_type = QType.F32 if qtype == QType.F32 else QType.F16   # convolution kernel: F16/F32 only
        else:
            tensor_type = matrix_type(shape, qtype)
        planned.append(PlannedTensor(name, tuple(shape), tensor_type, produce, canonical=canonical))
    if projector == "ldpv2":
        # the positional convolution, zero: its output added back is nothing, leaving the plain 2x2 average
        hidden = spec.text_config.hidden_size
        planned.append(PlannedTensor("mm.model.peg.0.weight", (hidden, 1, 3, 3), QType.F16,
                                     lambda: torch.zeros(hidden, 1, 3, 3)))
        planned.append(PlannedTensor("mm.model.peg.0.bias", (hidden,), QType.F32, lambda: torch.zeros(hidden)))
    return planned


def _mmproj_metadata(spec: ModelSpec, qtype: QType, reduction: VisionReduction, source_digest: str, settings: dict):
    vision = spec.vision
    cfg = vision.config
    layers = cfg.num_hidden_layers
    act = cfg.hidden_act

    def metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.MMPROJ)
        writer.add_name(f"mmproj-{spec.name}")
        writer.add_file_type(FILE_TYPES[qtype])
        if qtype not in (QType.F32, QType.F16):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_clip_projector_type(projector_type(reduction))
        writer.add_clip_has_vision_encoder(True)
        writer.add_bool("clip.has_text_encoder", False)        # read by older llama.cpp
        writer.add_bool(gguf.Keys.Clip.HAS_LLAVA_PROJECTOR, True)
        # tanh GELU (SigLIP); neither flag means quick-GELU (CLIP)
        writer.add_vision_use_gelu(act in ("gelu_pytorch_tanh", "gelu_new", "gelu"))
        writer.add_vision_embedding_length(cfg.hidden_size)
        writer.add_vision_feed_forward_length(cfg.intermediate_size)
        writer.add_vision_block_count(layers)
        writer.add_vision_head_count(cfg.num_attention_heads)
        writer.add_vision_projection_dim(spec.text_config.hidden_size)
        writer.add_vision_image_size(reduction.image_size)
        writer.add_vision_patch_size(vision.patch_size)
        writer.add_vision_attention_layernorm_eps(cfg.layer_norm_eps)
        writer.add_vision_image_mean(list(vision.image_mean))
        writer.add_vision_image_std(list(vision.image_std))
        writer.add_array("clip.vision.feature_layer", [layers])
        # llama.cpp letterboxes non-square images; the model was trained on this geometry instead
        writer.add_string("impq.image_resize", vision.resize)
        add_provenance(writer, source_digest, settings)
    return metadata


def write_mmproj_gguf(spec: ModelSpec, path: Path, qtype: QType, source_digest: str, settings: dict,
                      on_tensor=None, reduction: VisionReduction | None = None, quantized: dict | None = None,
                      source: Callable[[str], torch.Tensor] | None = None) -> Path:
    reduction = reduction or vision_reduction(spec.vision)
    metadata = _mmproj_metadata(spec, qtype, reduction, source_digest, settings)
    return write_gguf(path, MMPROJ_ARCH, metadata, mmproj_tensors(spec, qtype, reduction, quantized, source),
                      on_tensor)


def write_model_mmproj(lmm, path: Path, qtype: QType, source_digest: str, settings: dict, quantized: dict,
                       reduction: VisionReduction | None = None) -> Path:
    """The mmproj of `lmm` whose vision side an algorithm quantized (`quantized`: canonical name ->
    driver.QuantizedTensor; none: the checkpoint's tensors by the type policy): the codes as chosen, the rest from
    the model as quantization left it (AWQ folds its scales into the norms)."""
    spec = lmm.spec
    state = {**{f"vision.vision_model.{k}": v for k, v in lmm.vision.state_dict().items()},
             **{f"projector.{k}": v for k, v in lmm.projector.state_dict().items()}}
    vision = {name: q for name, q in quantized.items() if name in state}
    source = (lambda name: state[name] if name in state else spec.load(name)) if vision else None
    return write_mmproj_gguf(spec, path, qtype, source_digest, settings, reduction=reduction, quantized=vision,
                             source=source)


def write_mmproj_at(spec: ModelSpec, source: Path, path: Path, qtype: QType, reduction: VisionReduction,
                    source_digest: str, settings: dict) -> Path:
    """`source` (an mmproj of this model at its native geometry, file type `qtype`, its tower perhaps quantized) at
    another reduction: every tensor's stored bytes as they are, the position table interpolated from the
    checkpoint's, the projector under the reduction's names. A tower quantized once serves every resolution."""
    stored = {t.name: t for t in gguf.GGUFReader(source).tensors}
    native = {t.canonical: t.name for t in mmproj_tensors(spec, QType.F16)}
    planned = []
    for t in mmproj_tensors(spec, qtype, reduction):
        kept = stored.get(native.get(t.canonical, ""))
        if kept is None or t.name.startswith("v.position_embd"):
            planned.append(t)
            continue
        planned.append(PlannedTensor(t.name, t.shape, QType(int(kept.tensor_type)), lambda: None,
                                     lambda k=kept: np.asarray(k.data), t.canonical))
    return write_gguf(path, MMPROJ_ARCH, _mmproj_metadata(spec, qtype, reduction, source_digest, settings), planned)


def mmproj_gguf_bytes(spec: ModelSpec, qtype: QType, source_digest: str, settings: dict,
                      reduction: VisionReduction | None = None, types: dict[str, QType] | None = None) -> int:
    """The exact size write_mmproj_gguf would write, with `types` (canonical name -> type) for the tensors an
    algorithm quantizes: what a size budget that includes the vision side counts."""
    reduction = reduction or vision_reduction(spec.vision)
    types = types or {}
    tensors = [dataclasses.replace(t, qtype=types[t.canonical]) if t.canonical in types else t
               for t in mmproj_tensors(spec, qtype, reduction)]
    return gguf_bytes(MMPROJ_ARCH, _mmproj_metadata(spec, qtype, reduction, source_digest, settings), tensors)
