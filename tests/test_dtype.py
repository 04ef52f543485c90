"""Half-precision generation (`torch_dtype`, `--dtype`): what is cast, what stays fp32, and that results agree."""

import pytest
import torch
from typer.testing import CliRunner

from moca3d.cli import app
from moca3d.defaults import resolve_dtype
from moca3d.errors import ConfigError


def test_resolve_dtype_names_auto_and_refusals():
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("float16") is torch.float16
    assert resolve_dtype(torch.float32) is torch.float32
    assert resolve_dtype("auto", "cpu") is torch.float32  # CPUs keep fp32 (bf16 matmuls are far slower there)
    for bad in ("fp64", "int8", torch.float64, "half"):
        with pytest.raises(ConfigError, match="dtype must be auto, fp32, bf16, fp16"):
            resolve_dtype(bad)


def test_bf16_pipeline_casts_transformer_and_encoder_keeps_vae_and_the_sampling_state_fp32(object_dataset, object_pipeline):
    """bf16 weights for the transformer and image encoder, fp32 for the VAE; the sampled latents come back fp32 and
    within 10% (relative L2) of the fp32 pipeline's from the same seed; the output records its dtype."""
    from moca3d.pipeline import MoCAPipeline

    root, _ = object_dataset
    image = sorted((root / "assets").iterdir())[0] / "render.png"
    full = MoCAPipeline.from_pretrained(object_pipeline, device="cpu")
    half = MoCAPipeline.from_pretrained(object_pipeline, device="cpu", torch_dtype="bf16")
    assert {p.dtype for p in half.transformer.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in half.image_encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in half.vae.parameters()} == {torch.float32}
    settings = dict(num_parts=3, steps=4, resolution=16, seed=1, show_progress=False)
    a, b = full(image, **settings), half(image, **settings)
    assert a.latents.dtype == b.latents.dtype == torch.float32
    assert torch.isfinite(b.latents).all() and not torch.equal(a.latents, b.latents)
    assert ((a.latents - b.latents).norm() / a.latents.norm()).item() < 0.1
    assert a.settings["dtype"] == "float32" and b.settings["dtype"] == "bfloat16"


def test_pipeline_to_takes_a_dtype_as_from_pretrained_does(object_pipeline):
    """`pipe.to(torch.bfloat16)` and `pipe.to("cpu", "bf16")` cast what `torch_dtype` casts (the VAE stays fp32), the
    same weights; an unknown dtype or device is a one-line ConfigError, not torch's."""
    from moca3d.pipeline import MoCAPipeline

    cast = MoCAPipeline.from_pretrained(object_pipeline, device="cpu", torch_dtype="bf16")
    for moved in (MoCAPipeline.from_pretrained(object_pipeline).to(torch.bfloat16),
                  MoCAPipeline.from_pretrained(object_pipeline).to("cpu", "bf16"),
                  MoCAPipeline.from_pretrained(object_pipeline).to(dtype=torch.bfloat16)):
        assert {p.dtype for p in moved.transformer.parameters()} == {torch.bfloat16}
        assert {p.dtype for p in moved.image_encoder.parameters()} == {torch.bfloat16}
        assert {p.dtype for p in moved.vae.parameters()} == {torch.float32}
        for name in ("transformer", "image_encoder", "vae"):
            ours, theirs = getattr(moved, name).state_dict(), getattr(cast, name).state_dict()
            assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    back = cast.to(torch.float32)
    assert {p.dtype for p in back.transformer.parameters()} == {torch.float32} and back.device.type == "cpu"
    with pytest.raises(ConfigError, match="dtype must be auto"):
        cast.to(torch.float64)
    with pytest.raises(ConfigError, match="unknown device 'tpu' .*mps"):
        cast.to("tpu")


def test_generate_dtype_option_is_recorded_and_a_wrong_one_refused_before_loading(object_dataset, object_pipeline, tmp_path):
    from moca3d.geometry.mesh_io import gltf_document

    root, _ = object_dataset
    image = sorted((root / "assets").iterdir())[0] / "render.png"
    out = tmp_path / "half.glb"
    args = ["generate", str(image), "--model", object_pipeline, "--parts", "2", "--steps", "2", "--resolution", "32",
            "--device", "cpu", "-o", str(out)]
    result = CliRunner().invoke(app, args + ["--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert gltf_document(out)["scenes"][0]["extras"]["moca3d"]["dtype"] == "bfloat16"
    wrong = CliRunner().invoke(app, args[:4] + ["--model", str(tmp_path / "nowhere"), "--dtype", "fp64"])
    assert isinstance(wrong.exception, ConfigError) and "dtype must be auto" in str(wrong.exception)


def test_demo_and_generate_scene_refuse_a_wrong_dtype_before_loading(tmp_path):
    for args in (["demo", "--model", str(tmp_path / "nowhere"), "--dtype", "fp64"],
                 ["generate-scene", "x.png", "--masks", "m.png", "--model", str(tmp_path / "nowhere"), "--dtype", "int8"]):
        result = CliRunner().invoke(app, args)
        assert isinstance(result.exception, ConfigError) and "dtype must be auto" in str(result.exception), result.output
