"""Bad input stops with one line naming the problem, never a deep traceback or a partial output file."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moca3d.cli import app
from moca3d.errors import CheckpointError, ConfigError, InputError
from moca3d.geometry.mesh_io import save_glb
from moca3d.models.image_encoder import load_image, preprocess_image
from moca3d.pipeline import DEFAULT_MODEL_DIR, DEFAULT_SCENE_MODEL_DIR, MoCAPipeline

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _grey_square(dtype, top):
    """A 64x64 greyscale picture: white (`top`) background, a dark square in the middle."""
    values = np.full((64, 64), top, dtype)
    values[20:44, 24:40] = top * 0.2
    return values


def test_high_bit_depth_greyscale_reads_as_its_8_bit_picture():
    eight = preprocess_image(Image.fromarray(_grey_square(np.uint8, 255)), 32)
    sixteen = preprocess_image(Image.fromarray(_grey_square(np.uint16, 65535)), 32)  # mode I;16 (PIL clipped it to white)
    floats = preprocess_image(Image.fromarray(_grey_square(np.float32, 1.0)), 32)  # mode F in [0, 1]
    assert torch.allclose(sixteen, eight, atol=1 / 255) and torch.allclose(floats, eight, atol=1 / 255)
    assert eight[:, 16, 16].max() < 0.3 and eight[:, 0, 0].min() == 1.0  # the square in the middle, white around


def test_unreadable_images_say_why(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match="the file is empty"):
        load_image(tmp_path / "empty.png")
    Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:60])
    with pytest.raises(InputError, match="truncated or corrupt"):
        load_image(tmp_path / "cut.png")
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(InputError, match="not an image format"):
        load_image(tmp_path / "text.png")
    with pytest.raises(InputError, match="1x1 px: at least 8 px"):
        load_image(np.zeros((1, 1, 3), np.uint8))


@pytest.mark.parametrize("args, message", [
    (["--output", "{tmp}/out.obj"], "--output must be a .glb file"),
    (["--output", "{tmp}/folder.glb"], "is a folder"),
    (["--guidance", "nan"], "--guidance must be a finite number"),
    (["--resolution", "100000"], "--resolution must be between 16 and 1024"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_generate_options_are_checked_before_loading(tmp_path, args, message):
    (tmp_path / "folder.glb").mkdir()
    args = [a.format(tmp=tmp_path) for a in args]
    res = CliRunner().invoke(app, ["generate", str(EXAMPLES / "chair.png"), "--model", str(tmp_path / "nowhere")] + args)
    assert isinstance(res.exception, ConfigError) and message in str(res.exception)
    res = CliRunner().invoke(app, ["generate-scene", str(EXAMPLES / "scene4.png"), "--masks", str(EXAMPLES / "scene4_masks.png"),
                                   "--model", str(tmp_path / "nowhere")] + args)
    assert isinstance(res.exception, ConfigError) and message in str(res.exception)


def _copy_model(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, folder)
    return folder


def test_corrupt_pipeline_folders_are_one_line_checkpoint_errors(tmp_path):
    folder = _copy_model(tmp_path)
    config = folder / "transformer" / "config.json"
    good = config.read_text()
    config.write_text(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="cannot load the transformer") as err:
        MoCAPipeline.from_pretrained(folder)
    assert "\n" not in str(err.value)
    wide = json.loads(good) | {"width": 2 * json.loads(good)["width"]}  # weights of the wrong shape
    config.write_text(json.dumps(wide))
    with pytest.raises(CheckpointError, match="cannot load the transformer"):
        MoCAPipeline.from_pretrained(folder)
    config.write_text(good)
    weights = next((folder / "vae").glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot load the vae"):
        MoCAPipeline.from_pretrained(folder)
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"no weights \(\*\.safetensors\)"):
        MoCAPipeline.from_pretrained(folder)
    (folder / "model_index.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="model_index.json: corrupt JSON"):
        MoCAPipeline.from_pretrained(folder)


def test_nan_in_shipped_weights_is_named(tmp_path):
    folder = _copy_model(tmp_path)
    path = next((folder / "transformer").glob("*.safetensors"))
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone().fill_(float("nan"))
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="NaN"):
        MoCAPipeline.from_pretrained(folder)


def test_object_generation_with_a_scene_model_asks_for_masks():
    pipe = MoCAPipeline.from_pretrained(DEFAULT_SCENE_MODEL_DIR)
    with pytest.raises(InputError, match="this is a scene model"):
        pipe(EXAMPLES / "chair.png", num_parts=2, steps=1, show_progress=False)


def test_failed_glb_write_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "taken"
    target.mkdir()  # os.replace cannot put a file over a folder
    (target / "keep").write_text("x")
    with pytest.raises(OSError):
        save_glb(target, [trimesh.creation.box()])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_prepare_with_nothing_to_prepare_fails(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "notes.txt").write_text("no meshes here")
    res = CliRunner().invoke(app, ["prepare", str(src), "--out", str(tmp_path / "ds")])
    assert isinstance(res.exception, InputError) and "no mesh files" in str(res.exception)
    assert not (tmp_path / "ds").exists()
    (src / "empty.obj").write_text("")
    res = CliRunner().invoke(app, ["prepare", str(src), "--out", str(tmp_path / "ds")])
    assert isinstance(res.exception, InputError) and "no asset could be prepared: all 1 skipped" in str(res.exception)


def test_broken_manifests_and_empty_splits_are_named(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "manifest.jsonl").write_text('{"id": "a", "split": "test", "num_components": 2}\n{"id": "b", "spl\n')
    res = CliRunner().invoke(app, ["evaluate-model", str(root), "--model", str(DEFAULT_MODEL_DIR)])
    assert isinstance(res.exception, InputError) and "line 2 is not valid JSON" in str(res.exception)
    (root / "manifest.jsonl").write_text('{"id": "a", "split": "train", "num_components": 2}\n')
    res = CliRunner().invoke(app, ["evaluate-model", str(root), "--model", str(DEFAULT_MODEL_DIR), "--json", str(tmp_path / "m.json")])
    assert isinstance(res.exception, InputError) and "no assets in the 'test' split with 1-32 components" in str(res.exception)
    assert not (tmp_path / "m.json").exists()
    res = CliRunner().invoke(app, ["evaluate-scenes", str(root), "--split", "train", "--device", "cpu"])
    assert isinstance(res.exception, InputError) and "no scenes in the 'train' split" in str(res.exception)


def test_render_names_bad_paths(tmp_path):
    save_glb(tmp_path / "box.glb", [trimesh.creation.box()])
    res = CliRunner().invoke(app, ["render", str(tmp_path / "box.glb"), "-o", str(tmp_path / "preview.glb")])
    assert isinstance(res.exception, InputError) and "--output must be a .png file" in str(res.exception)
    (tmp_path / "empty.glb").write_bytes(b"")
    res = CliRunner().invoke(app, ["render", str(tmp_path / "empty.glb"), "-o", str(tmp_path / "p.png")])
    assert isinstance(res.exception, InputError) and "the file is empty" in str(res.exception)
    res = CliRunner().invoke(app, ["render", str(tmp_path / "missing.glb"), "-o", str(tmp_path / "p.png")])
    assert isinstance(res.exception, InputError) and "mesh file not found" in str(res.exception)
    assert not (tmp_path / "p.png").exists()
