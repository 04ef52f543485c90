"""The shipped built-in scene model: it loads, and it generates held-out procedural scenes in place."""

import numpy as np
import pytest

from moca3d.data.prepare import PrepareConfig, prepare, procedural_jobs
from moca3d.evaluation import evaluate_scenes
from moca3d.geometry.inside import QueryConfig
from moca3d.geometry.sampling import SurfaceSamplingConfig
from moca3d.pipeline import DEFAULT_SCENE_MODEL_DIR, MoCAPipeline

# The held-out scenes of the README's table: stream 4 (training used stream 5), 2-8 objects per scene
TEST_STREAM, SCENE_OBJECTS = 4, (2, 8)
HELD_OUT = [2, 3]  # 4 and 3 instances
STEPS, RESOLUTION = 25, 96  # cheaper than the CLI's 50 steps / 128 cells; the README's table uses those
# regression guards: measured scene F@0.1 0.480 (0.436, 0.523) and instance F@0.1 0.215 (0.171, 0.259), no empty
# instance, at the scene guidance 2 (the model before its last 1 500 steps: 0.438 / 0.233); the model is weak
# (README: instances roughly in place but not yet their shapes)
MIN_SCENE_FSCORE = 0.33
MIN_INSTANCE_FSCORE = 0.14


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """Two test scenes regenerated exactly as in data/scenes_test (render, masks and GT instances)."""
    root = tmp_path_factory.mktemp("held_out_scenes")
    config = PrepareConfig(surface=SurfaceSamplingConfig(num_points=1024), queries=QueryConfig(num_queries=64),
                           val_fraction=0.0, test_fraction=1.0, seed=TEST_STREAM, scene_objects=SCENE_OBJECTS)
    jobs = [job for index in HELD_OUT for job in procedural_jobs("scenes", 1, seed=TEST_STREAM, start=index)]
    prepare(jobs, root, config, workers=1, progress=False)
    return root


def test_builtin_scene_model_is_installed_and_finite():
    assert (DEFAULT_SCENE_MODEL_DIR / "model_index.json").is_file(), "the built-in scene weights are not in the package"
    pipe = MoCAPipeline.from_pretrained(DEFAULT_SCENE_MODEL_DIR)
    assert pipe.is_scene_model and pipe.transformer.max_components >= 32
    for module in (pipe.vae, pipe.transformer, pipe.image_encoder):
        assert all(np.isfinite(p.detach().numpy()).all() for p in module.parameters())


def test_builtin_scene_model_generates_held_out_scenes(held_out):
    pipe = MoCAPipeline.from_pretrained(DEFAULT_SCENE_MODEL_DIR)
    report = evaluate_scenes(pipe, held_out, "test", steps=STEPS, resolution=RESOLUTION, seed=0, progress=False)
    assert report["count"] == len(HELD_OUT) and not report["skipped"]
    assert all(s["num_empty"] == 0 for s in report["scenes"]), report["scenes"]
    assert report["mean"]["instance_fscore@0.1"] >= MIN_INSTANCE_FSCORE, report["scenes"]
    assert report["mean"]["fscore@0.1"] >= MIN_SCENE_FSCORE, report["scenes"]


def test_generate_scene_names_the_built_in_scene_model_not_its_install_path(tmp_path):
    """The record said `model /.../src/moca3d/weights/scene`; the inputs, read before the model loads, are still named."""
    from pathlib import Path

    from typer.testing import CliRunner

    from moca3d.cli import app
    from moca3d.commands.info import describe

    examples = Path(__file__).resolve().parents[1] / "examples"
    out = tmp_path / "scene.glb"
    res = CliRunner().invoke(app, ["generate-scene", str(examples / "scene4.png"), "--masks", str(examples / "scene4_masks.png"),
                                   "--steps", "5", "--resolution", "32", "--device", "cpu", "-o", str(out)])
    assert res.exit_code == 0 and res.output.startswith("wrote "), res.output
    settings = describe(out)["settings"]
    assert (settings["model"], settings["image"], settings["masks"], settings["instances"]) == ("built-in scene", "scene4.png",
                                                                                                "scene4_masks.png", 4)
