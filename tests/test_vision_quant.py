"""The vision side quantized like the decoder (issue 28): the tower's encoder layers, then the projector, block by
block on the calibration images, onto the GGUF grids their widths allow; the mmproj holds exactly the values the
PyTorch model computes with, and llama.cpp agrees with that model."""

from __future__ import annotations

import json

import gguf
import pytest
import torch

from agreement import divergences
from impq.calib import calibration_pixels, read_calibration
from impq.export.gguf_file import QType
from impq.export.gguf_mmproj import mmproj_tensors, write_mmproj_gguf
from impq.export.gguf_text import write_text_gguf
from impq.models.layouts import read_spec
from impq.models.lmm import LMM
from impq.quant.driver import quantize_vision
from impq.quant.grids import GRIDS
from impq.quant.plan import decoder_part, plan_model
from impq.verify import DEFAULT_PROMPTS, default_images


def _calib_file(tmp_path, images: bool = True):
    lines = [json.dumps({"image": str(image) if images else None, "prompt": prompt})
             for image in default_images() for prompt in DEFAULT_PROMPTS]
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _vision_plan(lmm, vision_type: str):
    plan = plan_model(lmm.llm, lmm.vision_linears(), GRIDS["q4_0"], GRIDS[vision_type])
    return {name: entry for name, entry in plan.items() if name not in decoder_part(plan)}


@pytest.mark.parametrize("layout,vision_type,method", [("imp-phi2", "q4_k", "gptq"), ("llava-clip", "q4_0", "gptq"),
                                                       ("imp-phi2", "q4_0", "awq"), ("llava-siglip", "q5_k", "rtn"),
                                                       ("imp-phi2", "q4_0", "signround")])
def test_quantized_mmproj_holds_exactly_the_fake_quantized_weights(models_dir, tmp_path, layout, vision_type, method):
    """Codes bit-exact against gguf-py's dequantizer at every quantized tensor's name, the rest written from the
    model as quantization left it (AWQ's folded norms); llama.cpp on the quantized mmproj agrees with PyTorch
    computing with the same quantized tower, closer than with the original tower."""
    spec = read_spec(models_dir / layout)
    lmm = LMM(spec)
    plan = _vision_plan(lmm, vision_type)
    pixels = calibration_pixels(lmm, read_calibration(_calib_file(tmp_path)), 8)
    result = quantize_vision(lmm, pixels, plan, method, signround_options={"iterations": 4})
    planned = {name for name, entry in plan.items() if entry.grid is not None}
    assert set(result.tensors) == planned and planned
    assert any(name.startswith("projector.") for name in planned)         # the projector is a block too
    state = {**{f"vision.vision_model.{k}": v for k, v in lmm.vision.state_dict().items()},
             **{f"projector.{k}": v for k, v in lmm.projector.state_dict().items()}}
    text, mmproj = tmp_path / "m-F16.gguf", tmp_path / "mmproj-m.gguf"
    write_text_gguf(spec, text, QType.F16, "digest", {})
    write_mmproj_gguf(spec, mmproj, QType[vision_type.upper()], "digest", {}, quantized=result.tensors,
                      source=state.__getitem__)

    names = {t.canonical: t.name for t in mmproj_tensors(spec, QType.F16)}
    stored = {t.name: t for t in gguf.GGUFReader(mmproj).tensors}
    for canonical, quantized in result.tensors.items():
        tensor = stored[names[canonical]]
        assert tensor.tensor_type == quantized.grid.qtype == plan[canonical].grid.qtype
        read_back = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type))
        assert torch.equal(read_back, state[canonical].float()), canonical
    for canonical in names:                     # the float rest: the model's own values (AWQ changed the norms)
        if canonical not in result.tensors and canonical in state and "position" not in canonical:
            tensor = stored[names[canonical]]
            read_back = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
            assert torch.allclose(read_back.reshape(state[canonical].shape), state[canonical].float(),
                                  atol=1e-3, rtol=1e-3), canonical

    if spec.vision.resize != "squash":
        return      # a CLIP tower's crop is not llama.cpp's letterbox: its F16 pair already differs (KLD ~0.1 here)
    vs_fake, vs_original = divergences(lmm, LMM(spec), text, mmproj, 4)
    assert vs_fake.mean_kld < 5e-3
    assert vs_fake.klds[0] < vs_original.klds[0]


def test_the_width_fallbacks_are_llama_cpps(models_dir):
    """A K-quant's 256-wide super-blocks do not fill a test tower's widths: each tensor takes llama.cpp's
    fallback (Q4_K -> Q5_0), and one that not even 32-wide blocks fill would stay at 16 bits, named with why."""
    lmm = LMM(read_spec(models_dir / "imp-phi2"))
    plan = _vision_plan(lmm, "q4_k")
    for name, entry in plan.items():
        width = entry.in_features
        expected = "Q4_K" if width % 256 == 0 else "Q5_0" if width % 32 == 0 else None
        assert (entry.grid.name if entry.grid else None) == expected, name
        assert (entry.fallback is None) == (expected == "Q4_K")


@pytest.mark.parametrize("args,needles", [
    (["--vision", "q9_9"], ["--vision q9_9"]),
    (["--vision", "q4_0", "--tensor-type", r"v\.blk\.99\.=q4_0"], ["blk", "99", "matches no quantized tensor"]),
    (["--tensor-type", r"mm\.7\.=q4_0"], ["mm", "7", "matches no quantized tensor"]),
])
def test_bad_vision_input_is_one_line_and_writes_nothing(run_cli, tmp_path, args, needles):
    out = tmp_path / "out"
    status, _, err = run_cli("quantize", "--method", "rtn", "--nsamples", "2", "--verify-items", "0", "--out", out,
                             *args)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("impq: error: "), err
    assert all(needle in lines[0] for needle in needles), err
    assert not out.exists()


def test_a_calibrated_vision_side_needs_calibration_images(run_cli, tmp_path):
    out = tmp_path / "out"
    calib = _calib_file(tmp_path, images=False)
    status, _, err = run_cli("quantize", "--method", "rtn", "--vision", "q4_0", "--calib", calib, "--nsamples", "2",
                             "--verify-items", "0", "--out", out)
    assert status == 2 and str(calib) in err and "images" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_vision_overrides_quantize_only_what_they_name(run_cli, tmp_path):
    """--vision f16 with a --tensor-type on the projector: only the projector is calibrated and written on a grid;
    the report states the tower's fallbacks only where it plans them."""
    out = tmp_path / "out"
    status, stdout, err = run_cli("quantize", "--method", "gptq", "--type", "q4_0", "--tensor-type", r"mm\.=q8_0",
                                  "--nsamples", "4", "--verify-items", "2", "--out", out, "--json")
    assert status == 0, err
    report = json.loads(stdout)
    assert report["verification"]["accuracy"] >= report["verification"]["reference_accuracy"] - 0.5
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(next(out.glob("mmproj-*.gguf"))).tensors}
    assert types["mm.0.weight"] == types["mm.2.weight"] == QType.Q8_0
    assert all(t in (QType.F16, QType.F32) for name, t in types.items() if not name.startswith("mm."))


def test_a_decoder_pattern_never_reaches_the_tower(models_dir):
    """llama-quantize's decoder vocabulary (attn_v, ffn_down) also occurs inside mmproj names (v.blk.0.attn_v):
    a vision tensor is named from the start of its name only."""
    lmm = LMM(read_spec(models_dir / "imp-phi2"))
    from impq.recipe import override_names

    aliases = override_names(lmm.spec)
    plan = plan_model(lmm.llm, lmm.vision_linears(), GRIDS["q4_0"], None, [("attn_v", GRIDS["q8_0"])], aliases)
    assert not [n for n in plan if n not in decoder_part(plan)]
    assert plan["llm.model.layers.0.self_attn.v_proj.weight"].grid is GRIDS["q8_0"]
    plan = plan_model(lmm.llm, lmm.vision_linears(), GRIDS["q4_0"], None, [(r"v\.blk\.0\.attn_v", GRIDS["q8_0"])],
                      aliases)
    assert [n for n in plan if n not in decoder_part(plan)] == ["vision.vision_model.encoder.layers.0.self_attn.v_proj.weight"]
