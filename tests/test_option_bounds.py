"""Size options of the VAE verbs have an upper bound, refused with one line before any model or data is read."""

import pytest
from typer.testing import CliRunner

import moca3d.commands.vae as vae_cmd
from moca3d.cli import app
from moca3d.errors import ConfigError


class Reached(Exception):
    """Raised by a stand-in for the first model or data load: the option checks let the value through."""


@pytest.fixture
def no_loads(monkeypatch):
    """load_vae, read_manifest and read_components stand-ins that stop the verb where it would first read a model or data."""

    def stop(*args, **kwargs):
        raise Reached()

    monkeypatch.setattr(vae_cmd, "load_vae", stop)
    monkeypatch.setattr("moca3d.data.dataset.read_manifest", stop)
    monkeypatch.setattr("moca3d.geometry.mesh_io.read_components", stop)  # reconstruct reads its mesh before the VAE


def _points_args(verb, value, tmp_path):
    """The arguments of `verb` with --points `value` (the mesh and data paths are never read)."""
    head = {"reconstruct": ["reconstruct", str(tmp_path / "in.glb"), "-o", str(tmp_path / "out.glb")],
            "eval-vae": ["eval-vae", str(tmp_path / "data")],
            "encode-dataset": ["encode-dataset", str(tmp_path / "data")]}[verb]
    return head + ["--points", str(value), "--device", "cpu"]


@pytest.mark.parametrize("verb", ["reconstruct", "eval-vae", "encode-dataset"])
def test_points_above_the_bound_are_refused_before_the_vae_loads(verb, tmp_path, no_loads):
    """--points 10^9 used to pass every check and sample (reconstruct) a 10^9-point surface per component: out of memory."""
    runner = CliRunner()
    for value in (vae_cmd.MAX_POINTS + 1, 10**9):
        result = runner.invoke(app, _points_args(verb, value, tmp_path))
        assert isinstance(result.exception, ConfigError), (value, result.exception)
        assert f"--points must be at most {vae_cmd.MAX_POINTS} (surface points per component), got {value}" in str(result.exception)
    result = runner.invoke(app, _points_args(verb, vae_cmd.MAX_POINTS, tmp_path))
    assert isinstance(result.exception, Reached), result.exception  # the bound itself is accepted


def test_image_size_out_of_range_is_refused_before_the_data_is_read(tmp_path, no_loads):
    """cache-latents --image-size 10^6 used to resize every render to 10^6 px a side: out of memory."""
    runner = CliRunner()
    base = ["cache-latents", str(tmp_path / "data"), "-o", str(tmp_path / "cache.safetensors"), "--image-size"]
    for value in (vae_cmd.MAX_IMAGE_SIZE + 1, 10**6, 7, 0):
        result = runner.invoke(app, base + [str(value)])
        assert isinstance(result.exception, ConfigError), (value, result.exception)
        assert f"--image-size must be from 8 to {vae_cmd.MAX_IMAGE_SIZE} px (the image encoder's input size), got {value}" in str(result.exception)
    for value in (8, 128, vae_cmd.MAX_IMAGE_SIZE):
        result = runner.invoke(app, base + [str(value)])
        assert isinstance(result.exception, Reached), (value, result.exception)
