"""Scenes from a converted real-weight pipeline: its DINOv2 encoder widened to 7 channels, fine-tuned with LoRA, and used
for generation, as the built-in encoder is (issue 7: "works for the small built-in encoder and for DINOv2 alike")."""

import copy
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import test_convert as tc
from moca3d.cli import app
from moca3d.commands.info import TASKS, describe
from moca3d.errors import ConfigError
from moca3d.data.prepare import PrepareConfig, prepare, procedural_jobs
from moca3d.geometry.inside import QueryConfig
from moca3d.geometry.render import RenderConfig
from moca3d.geometry.sampling import SurfaceSamplingConfig
from moca3d.models.dino import CROP_SIZE, DINOv2Encoder, imagenet_normalize
from moca3d.models.image_encoder import encode_views, input_channels, widen_input_channels
from moca3d.models.lora import is_lora_parameter
from moca3d.models.vae import VecSetVAE
from moca3d.pipeline import MoCAPipeline
from moca3d.training.train_dit import DiTTrainConfig, train
from moca3d.training.train_vae import encode_dataset
from test_scene import SMALL_SCENES, SURFACE_POINTS, _visible_scene


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny converted TripoSG pipeline (DINOv2 encoder) and procedural scenes encoded with its VAE."""
    tmp = tmp_path_factory.mktemp("dino_scenes")
    tc.write_release(tmp / "release")
    res = CliRunner().invoke(app, ["convert", "triposg", str(tmp / "release"), str(tmp / "pipeline"),
                                   "--num-latents", str(tc.L), "--compression", "4"])
    assert res.exit_code == 0, res.output
    root = tmp / "scenes"
    cfg = PrepareConfig(surface=SurfaceSamplingConfig(num_points=SURFACE_POINTS), queries=QueryConfig(num_queries=128),
                        render=RenderConfig(size=64, supersample=1), val_fraction=0.0, test_fraction=0.0)
    prepare([job for i in SMALL_SCENES for job in procedural_jobs("scenes", 1, seed=2, start=i)], root, cfg, workers=1, progress=False)
    encode_dataset(root, VecSetVAE.from_pretrained(tmp / "pipeline" / "vae").eval(), "test", num_points=SURFACE_POINTS, progress=False)
    return tmp / "pipeline", root


def recipe(init_from, **kw):
    return DiTTrainConfig.from_dict(dict(condition="scene", init_from=str(init_from), lora_rank=2, steps=1, batch_size=2,
                                         warmup_steps=1, checkpoint_every=1, log_every=1, **kw))


def test_zero_widened_dinov2_reads_a_scene_stack_as_its_masked_render(converted):
    """At initialisation a zero-widened DINOv2 encodes a [0, 1] scene stack exactly as the object encoder encodes the
    stack's first three channels (the instance on white) with ImageNet normalisation: the prior is kept (atol 1e-5)."""
    pipeline, _ = converted
    original = DINOv2Encoder.from_pretrained(pipeline / "image_encoder")
    widened = widen_input_channels(copy.deepcopy(original), init="zero")
    assert input_channels(widened) == 7 and widened.image_size == CROP_SIZE
    stacks = torch.rand(2, 14, CROP_SIZE, CROP_SIZE)  # two instances, two views each
    with torch.no_grad():
        tokens = encode_views(widened, stacks)  # (2, 2 * M, D)
        expected = original(imagenet_normalize(stacks.reshape(4, 7, CROP_SIZE, CROP_SIZE)[:, :3]))  # (4, M, D)
    torch.testing.assert_close(tokens, expected.reshape(2, -1, expected.shape[-1]), atol=1e-5, rtol=0)
    with pytest.raises(Exception, match=r"pixels must be \(B, 7, H, W\)"):
        widened(torch.rand(1, 3, CROP_SIZE, CROP_SIZE))
    # the groups the zero channels hide at initialisation: the scene RGB normalised as the instance's, the mask as is
    flat = stacks.reshape(4, 7, CROP_SIZE, CROP_SIZE)
    normalized = widened.normalize_stacks(flat)
    torch.testing.assert_close(normalized[:, 3:6], imagenet_normalize(flat[:, 3:6]), atol=0, rtol=0)
    torch.testing.assert_close(normalized[:, 6], flat[:, 6], atol=0, rtol=0)


def test_scene_finetune_of_a_converted_pipeline_generates_and_its_adapter_matches_its_export(converted, tmp_path):
    """`train-scene --init-from` a converted pipeline: a scene pipeline with a 7-channel DINOv2 (LoRA merged) that
    generates one mesh per instance; the run's LoRA adapter folded into the base gives the same latents as its export."""
    pipeline, root = converted
    result = train(root, tmp_path / "run", recipe(pipeline, transformer_lora_rank=2), device="cpu", progress=False)
    exported = MoCAPipeline.from_pretrained(result["pipeline"])
    assert exported.is_scene_model and isinstance(exported.image_encoder, DINOv2Encoder)
    assert exported.image_encoder.model.config.num_channels == 7
    assert not any(is_lora_parameter(n) for n in exported.image_encoder.state_dict())
    base = DINOv2Encoder.from_pretrained(pipeline / "image_encoder").model.state_dict()
    tuned = exported.image_encoder.model.state_dict()
    assert not torch.equal(tuned["embeddings.patch_embeddings.projection.weight"][:, :3],
                           base["embeddings.patch_embeddings.projection.weight"])  # the projection trains in full
    assert all(torch.equal(tuned[k], base[k]) for k in base if "norm" in k)  # frozen under LoRA

    report = describe(Path(result["pipeline"]))
    assert report["task"] == TASKS["scene"]  # it read DINOv2's channels under the small encoder's key: "objects"
    assert report["components"]["image_encoder"]["in_channels"] == 7
    assert report["components"]["image_encoder"]["image_size"] == CROP_SIZE  # not its config's pre-training size

    folder, n = _visible_scene(root)
    settings = dict(steps=2, resolution=16, seed=3, show_progress=False)
    out = exported.generate_scene(folder / "render.png", folder / "mask.png", **settings)
    assert len(out.meshes) == n and torch.isfinite(out.latents).all()
    adapted = MoCAPipeline.from_pretrained(pipeline, lora=tmp_path / "run" / "lora")
    assert adapted.is_scene_model
    torch.testing.assert_close(adapted.generate_scene(folder / "render.png", folder / "mask.png", **settings).latents, out.latents,
                               atol=1e-5, rtol=0)


def test_a_dinov2_folder_as_image_encoder_from_is_refused_before_training(converted, tmp_path):
    """It trained to the end, then could not save its adapter (DINOv2 has no moca3d config to hold it whole)."""
    pipeline, root = converted
    with pytest.raises(ConfigError, match="image_encoder_from .*: a DINOv2 folder"):
        train(root, tmp_path / "run", recipe(pipeline, image_encoder_from=str(pipeline / "image_encoder"), transformer_lora_rank=2),
              device="cpu", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
