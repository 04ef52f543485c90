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
from moca3d.commands.common import write_json
from moca3d.data.images import load_image, preprocess_image
from moca3d.defaults import check_resolution
from moca3d.errors import CheckpointError, ConfigError, InputError, InputWarning
from moca3d.geometry.mesh_io import save_glb
from moca3d.pipeline import DEFAULT_MODEL_DIR, DEFAULT_SCENE_MODEL_DIR, MoCAOutput, MoCAPipeline

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
    from moca3d.data.scene import load_masks

    with pytest.raises(InputError, match="^cannot read label map .*empty.png: the file is empty$"):  # it said: not an image format
        load_masks(tmp_path / "empty.png")
    Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:60])
    with pytest.raises(InputError, match="truncated or corrupt"):
        load_image(tmp_path / "cut.png")
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(InputError, match="not an image format"):
        load_image(tmp_path / "text.png")
    with pytest.raises(InputError, match="1x1 px: at least 8 px"):
        load_image(np.zeros((1, 1, 3), np.uint8))


def test_images_as_bytes_or_file_objects_load_like_their_files_and_urls_are_refused(tmp_path):
    """bytes and io.BytesIO (an upload) were 'unsupported image type'; a URL was 'image not found: https:/...' (one slash)."""
    import io

    data = (EXAMPLES / "chair.png").read_bytes()
    expected = np.asarray(load_image(EXAMPLES / "chair.png"))
    with open(EXAMPLES / "chair.png", "rb") as handle:
        for given in (data, bytearray(data), io.BytesIO(data), handle):
            assert np.array_equal(np.asarray(load_image(given)), expected), type(given).__name__
    with pytest.raises(InputError, match="^cannot read image <bytes>: not an image format"):
        load_image(b"hello")
    with pytest.raises(InputError, match="^https://example.com/a.png: moca3d reads local files only"):
        load_image("https://example.com/a.png")
    with pytest.raises(InputError, match="^image not found: C:"):  # a drive letter is no URL scheme
        load_image("C://pictures/a.png")


@pytest.mark.parametrize("args, message", [
    (["--output", "{tmp}/out.ply"], "--output must be a .glb file (one named node per component) or .obj"),
    (["--output", "{tmp}/folder.glb"], "is a folder"),
    (["--guidance", "nan"], "--guidance must be a finite number"),
    (["--resolution", "100000"], "--resolution must be 16, 32 or a multiple of 4 from 64 to 1024, got 100000"),
    (["--resolution", "48"], "--resolution must be 16, 32 or a multiple of 4 from 64 to 1024, got 48"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--guidance", "-5"], "--guidance must be >= 0 (1 = no guidance), got -5.0"),
    (["--output", "{tmp}/file.glb/out.glb"], "file.glb is a file, not a folder"),
    (["--device", "mps"], "device 'mps' requested but MPS (Apple GPU) is not available"),
    (["--seed", "99999999999999999999999"], "--seed must be a whole number from 0 to 2^63 - 1"),
    (["--seed", "-1"], "--seed must be a whole number from 0 to 2^63 - 1, got -1"),
])
def test_generate_options_are_checked_before_loading(tmp_path, monkeypatch, args, message):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    (tmp_path / "folder.glb").mkdir()
    (tmp_path / "file.glb").write_text("not a folder")
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
    with pytest.raises(CheckpointError, match="cannot load the transformer .*expected shape") as err:
        MoCAPipeline.from_pretrained(folder)
    assert "ignore_mismatched_sizes" not in str(err.value)  # advice a CLI user cannot follow
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
    for index in ("[]", "null"):
        (folder / "model_index.json").write_text(index)
        with pytest.raises(CheckpointError, match="model_index.json: not a pipeline index"):
            MoCAPipeline.from_pretrained(folder)


def test_weights_that_overflow_into_nan_latents_are_named(tmp_path):
    """Finite weights whose activations overflow give NaN latents: a CheckpointError, not "all parts decoded empty"."""
    folder = _copy_model(tmp_path)
    path = next((folder / "transformer").glob("*.safetensors"))
    tensors = load_file(path)
    tensors = {k: v.clone().fill_(6e4) if v.is_floating_point() else v for k, v in tensors.items()}  # fp16's edge
    save_file(tensors, path)
    pipe = MoCAPipeline.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="the model sampled NaN or Inf latents"):
        pipe(EXAMPLES / "chair.png", num_parts=2, steps=2, resolution=16, show_progress=False)


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
    target = tmp_path / "taken.glb"
    target.mkdir()  # os.replace cannot put a file over a folder
    (target / "keep").write_text("x")
    with pytest.raises(InputError, match="cannot write .*taken.glb: Is a directory"):
        save_glb(target, [trimesh.creation.box()])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.glb"]
    output = MoCAOutput([trimesh.creation.box()], ["part_00"], torch.zeros(1, 1, 1), kind="part")
    with pytest.raises(InputError, match="cannot write .*: Is a directory"):
        output.save(target)
    with pytest.raises(InputError, match="cannot write .*: File exists"):  # a parent that is a file
        output.save(target / "keep" / "x.glb")
    with pytest.raises(ConfigError, match="keep is a file, not a folder"):  # named by the --json writer before it writes
        write_json(target / "keep" / "m.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.glb"]


class _EmptyPipeline:
    """Stands in for a loaded pipeline whose every component decodes empty."""

    def __call__(self, image, num_parts=4, **kwargs):
        return MoCAOutput([trimesh.Trimesh() for _ in range(num_parts)], [f"part_{i:02d}" for i in range(num_parts)],
                          torch.zeros(num_parts, 1, 1), kind="part")

    def generate_scene(self, image, masks, **kwargs):
        return MoCAOutput([trimesh.Trimesh()] * 4, [f"instance_{i:02d}" for i in range(4)], torch.zeros(4, 1, 1), kind="instance")


@pytest.mark.parametrize("verb, message", [
    (["generate", str(EXAMPLES / "chair.png"), "--parts", "2"], "all 2 parts decoded empty: nothing to write (try more steps or another seed)"),
    (["generate-scene", str(EXAMPLES / "scene4.png"), "--masks", str(EXAMPLES / "scene4_masks.png")], "all 4 instances decoded empty: nothing to write"),
])
def test_all_empty_generation_writes_no_file(tmp_path, monkeypatch, verb, message):
    monkeypatch.setattr(MoCAPipeline, "from_pretrained", classmethod(lambda cls, *args, **kwargs: _EmptyPipeline()))
    res = CliRunner().invoke(app, verb + ["--model", str(tmp_path), "--device", "cpu", "-o", str(tmp_path / "out.glb")])
    assert isinstance(res.exception, InputError) and message in str(res.exception)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("verb", ["evaluate-model", "evaluate-scenes"])
@pytest.mark.parametrize("args, error, message", [
    (["--steps", "0"], ConfigError, "--steps must be >= 1"),
    (["--guidance", "nan"], ConfigError, "--guidance must be a finite number"),
    (["--guidance", "-1"], ConfigError, "--guidance must be >= 0"),
    (["--resolution", "48"], ConfigError, "--resolution must be 16, 32 or a multiple of 4 from 64 to 1024, got 48"),
    (["--shift", "nan"], InputError, "the timestep shift must be positive and finite, got nan"),
    (["--json", "{tmp}"], ConfigError, "is a folder: give a file path"),
])
def test_evaluate_options_are_checked_before_loading(tmp_path, verb, args, error, message):
    args = [a.format(tmp=tmp_path) for a in args]
    res = CliRunner().invoke(app, [verb, str(tmp_path / "data"), "--model", str(tmp_path / "nowhere")] + args)
    assert isinstance(res.exception, error) and message in str(res.exception)


@pytest.mark.parametrize("verb", [["generate", str(EXAMPLES / "chair.png")],
                                  ["generate-scene", str(EXAMPLES / "scene4.png"), "--masks", str(EXAMPLES / "scene4_masks.png")]])
@pytest.mark.parametrize("shift", ["nan", "0", "-1"])
def test_generation_shift_is_checked_before_loading(tmp_path, monkeypatch, verb, shift):
    _never_load(monkeypatch)
    res = CliRunner().invoke(app, verb + ["--shift", shift, "--device", "cpu", "-o", str(tmp_path / "out.glb")])
    assert isinstance(res.exception, InputError) and "the timestep shift must be positive and finite" in str(res.exception)


def _never_load(monkeypatch):
    """Make loading a pipeline fail the test: what is checked must be checked before the (slow) model loading."""
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the options and inputs were checked")

    monkeypatch.setattr(MoCAPipeline, "from_pretrained", classmethod(never))


def test_bad_images_masks_and_part_counts_are_refused_before_the_model_loads(tmp_path, monkeypatch):
    """The image and masks are read, and the part limit taken from the model folder's transformer/config.json, first."""
    _never_load(monkeypatch)
    own = tmp_path / "own"  # a pipeline folder whose limit is 3 components: only its config is read
    (own / "transformer").mkdir(parents=True)
    (own / "transformer" / "config.json").write_text(json.dumps({"id_codebook_size": 3}))
    Image.fromarray(np.ones((10, 10), np.uint8)).save(tmp_path / "small.png")
    many = np.zeros((256, 256), np.uint8)
    many[:60] = np.arange(1, 61)[:, None]  # 60 instances, one row each
    Image.fromarray(many).save(tmp_path / "many.png")
    Image.open(EXAMPLES / "scene4_masks.png").save(tmp_path / "labels.jpg", quality=95)
    (tmp_path / "no_masks").mkdir()
    Image.new("RGB", (256, 256), (255, 255, 255)).save(tmp_path / "blank.png")
    chair, scene = ["generate", str(EXAMPLES / "chair.png")], ["generate-scene", str(EXAMPLES / "scene4.png"), "--masks"]
    cases = [
        (["generate", str(tmp_path / "nonexistent.png")], InputError, "image not found"),
        (chair + ["--parts", "1000"], InputError, "--parts: 1000 parts exceed the model's limit of 50"),
        (chair + ["--parts", "4", "--model", str(own)], InputError, "--parts: 4 parts exceed the model's limit of 3"),
        (["generate-scene", str(tmp_path / "nonexistent.png"), "--masks", str(EXAMPLES / "scene4_masks.png")], InputError,
         "image not found"),
        (scene + [str(tmp_path / "small.png")], InputError, "the masks are 10x10 but the image is 256x256"),
        (scene + [str(tmp_path / "many.png")], InputError, "60 masks exceed the model's limit of 50 instances"),
        (scene + [str(EXAMPLES / "scene4_masks.png"), "--model", str(own)], InputError, "4 masks exceed the model's limit of 3"),
        (scene + [str(tmp_path / "labels.jpg")], InputError, "is a JPEG: lossy compression invents ids"),
        (scene + [str(tmp_path / "no_masks")], InputError, "holds no images"),
        (scene + [str(tmp_path / "missing.png")], InputError, "masks not found"),
        (["generate", str(tmp_path / "blank.png")], InputError, "the image has no foreground"),
        (["generate-scene", str(tmp_path / "blank.png"), "--masks", str(EXAMPLES / "scene4_masks.png")], InputError,
         "the image is blank (all white or transparent) inside the box of its masks"),
    ]
    for args, error, message in cases:
        res = CliRunner().invoke(app, args + ["--device", "cpu", "-o", str(tmp_path / "out.glb")])
        assert isinstance(res.exception, error) and message in str(res.exception), (args, res.exception)


@pytest.mark.parametrize("count", ["0", "-1"])
def test_evaluate_count_below_one_is_refused(tmp_path, count):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "manifest.jsonl").write_text('{"id": "a", "split": "test", "num_components": 2}\n')
    res = CliRunner().invoke(app, ["evaluate-model", str(root), "--model", str(DEFAULT_MODEL_DIR), "--count", count, "--device", "cpu"])
    assert isinstance(res.exception, ConfigError) and f"--count must be >= 1 (the number of assets to evaluate), got {count}" in str(res.exception)


@pytest.mark.parametrize("resolution", [16, 32, 64, 96, 100, 1024, 8, 48, 66, 1028, 2048])
def test_resolution_rule_accepts_only_grids_the_extraction_reaches(resolution):
    """What check_resolution accepts, the pipeline's coarse grid (16 cells or more) reaches by doublings; the rest is
    refused with the rule (every accepted resolution: tests/test_geometry.py)."""
    if resolution in (16, 32) or (64 <= resolution <= 1024 and resolution % 4 == 0):
        check_resolution(resolution)
        config = MoCAPipeline.extract_config(resolution)
        ratio = config.resolution / config.coarse_resolution
        assert config.coarse_resolution >= 16 and ratio == int(ratio) and int(ratio) & (int(ratio) - 1) == 0
    else:
        with pytest.raises(ConfigError, match=f"--resolution must be 16, 32 or a multiple of 4 from 64 to 1024, got {resolution}"):
            check_resolution(resolution)


@pytest.fixture(scope="module")
def default_pipeline():
    return MoCAPipeline.from_pretrained(DEFAULT_MODEL_DIR)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(steps=0), ConfigError, "^steps must be >= 1"),
    (dict(steps=-1), ConfigError, "^steps must be >= 1"),
    (dict(steps=2.5), ConfigError, "^steps must be >= 1 \\(a whole number\\)"),
    (dict(guidance=float("nan")), ConfigError, "^guidance must be a finite number"),
    (dict(guidance=-5.0), ConfigError, "^guidance must be >= 0"),
    (dict(resolution=48), ConfigError, "^resolution must be 16, 32 or a multiple of 4 from 64 to 1024, got 48"),
    (dict(num_parts=2.5), InputError, "the number of parts must be a whole number >= 1, got 2.5"),
    (dict(num_parts="3"), InputError, "the number of parts must be a whole number >= 1, got '3'"),  # a raw TypeError
    (dict(num_parts=999), InputError, "999 parts exceed the model's limit of"),
    (dict(shift=0.0), InputError, "the timestep shift must be positive and finite"),
    (dict(shift=float("inf")), InputError, "the timestep shift must be positive and finite"),
    (dict(seed=2**64), ConfigError, "^seed must be a whole number from 0 to 2\\^63 - 1"),
])
def test_pipeline_call_checks_its_arguments(default_pipeline, kwargs, error, message):
    with pytest.raises(error, match=message):
        default_pipeline(EXAMPLES / "chair.png", **{"num_parts": 2, "steps": 1, "resolution": 16, "show_progress": False, **kwargs})


def test_scene_generation_checks_its_arguments():
    pipe = MoCAPipeline.from_pretrained(DEFAULT_SCENE_MODEL_DIR)
    with pytest.raises(ConfigError, match="^guidance must be a finite number"):
        pipe.generate_scene(EXAMPLES / "scene4.png", EXAMPLES / "scene4_masks.png", steps=1, guidance=float("nan"), show_progress=False)


@pytest.mark.parametrize("shift", ["0", "NaN", "-2"])
def test_a_scheduler_with_a_bad_shift_is_a_checkpoint_error(tmp_path, shift):
    folder = _copy_model(tmp_path)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace('"shift": 1.0', f'"shift": {shift}'))
    assert f'"shift": {shift}' in config.read_text()
    with pytest.raises(CheckpointError, match="cannot load the scheduler \\(the timestep shift must be positive and finite"):
        MoCAPipeline.from_pretrained(folder)


def test_image_arrays_are_scaled_to_8_bit_or_refused():
    eight = np.asarray(load_image(_grey_square(np.uint8, 255)[..., None].repeat(3, axis=2)))
    floats = _grey_square(np.float32, 1.0)[..., None].repeat(3, axis=2)
    assert np.array_equal(np.asarray(load_image(floats)), eight)
    assert np.array_equal(np.asarray(load_image(_grey_square(np.uint16, 65535)[..., None].repeat(3, axis=2))), eight)
    for bad in (floats * 255, np.full((16, 16, 3), np.nan, np.float32)):
        with pytest.raises(InputError, match=r"a float image array must hold finite values in \[0, 1\]"):
            load_image(bad)
    with pytest.raises(InputError, match="image array must be uint8, uint16 or float in \\[0, 1\\], got int64"):
        load_image(np.zeros((16, 16, 3), np.int64))


def test_os_errors_are_one_line(monkeypatch, capsys):
    from moca3d import cli

    def refuse(**kwargs):
        raise PermissionError(13, "Permission denied", "/root/x.glb")

    monkeypatch.setattr(cli, "app", refuse)
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2 and capsys.readouterr().err.strip() == "error: Permission denied: /root/x.glb"


@pytest.mark.parametrize("error, shown", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:119] data. DefaultCPUAllocator: can't allocate memory: you tried to "
                  "allocate 40000000000 bytes. Error code 12 (Cannot allocate memory)"), "DefaultCPUAllocator: can't allocate"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB.\nmore lines"), "CUDA out of memory. Tried to allocate 20.00 GiB."),
    (MemoryError(), "MemoryError"),
])
def test_out_of_memory_is_one_line(monkeypatch, capsys, error, shown):
    from moca3d import cli

    def fail(**kwargs):
        raise error

    monkeypatch.setattr(cli, "app", fail)
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: out of memory (")
    assert shown in err and err.endswith("lower the batch size, resolution or point count")


def test_other_runtime_errors_still_raise(monkeypatch):
    from moca3d import cli

    def fail(**kwargs):
        raise RuntimeError("a bug, not bad input")

    monkeypatch.setattr(cli, "app", fail)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main()


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
    assert isinstance(res.exception, InputError) and "missing.glb: no such file or folder" in str(res.exception)
    assert not (tmp_path / "p.png").exists()


def test_a_phone_photo_is_read_upright(tmp_path):
    """A JPEG whose EXIF says "rotate 90" reads as the upright picture a viewer shows."""
    upright = np.full((40, 60, 3), 255, np.uint8)
    upright[5:15, 10:50] = (200, 30, 30)  # a wide red bar near the top
    stored = Image.fromarray(np.rot90(upright, 1).copy())  # the pixels as the camera stored them
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    stored.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    read = np.asarray(load_image(tmp_path / "photo.jpg").convert("RGB")).astype(int)
    assert read.shape == upright.shape and np.abs(read - upright).mean() < 8


def test_render_and_glb_writes_fail_whole(tmp_path, monkeypatch):
    """A failed PNG write keeps the earlier picture; all-empty or mismatched components are refused in one line."""
    save_glb(tmp_path / "box.glb", [trimesh.creation.box()])
    (tmp_path / "p.png").write_bytes(b"the earlier picture")

    def full_disk(self, data):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Path, "write_bytes", full_disk)
    res = CliRunner().invoke(app, ["render", str(tmp_path / "box.glb"), "-o", str(tmp_path / "p.png"), "--size", "32"])
    monkeypatch.undo()
    assert isinstance(res.exception, InputError) and "No space left on device" in str(res.exception)
    assert (tmp_path / "p.png").read_bytes() == b"the earlier picture" and len(list(tmp_path.iterdir())) == 2
    empty = trimesh.Trimesh()
    with pytest.raises(InputError, match="all 2 components are empty"):
        save_glb(tmp_path / "e.glb", [empty, empty])
    with pytest.raises(InputError, match="2 components need as many names and colours, got 2 and 1"):
        save_glb(tmp_path / "e.glb", [trimesh.creation.box()] * 2, colors=np.zeros((1, 4)))


def test_demo_and_generate_options_out_of_range_are_one_line(tmp_path):
    res = CliRunner().invoke(app, ["demo", "--port", "99999"])
    assert isinstance(res.exception, ConfigError) and "--port must be from 1 to 65535, got 99999" in str(res.exception)
    res = CliRunner().invoke(app, ["demo", "--resolution", "50"])
    assert isinstance(res.exception, ConfigError) and "--resolution must be 16, 32 or a multiple of 4" in str(res.exception)
    res = CliRunner().invoke(app, ["generate", str(EXAMPLES / "chair.png"), "--parts", "0", "--model", str(tmp_path / "nowhere")])
    assert isinstance(res.exception, InputError) and "--parts must be a whole number >= 1, got 0" in str(res.exception)


def test_one_pipeline_samples_from_threads(default_pipeline):
    """Each sampling call has its own scheduler: concurrent calls give what one call alone gives."""
    from concurrent.futures import ThreadPoolExecutor

    cond = default_pipeline.encode_image(EXAMPLES / "chair.png")
    alone = default_pipeline.generate_latents(cond, 2, steps=3, seed=4)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: default_pipeline.generate_latents(cond, 2, steps=3, seed=4), range(4)))
    for latents in results:
        torch.testing.assert_close(latents, alone, rtol=0, atol=0)


@pytest.mark.parametrize("verb", [["prepare", "--procedural", "objects", "--count", "1"], ["train-vae", "{tmp}"],
                                  ["train", "{tmp}", "--vae", "{tmp}"], ["pretrain-encoder", "{tmp}"]])
def test_a_run_folder_that_is_a_file_is_one_line(tmp_path, verb):
    (tmp_path / "taken").write_text("a file")
    res = CliRunner().invoke(app, [a.format(tmp=tmp_path) for a in verb] + ["--output", str(tmp_path / "taken" / "run")])
    assert isinstance(res.exception, ConfigError) and f"{tmp_path / 'taken'} is a file, not a folder" in str(res.exception)


def test_reports_are_standard_json_and_broken_data_files_are_named(tmp_path):
    from moca3d.data.dataset import load_cached_latents
    from moca3d.training.checkpoints import atomic_write_json
    from moca3d.data.dataset import load_samples

    atomic_write_json({"chamfer": float("inf"), "rows": [float("nan"), 1.5]}, tmp_path / "report.json")
    text = (tmp_path / "report.json").read_text()
    assert json.loads(text) == {"chamfer": None, "rows": [None, 1.5]} and "Infinity" not in text and "NaN" not in text
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o644
    (tmp_path / "latents.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage")
    with pytest.raises(InputError, match="unreadable cached latents .*encode-dataset --overwrite"):
        load_cached_latents(tmp_path / "latents.safetensors")
    asset = tmp_path / "assets" / "a"
    asset.mkdir(parents=True)
    np.savez(asset / "samples.npz", surface=np.zeros((1, 4, 6)), query_points=np.zeros((1, 4, 3)), query_sdf=np.zeros((1, 4)))
    (asset / "samples.npz").write_bytes((asset / "samples.npz").read_bytes()[:50])  # an interrupted copy
    with pytest.raises(InputError, match="samples.npz: unreadable samples"):
        load_samples(tmp_path, "a")


def test_an_image_on_a_coloured_background_warns_once_in_one_line(tmp_path, capsys):
    """No alpha and a mostly non-white border: the background would be read as part of the object. It is used, with
    an InputWarning (the CLI prints it as one yellow line); white, transparent and edge-touching objects are not warned."""
    import warnings

    from PIL import Image

    from moca3d.cli import show_warning
    from moca3d.errors import InputWarning
    from moca3d.data.images import BACKGROUND_WARNING, preprocess_image

    def picture(background, mode="RGB", box=(24, 24, 40, 40)):
        image = Image.new(mode, (64, 64), background)
        image.paste((200, 30, 30, 255)[: len(mode)], box)
        return image

    with pytest.warns(InputWarning, match="most of its border is not white"):
        preprocess_image(picture((40, 90, 200)), 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these warns
        preprocess_image(picture((255, 255, 255)), 32)
        preprocess_image(picture((40, 90, 200, 0), "RGBA"), 32)  # a coloured but transparent background
        preprocess_image(picture((255, 255, 255), box=(24, 0, 40, 64)), 32)  # an object cut by the frame on two sides
        noisy = np.asarray(picture((255, 255, 255))).astype(int) - np.random.default_rng(0).integers(0, 10, (64, 64, 3))
        preprocess_image(Image.fromarray(noisy.clip(0, 255).astype(np.uint8)), 32)  # JPEG-like noise on white
    show_warning(InputWarning(BACKGROUND_WARNING), InputWarning, "x.py", 1)
    err = capsys.readouterr().err
    assert err == f"warning: {BACKGROUND_WARNING}\n"


def test_offload_on_the_cpu_is_warned_about(tmp_path):
    """--offload on a CPU-only machine was accepted silently: it keeps weights in RAM for a GPU run."""
    from moca3d.errors import InputWarning

    with pytest.warns(InputWarning, match="--offload .* on the CPU it changes nothing"):
        res = CliRunner().invoke(app, ["generate", str(EXAMPLES / "chair.png"), "--offload", "--device", "cpu", "--model",
                                       str(tmp_path / "nowhere")])
    assert isinstance(res.exception, CheckpointError)  # then the (missing) model: nothing else changed


def test_a_run_or_pipeline_folder_given_whole_points_to_its_model(object_pipeline, tmp_path):
    """`generate --model runs/dit` (the run) and `eval-vae --model runs/dit/pipeline` only said what was missing."""
    import shutil

    from moca3d.pipeline import MoCAPipeline
    from moca3d.training.train_vae import load_vae_folder

    run = tmp_path / "run"
    shutil.copytree(object_pipeline, run / "pipeline")
    with pytest.raises(CheckpointError, match=f"model_index.json missing .a training run: its pipeline is {run / 'pipeline'}"):
        MoCAPipeline.from_pretrained(run)
    for folder in (run / "pipeline", run):
        with pytest.raises(InputError, match=f"not a VAE folder, config.json missing .its VAE is {run / 'pipeline' / 'vae'}"):
            load_vae_folder(folder)
    from moca3d.defaults import ADAPTER_CONFIG

    (tmp_path / "lora").mkdir()  # an adapter folder given as the model
    (tmp_path / "lora" / ADAPTER_CONFIG).write_text("{}")
    with pytest.raises(CheckpointError, match="model_index.json missing .a LoRA adapter: give it as the adapter, --lora or lora="):
        MoCAPipeline.from_pretrained(tmp_path / "lora")


@pytest.mark.parametrize("args", [["generate", "nope.png"], ["generate-scene", "nope.png", "--masks", "nope_masks.png"]])
def test_a_missing_image_is_reported_before_the_model_libraries_load(args):
    """`moca3d generate nope.png` took 10 s to say "image not found": checking the image imported diffusers (7 s)."""
    import subprocess
    import sys

    code = ("import sys; from typer.testing import CliRunner; from moca3d.cli import app; "
            f"r = CliRunner().invoke(app, {args!r}); print(type(r.exception).__name__, 'diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["InputError", "False"]


def test_prepare_refuses_no_workers(tmp_path):
    res = CliRunner().invoke(app, ["prepare", "--procedural", "objects", "--count", "1", "-o", str(tmp_path / "d"), "--workers", "0"])
    assert isinstance(res.exception, ConfigError) and "--workers must be >= 1" in str(res.exception)
    assert not (tmp_path / "d").exists()


def test_generate_folders_take_every_image_format_and_name_what_they_leave_out(tmp_path):
    """A folder's BMP, GIF and TIFF images were silently left out (a single one was generated); what is not an image is
    now named; half precision on the CPU is warned about; an unwritable --output is refused before the model loads."""
    images = tmp_path / "in"
    images.mkdir()
    picture = Image.open(EXAMPLES / "chair.png").convert("RGB")
    for name in ("a.bmp", "b.gif", "c.tiff"):
        picture.save(images / name)
    (images / "notes.txt").write_text("not an image")
    (images / "sub").mkdir()
    args = ["generate", str(images), "--parts", "2", "--steps", "1", "--resolution", "16", "-o", str(tmp_path / "out")]
    with pytest.warns(InputWarning, match=r"bfloat16 on the CPU is slower than float32 .*keep float32 on a CPU \(--dtype auto\)"):
        res = CliRunner().invoke(app, args + ["--dtype", "bf16", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "left out, not images" in res.stderr and "notes.txt, sub/" in res.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.glb", "b.glb", "c.glb"]
    single = ["generate", str(EXAMPLES / "chair.png"), "--steps", "1"]
    (tmp_path / "chair.mtl").mkdir()  # where an OBJ's materials would go
    for output, message in ((tmp_path / "out", "is a folder: give a file path"),  # was: "must be a .glb file"
                            (tmp_path / "chair.obj", "chair.mtl, which is a folder"),  # found after the generation, the .obj replaced
                            (Path("/proc/x.glb"), "cannot write in /proc")):  # was refused only after the generation
        res = CliRunner().invoke(app, single + ["-o", str(output)])
        assert isinstance(res.exception, ConfigError) and message in str(res.exception), res.output


def test_an_existing_output_folder_that_takes_no_file_is_refused_up_front():
    """`train -o` an existing read-only folder failed after the data and model had loaded."""
    from moca3d.commands.common import check_run_folder

    with pytest.raises(ConfigError, match="cannot write in /proc"):
        check_run_folder(Path("/proc"))  # a virtual file system: no file can be made there, even by root
