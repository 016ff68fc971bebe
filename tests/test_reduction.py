"""Vision reductions: position-embedding interpolation, reduced-size and pooled mmprojs in llama.cpp against
PyTorch, and the reductions a model's grid cannot take."""

from __future__ import annotations

import dataclasses

import gguf
import pytest
import torch

from impq.errors import ImpqError
from impq.recipe import export_with_recipe
from impq.models.layouts import read_spec
from impq.models.lmm import LMM
from impq.models.reduction import interpolate_positions, pool_tokens, vision_reduction
from impq.models.testing import SMALL, make_model
from impq.verify import TOLERANCES, verify_pair


@pytest.mark.parametrize("layout", ["imp-phi2", "llava-clip"])
def test_interpolation_is_the_identity_at_the_native_size(models_dir, layout):
    spec = read_spec(models_dir / layout)
    table = spec.load("vision.vision_model.embeddings.position_embedding.weight")
    grid = spec.vision.image_size // spec.vision.patch_size
    assert torch.equal(interpolate_positions(table, grid, spec.vision.has_class_token), table)


def test_interpolation_is_what_the_reference_computes(models_dir):
    """impq's table for the mmproj equals transformers' interpolate_pos_encoding in the PyTorch reference."""
    lmm = LMM.from_folder(models_dir / "imp-phi2")
    embeddings = lmm.vision.embeddings
    table = embeddings.position_embedding.weight.detach()
    for size in (56, 42, 28):
        grid = size // 14
        ours = interpolate_positions(table, grid)
        theirs = embeddings.interpolate_pos_encoding(torch.zeros(1, grid * grid, table.shape[1]), size, size)[0]
        assert torch.allclose(ours, theirs.detach(), atol=1e-6), size


def test_pooling_averages_each_2x2_block():
    tokens = torch.arange(16.0).reshape(1, 16, 1)         # a 4x4 grid, row-major
    assert pool_tokens(tokens).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]


@pytest.mark.parametrize("size", [56, 42, 28])
def test_reduced_size_mmproj_matches_pytorch_in_llama_cpp(models_dir, tmp_path, size):
    spec = read_spec(models_dir / "imp-phi2")
    result = export_with_recipe(spec, tmp_path, "f16", reduction=vision_reduction(spec.vision, size))
    assert result.mmproj_path.name.endswith(f"-{size}px.gguf")
    reader = gguf.GGUFReader(result.mmproj_path)
    assert reader.fields["clip.vision.image_size"].contents() == size
    position = next(t for t in reader.tensors if t.name == "v.position_embd.weight")
    assert position.tensor_type == gguf.GGMLQuantizationType.F32 and int(position.shape[1]) == (size // 14) ** 2
    report = verify_pair(tmp_path, models_dir / "imp-phi2")
    assert report.passed is True and report.top1_agreement == 1.0, report.to_dict()
    assert report.max_abs_image_embedding_diff <= 0.05
    assert report.cases[0].reference_tokens != []


@pytest.fixture(scope="module")
def grid24_model(tmp_path_factory):
    """A small model whose tower sees a 24x24 patch grid (patch 14 at 336 px), the grid llama.cpp's ldpv2 pools."""
    return make_model("imp-llava-phi2", tmp_path_factory.mktemp("grid24"), dims=dataclasses.replace(SMALL, image_size=336))


def test_pooled_mmproj_matches_pytorch_in_llama_cpp(grid24_model, tmp_path):
    spec = read_spec(grid24_model)
    reduction = vision_reduction(spec.vision, None, "pool2")
    assert reduction.n_tokens == 144 and reduction.runs_in_llama_cpp
    result = export_with_recipe(spec, tmp_path, "f16", reduction=reduction)
    reader = gguf.GGUFReader(result.mmproj_path)
    assert reader.fields["clip.projector_type"].contents() == "ldpv2"
    report = verify_pair(tmp_path, grid24_model)
    assert report.passed is True and report.top1_agreement == 1.0, report.to_dict()
    assert report.max_abs_logit_diff <= TOLERANCES["F16"]["max_abs_logit_diff"]
    assert report.max_abs_image_embedding_diff <= 0.05       # 144 pooled tokens compared one by one


def test_pooling_changes_what_the_model_sees(grid24_model):
    """The pooled reference is a different computation (else the pooled parity test would prove nothing)."""
    lmm = LMM.from_folder(grid24_model)
    from impq.models.preprocess import load_image
    from impq.verify import default_images

    image = load_image(default_images()[0])
    full = lmm.encode_image(image)
    pooled = lmm.encode_image(image, vision_reduction(lmm.spec.vision, None, "pool2"))
    assert full.shape[0] == 576 and pooled.shape[0] == 144
    assert torch.allclose(pooled, pool_tokens(full.unsqueeze(0))[0], atol=1e-5)


@pytest.mark.parametrize("args,needle", [
    (["--image-size", "50"], "image size 50"),
    (["--image-size", "98"], "image size 98"),
    (["--image-size", "42", "--token-reduction", "pool2"], "odd"),
    (["--token-reduction", "pool2"], "PyTorch only"),
    (["--token-reduction", "pool3"], "pool3"),
])
def test_reductions_the_model_cannot_take(run_cli, models_dir, tmp_path, args, needle):
    status, _, err = run_cli("export", models_dir / "imp-phi2", "--out", tmp_path / "out", *args)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("impq: error: ") and needle in lines[0], err
    assert not (tmp_path / "out").exists()


def test_pooling_at_other_grids_runs_in_pytorch_only(models_dir):
    spec = read_spec(models_dir / "imp-phi2")
    reduction = vision_reduction(spec.vision, None, "pool2")
    assert reduction.n_tokens == 9 and not reduction.runs_in_llama_cpp
    from impq.measure.vqa import TorchAnswerer
    from impq.models.preprocess import load_image
    from impq.verify import default_images

    text, logits = TorchAnswerer(models_dir / "imp-phi2", token_reduction="pool2").answer(
        load_image(default_images()[0]), "What is in the image?", 2)
    assert torch.isfinite(torch.as_tensor(logits)).all()
    with pytest.raises(ImpqError, match="PyTorch only"):
        export_with_recipe(spec, "/nonexistent-never-created", "f16", reduction=reduction)
