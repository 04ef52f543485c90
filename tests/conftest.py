"""Fixtures shared by several test modules."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moca3d.data.prepare import PrepareConfig, prepare, procedural_jobs
from moca3d.geometry.inside import QueryConfig
from moca3d.geometry.render import RenderConfig
from moca3d.geometry.sampling import SurfaceSamplingConfig
from moca3d.models.vae import VecSetVAE
from moca3d.training.train_vae import encode_dataset

# The smallest prepare settings the tests build assets with (samples, queries, a 48 px render; all in train).
TINY_PREPARE = PrepareConfig(surface=SurfaceSamplingConfig(num_points=128), queries=QueryConfig(num_queries=96),
                             render=RenderConfig(size=48, supersample=1), max_components=3, val_fraction=0.0, test_fraction=0.0)

TINY_VAE = dict(num_latents=16, latent_channels=4, width_encoder=32, width_decoder=32, num_attention_heads=4,
                num_layers_encoder=1, num_layers_decoder=1, embed_frequency=4)


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module; the scripts import their shared helpers (benchkit.py) as a sibling module."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state: a failure reproduces when the test runs alone."""
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def object_dataset(tmp_path_factory):
    """Six tiny procedural objects (all train) with cached latents of a random tiny VAE, and that VAE's folder."""
    root = tmp_path_factory.mktemp("data")
    cfg = PrepareConfig(
        surface=SurfaceSamplingConfig(num_points=512), queries=QueryConfig(num_queries=256),
        render=RenderConfig(size=64, supersample=1), val_fraction=0.0, test_fraction=0.0,
    )
    prepare(procedural_jobs("objects", 6, seed=3), root, cfg, workers=1, progress=False)
    torch.manual_seed(0)
    vae = VecSetVAE(**TINY_VAE).eval()
    vae_dir = root / "vae"
    vae.save_pretrained(vae_dir)
    encode_dataset(root, vae, "test", num_points=512, progress=False)
    return root, vae_dir


def tiny_dit_recipe(**kw):
    """A tiny from-scratch DiT recipe (2 steps, checkpoints every step); `kw` overrides its keys."""
    from moca3d.training.train_dit import DiTTrainConfig

    base = dict(transformer=dict(width=32, num_layers=2, num_heads=4, compression=4),
                image_encoder=dict(image_size=32, patch_size=8, width=32, num_layers=1, num_heads=4),
                steps=2, batch_size=2, warmup_steps=1, checkpoint_every=1, log_every=1, lr=3e-3)
    return DiTTrainConfig.from_dict({**base, **kw})


@pytest.fixture(scope="session")
def object_pipeline(object_dataset, tmp_path_factory):
    """A tiny object pipeline trained 2 steps on `object_dataset`: a prior to fine-tune."""
    from moca3d.training.train_dit import train

    root, vae_dir = object_dataset
    return train(root, tmp_path_factory.mktemp("prior"), tiny_dit_recipe(), vae_dir=vae_dir, device="cpu", progress=False)["pipeline"]


def cli_report(args: list, path: Path) -> dict:
    """Run the CLI with `args --json path`; the report it wrote (after checking it exited cleanly)."""
    import json

    from typer.testing import CliRunner

    from moca3d.cli import app

    result = CliRunner().invoke(app, [*args, "--json", str(path)])
    assert result.exit_code == 0, result.output
    return json.loads(Path(path).read_text())


def preempt_on_call(real, call: int, calls: list):
    """`real`, wrapped to count its calls in `calls` and send this process SIGTERM during call number `call` (a
    scheduler preempting a training job: the loop ends after that step)."""
    import os
    import signal

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    return wrapped

