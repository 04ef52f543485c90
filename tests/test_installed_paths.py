"""The README's "src/moca3d/weights/..." model paths work as command-line options from any folder (a wheel install
has no src/ there), as they already did inside recipes."""

from pathlib import Path

from typer.testing import CliRunner

from moca3d.cli import app
from moca3d.commands.common import shipped
from moca3d.defaults import DEFAULT_MODEL_DIR


def test_shipped_model_paths_resolve_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shipped(Path("src/moca3d/weights/default")) == DEFAULT_MODEL_DIR  # the package's copy
    assert shipped(Path("runs/dit/pipeline")) == Path("runs/dit/pipeline") and shipped(None) is None  # others unchanged
    (tmp_path / "src" / "moca3d" / "weights" / "default").mkdir(parents=True)  # a folder of that name here wins
    assert shipped(Path("src/moca3d/weights/default")) == Path("src/moca3d/weights/default")


def test_info_and_init_from_take_the_readme_paths_outside_the_repository(tmp_path, monkeypatch):
    """`moca3d info src/moca3d/weights/vae` said "no such file or folder", `train --init-from src/moca3d/weights/default`
    "no such folder" from any folder but the repository's root."""
    monkeypatch.chdir(tmp_path)
    info = CliRunner().invoke(app, ["info", "src/moca3d/weights/vae"])
    assert info.exit_code == 0, info.output
    assert "VAE" in info.output
    train = CliRunner().invoke(app, ["train", str(tmp_path / "no_data"), "-o", str(tmp_path / "run"),
                                     "--init-from", "src/moca3d/weights/default"])
    assert "no such folder" not in str(train.exception)  # got past --init-from, to the missing data
