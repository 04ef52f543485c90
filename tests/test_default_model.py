"""The shipped built-in model: it loads, and it generates held-out procedural objects in the right places."""

import numpy as np
import pytest

from moca3d.data.prepare import PrepareConfig, prepare, procedural_jobs, split_of
from moca3d.evaluation import evaluate_pipeline
from moca3d.geometry.inside import QueryConfig
from moca3d.geometry.sampling import SurfaceSamplingConfig
from moca3d.pipeline import DEFAULT_MODEL_DIR, MoCAPipeline

# configs/default.json: the stream, sample counts and splits of the dataset the model was trained on
RECIPE = dict(seed=1, num_surface=4096, num_queries=4096, val_fraction=0.05, test_fraction=0.05)
HELD_OUT = [53, 594, 948]  # a table (5 parts), a stool (4), a chair (8): all in the test split
STEPS, RESOLUTION = 25, 96  # cheaper than the CLI's 50 steps / 128 cells; the README's table uses those
# regression guard: measured 0.465 (0.041, 0.819, 0.536) with the shipped model (the medium MoC transformer);
# 0.505 (0.012, 0.795, 0.707) with the small model it replaced, 0.312 (0.0, 0.448, 0.489) after that one's first
# 40 minutes, 0.162 (0.045, 0.068, 0.373) with the model before (58-object seed-0 means: 0.548, 0.458, 0.452,
# 0.421: three objects do not rank models); the issue-6 target 0.85 is not met yet
MIN_MEAN_FSCORE = 0.35
# here 2 of 17 parts come out empty (the small model 3 of the table's 5; after 40 minutes 6, the model before 1)
MAX_EMPTY_PARTS = 5


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """The three test-split objects regenerated exactly as in the training dataset (render + GT parts)."""
    root = tmp_path_factory.mktemp("held_out")
    config = PrepareConfig(
        surface=SurfaceSamplingConfig(num_points=RECIPE["num_surface"]), queries=QueryConfig(num_queries=RECIPE["num_queries"]),
        val_fraction=RECIPE["val_fraction"], test_fraction=RECIPE["test_fraction"], seed=RECIPE["seed"],
    )
    jobs = [job for index in HELD_OUT for job in procedural_jobs("objects", 1, seed=RECIPE["seed"], start=index)]
    assert all(split_of(job.id, RECIPE["val_fraction"], RECIPE["test_fraction"]) == "test" for job in jobs)
    prepare(jobs, root, config, workers=1, progress=False)
    return root


def test_builtin_model_is_installed_and_finite():
    assert (DEFAULT_MODEL_DIR / "model_index.json").is_file(), "the built-in weights are not in the package"
    pipe = MoCAPipeline.from_pretrained()  # no path: the built-in model
    assert pipe.transformer.max_components >= 16
    for module in (pipe.vae, pipe.transformer, pipe.image_encoder):
        assert all(np.isfinite(p.detach().numpy()).all() for p in module.parameters())


def test_builtin_model_generates_held_out_objects(held_out):
    pipe = MoCAPipeline.from_pretrained()
    report = evaluate_pipeline(pipe, held_out, split="test", steps=STEPS, resolution=RESOLUTION, seed=0,
                               metric_points=20000, progress=False)
    assert report["count"] == len(HELD_OUT)
    assert sum(a["num_gt"] - a["num_pred"] for a in report["assets"]) <= MAX_EMPTY_PARTS, report["assets"]
    assert report["mean"]["fscore@0.1"] >= MIN_MEAN_FSCORE, report["assets"]
