"""The web demo (`moca3d demo`): upload checks, the part limit, and an object and a scene generation clicked through in
headless Chromium."""

import json
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no network calls

import socket
import threading
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import gradio as gr
import numpy as np
from gradio.data_classes import ImageData
import pytest
import torch
import trimesh
from PIL import Image
from typer.testing import CliRunner

from moca3d import app as demo_app
from moca3d.errors import ConfigError, InputError
from moca3d.models.image_encoder import widen_input_channels
from moca3d.models.vae import VecSetVAE
from moca3d.pipeline import MoCAPipeline
from moca3d.training.train_dit import DiTTrainConfig, build_models, export_pipeline

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package, installed by scripts/setup.sh
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # the browser's own services resolve no host either
]
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXAMPLE = EXAMPLES / "chair.png"
SCENE, SCENE_MASKS, SCENE_INSTANCES = EXAMPLES / "scene4.png", EXAMPLES / "scene4_masks.png", 4
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
MAX_PARTS = 8  # the tiny model's ID codebook: its part limit
PARTS = 3
STEPS = 2
RESOLUTION = 16
PAGE_TIMEOUT_MS = 30_000
GENERATION_TIMEOUT_MS = 60_000
LAUNCH_TIMEOUT_S = 60
BROWSER_FACES = 20 * PARTS  # the Max triangles set in the browser: the least the parts may share
TINY_VAE = dict(num_latents=16, latent_channels=4, width_encoder=32, width_decoder=32, num_attention_heads=4, num_layers_encoder=1, num_layers_decoder=1, embed_frequency=4)
TINY_RECIPE = dict(
    transformer=dict(width=32, num_layers=2, num_heads=4, compression=4, id_codebook_size=MAX_PARTS),
    image_encoder=dict(image_size=32, patch_size=8, width=32, num_layers=1, num_heads=4),
)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A real pipeline folder of tiny untrained models, written by the export step of `moca3d train`."""
    root = tmp_path_factory.mktemp("tiny_model")
    torch.manual_seed(0)
    VecSetVAE(**TINY_VAE).save_pretrained(root / "vae")
    model = build_models(DiTTrainConfig.from_dict(TINY_RECIPE), (TINY_VAE["num_latents"], TINY_VAE["latent_channels"]))
    return export_pipeline(root / "pipeline", model, root / "vae")


@pytest.fixture(scope="module")
def scene_pipeline_dir(tmp_path_factory):
    """A tiny untrained scene pipeline: the object models with the encoder widened to 7 channels."""
    root = tmp_path_factory.mktemp("tiny_scene_model")
    torch.manual_seed(1)
    VecSetVAE(**TINY_VAE).save_pretrained(root / "vae")
    model = build_models(DiTTrainConfig.from_dict(TINY_RECIPE), (TINY_VAE["num_latents"], TINY_VAE["latent_channels"]))
    model.image_encoder = widen_input_channels(model.image_encoder)
    return export_pipeline(root / "pipeline", model, root / "vae")


@pytest.fixture(scope="module")
def generator(pipeline_dir, scene_pipeline_dir, tmp_path_factory):
    """The demo's event handlers over the tiny pipelines."""
    pipe, scene_pipe = MoCAPipeline.from_pretrained(pipeline_dir), MoCAPipeline.from_pretrained(scene_pipeline_dir)
    return demo_app.DemoGenerator(pipe, resolution=RESOLUTION, output_dir=tmp_path_factory.mktemp("demo_out"), scene_pipeline=scene_pipe)


def _error_of(generator, image, parts=PARTS, seed=0) -> str:
    """The one-line gr.Error message the handler raises for this upload."""
    with pytest.raises(gr.Error) as info:
        generator.generate(image, parts, seed=seed, steps=1)
    message = info.value.message
    assert "\n" not in message and message
    return message


def test_bad_uploads_get_one_line_errors(generator, tmp_path, monkeypatch):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert "not a PNG, JPEG or WebP image" in _error_of(generator, text)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert "empty.png is empty (0 bytes)" in _error_of(generator, empty)  # it said "not a PNG, JPEG or WebP image"
    gif = tmp_path / "anim.gif"
    Image.new("RGB", (8, 8), (200, 0, 0)).save(gif)
    assert "not a PNG, JPEG or WebP image" in _error_of(generator, gif)
    big = tmp_path / "big.png"
    big.write_bytes(EXAMPLE.read_bytes())
    with big.open("r+b") as fh:
        fh.truncate(demo_app.MAX_UPLOAD_BYTES + 1)  # a PNG with trailing bytes past the limit
    assert f"the limit is {demo_app.MAX_UPLOAD_MB} MB" in _error_of(generator, big)
    monkeypatch.setattr(demo_app, "MAX_PIXELS", 100)
    assert "megapixels" in _error_of(generator, EXAMPLE)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL itself refuses to open it: still one line
    assert "is too large: the limit is" in _error_of(generator, EXAMPLE)
    monkeypatch.undo()
    blank = tmp_path / "blank.png"
    Image.new("RGB", (32, 32), (255, 255, 255)).save(blank)
    assert "no foreground" in _error_of(generator, blank)  # the pipeline's own image error, passed through
    assert "upload an image first" in _error_of(generator, None)
    assert f"the number of parts must be a whole number from 1 to {MAX_PARTS}" in _error_of(generator, EXAMPLE, parts=MAX_PARTS + 1)
    assert "the number of parts must be a whole number" in _error_of(generator, EXAMPLE, parts=float("nan"))
    assert "the seed must be a whole number from 0 to" in _error_of(generator, EXAMPLE, seed=None)  # a cleared box


def test_truncated_upload_is_named_without_the_server_folders(generator, tmp_path):
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(EXAMPLE.read_bytes()[: EXAMPLE.stat().st_size // 2])  # a valid header, half the pixels
    message = _error_of(generator, truncated)
    assert message == "cut.png cannot be read: the file is truncated or corrupt"  # not /tmp/gradio/<hash>/cut.png
    labels = tmp_path / "labels.png"
    labels.write_bytes(SCENE_MASKS.read_bytes()[: SCENE_MASKS.stat().st_size // 2])
    assert _scene_error_of(generator, SCENE, labels) == "labels.png cannot be read: the file is truncated or corrupt"


def test_guidance_is_checked_like_the_other_settings(generator):
    for guidance in (None, float("nan"), 1e9, 0.5, "3"):  # cleared, not finite, off the slider's range, not a number
        with pytest.raises(gr.Error, match="the guidance scale must be a number from 1 to 15"):
            generator.generate(EXAMPLE, PARTS, steps=1, guidance=guidance)
    with pytest.raises(gr.Error, match="the guidance scale must be a number"):
        generator.generate_scene(SCENE, SCENE_MASKS, steps=1, guidance=None)


def test_uploads_pil_cannot_open_reach_the_handler(generator, tmp_path, monkeypatch):
    """gr.Image opens every upload with PIL before the handler runs: a text file or a HEIC photo would end there
    with a bare "Error" on the page. image_upload passes it on, and the handler names the problem."""
    upload = demo_app.image_upload(type="filepath", image_mode=None)
    assert upload.get_block_name() == "image"  # a plain gr.Image on the page
    assert not Path(demo_app.__file__).with_suffix(".pyi").exists()  # no gradio stub written into the package
    heic = tmp_path / "photo.heic"
    heic.write_bytes(b"\0\0\0\x18ftypheic" + bytes(64))
    path = upload.preprocess(ImageData(path=str(heic), orig_name=heic.name))
    assert path == str(heic)
    assert "photo.heic is not a PNG, JPEG or WebP image" in _error_of(generator, path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses to open it at all: a decompression bomb
    path = upload.preprocess(ImageData(path=str(EXAMPLE), orig_name=EXAMPLE.name))
    assert path == str(EXAMPLE) and "chair.png is too large" in _error_of(generator, path)
    monkeypatch.undo()
    assert upload.preprocess(ImageData(path=str(EXAMPLE), orig_name=EXAMPLE.name)) == str(EXAMPLE)
    assert upload.preprocess(None) is None


class _Exhausted:
    """A stand-in pipeline whose generation fails as a GPU or CPU running out of memory does (or with `error`)."""

    def __init__(self, pipeline, error):
        self.transformer, self.error = pipeline.transformer, error

    def __call__(self, *args, **kwargs):
        raise self.error


def test_out_of_memory_is_one_line(generator, tmp_path):
    for error in (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                  RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")):
        exhausted = demo_app.DemoGenerator(generator.pipeline, resolution=RESOLUTION, output_dir=tmp_path)
        exhausted.pipeline = _Exhausted(generator.pipeline, error)
        message = _error_of(exhausted, EXAMPLE)
        assert message == f"out of memory: generate fewer parts, or restart the demo with a lower --resolution (now {RESOLUTION})"
    exhausted.pipeline = _Exhausted(generator.pipeline, RuntimeError("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):  # anything else is not dressed up as memory
        exhausted.generate(EXAMPLE, PARTS, steps=1)


def _scene_error_of(generator, image, masks) -> str:
    """The one-line gr.Error message the scene handler raises for these uploads."""
    with pytest.raises(gr.Error) as info:
        generator.generate_scene(image, masks, steps=1)
    message = info.value.message
    assert "\n" not in message and message
    return message


def test_bad_scene_uploads_get_one_line_errors(generator, tmp_path):
    assert "upload a scene image first" in _scene_error_of(generator, None, SCENE_MASKS)
    assert "upload a label map" in _scene_error_of(generator, SCENE, None)
    lossy = tmp_path / "labels.jpg"
    Image.open(SCENE_MASKS).convert("L").save(lossy)
    assert "not a PNG, BMP or TIFF image: one mask file is read as a label map" in _scene_error_of(generator, SCENE, lossy)
    small = tmp_path / "small.png"
    Image.open(SCENE_MASKS).resize((64, 64), Image.NEAREST).save(small)
    assert "the masks are 64x64 but the image is" in _scene_error_of(generator, SCENE, small)
    many = tmp_path / "many.png"
    width, height = Image.open(SCENE).size
    ids = (np.arange(width * height).reshape(height, width) // 7) % (MAX_PARTS + 2)  # MAX_PARTS + 1 instance ids
    Image.fromarray(ids.astype(np.uint8)).save(many)
    assert f"exceed the model's limit of {MAX_PARTS}" in _scene_error_of(generator, SCENE, many)
    objects_only = demo_app.DemoGenerator(generator.pipeline, resolution=RESOLUTION, output_dir=tmp_path)
    assert "--scene-model" in _scene_error_of(objects_only, SCENE, SCENE_MASKS)


def _binary_masks(tmp_path, suffix=".png") -> list:
    """Two 8x8 binary masks (left half, right half) saved as mask_1 and mask_2 with `suffix`."""
    files = []
    for i in (1, 2):
        mask = np.zeros((8, 8), np.uint8)
        mask[:, (i - 1) * 4:i * 4] = 255
        Image.fromarray(mask).save(tmp_path / f"mask_{i}{suffix}")
        files.append(str(tmp_path / f"mask_{i}{suffix}"))
    return files


def test_masks_are_copied_where_links_fail(tmp_path, monkeypatch):
    """On Windows without the symlink privilege os.symlink raises: the binary masks are copied into the folder."""
    files = _binary_masks(tmp_path)

    def refuse(*args, **kwargs):
        raise OSError(1314, "A required privilege is not held by the client")

    monkeypatch.setattr(os, "symlink", refuse)
    folder = demo_app.gather_masks(files, tmp_path / "masks")
    copies = sorted(folder.iterdir())
    assert [p.name for p in copies] == ["mask_1.png", "mask_2.png"]
    assert not any(p.is_symlink() for p in copies)
    assert all(p.read_bytes() == Path(f).read_bytes() for p, f in zip(copies, files))


def test_whole_numbers_refuse_booleans():
    for value in (True, False):  # bool is an int subclass: True would pass as 1
        with pytest.raises(InputError, match=f"the seed must be a whole number from 0 to 9, got {value}"):
            demo_app.whole_number(value, "the seed", 0, 9)
    assert demo_app.whole_number(1, "the seed", 0, 9) == 1 and demo_app.whole_number(2.0, "the seed", 0, 9) == 2


@pytest.mark.parametrize("suffix", [".jpg", ".webp"])
def test_a_single_lossy_mask_says_why_it_is_refused(tmp_path, suffix):
    """One mask file is read as a label map (lossless formats only); lossy binary masks are fine as several files."""
    files = _binary_masks(tmp_path, suffix)
    with pytest.raises(InputError) as info:
        demo_app.gather_masks(files[0], tmp_path / "one")
    message = str(info.value)
    assert message.startswith(f"mask_1{suffix} is not a PNG, BMP or TIFF image: one mask file is read as a label map")
    assert "lossless" in message and "several files, one per instance" in message and "\n" not in message
    assert demo_app.gather_masks(files, tmp_path / "two") == tmp_path / "two"  # as binary masks: accepted
    text = tmp_path / "notes.png"
    text.write_text("not an image")  # not an image at all: no talk of label maps
    with pytest.raises(InputError, match=r"^notes.png is not a PNG, BMP or TIFF image$"):
        demo_app.gather_masks(str(text), tmp_path / "three")


def test_scene_handler_writes_a_glb_with_named_instances(generator, tmp_path):
    viewer, download, summary = generator.generate_scene(SCENE, [SCENE_MASKS], seed=1, steps=STEPS)
    assert viewer == download and Path(download).parent == generator.output_dir
    assert _nodes(download, "instance_") == {f"instance_{i:02d}" for i in range(SCENE_INSTANCES)}
    assert summary.startswith(f"{SCENE_INSTANCES} instances")
    # the same instances as binary masks, one file each (uploaded out of order; read in file-name order): the same scene
    labels = np.asarray(Image.open(SCENE_MASKS))
    files = []
    for i in reversed(range(1, SCENE_INSTANCES + 1)):
        folder = tmp_path / f"upload{i}"  # gradio keeps each upload in its own folder
        folder.mkdir()
        Image.fromarray(((labels == i) * 255).astype(np.uint8)).save(folder / f"mask_{i}.png")
        files.append(str(folder / f"mask_{i}.png"))
    _, binary, _ = generator.generate_scene(SCENE, files, seed=1, steps=STEPS)
    from_labels, from_binary = trimesh.load(download, file_type="glb").dump(), trimesh.load(binary, file_type="glb").dump()
    assert len(from_labels) == len(from_binary) > 0
    for a, b in zip(from_labels, from_binary):
        np.testing.assert_array_equal(a.vertices, b.vertices)
    assert not list(generator.output_dir.glob("masks-*"))  # the per-request folders of links are gone
    twin = tmp_path / "twin"
    twin.mkdir()
    Image.open(files[0]).save(twin / Path(files[1]).name)
    assert "two masks are named mask_3.png" in _scene_error_of(generator, SCENE, [files[1], str(twin / "mask_3.png")])
    Image.open(files[0]).resize((9, 9)).save(twin / "mask_9.png")
    assert "the masks differ in size: mask_3.png is" in _scene_error_of(generator, SCENE, [files[1], str(twin / "mask_9.png")])



@pytest.mark.parametrize("labels", [True, False], ids=["label-map", "binary-masks"])
def test_scene_masks_are_read_once_with_a_triangle_budget(generator, tmp_path, monkeypatch, labels):
    """Max triangles needs the instance count: the handler counted the masks by reading them, and the pipeline read
    them all again. Now they are read once and the pipeline takes them read; the GLB still records a label map's name."""
    from moca3d.commands.info import generation_record
    from moca3d.data import scene

    if labels:
        masks = [str(SCENE_MASKS)]
    else:
        ids = np.asarray(Image.open(SCENE_MASKS))
        masks = []
        for i in range(1, SCENE_INSTANCES + 1):
            Image.fromarray(((ids == i) * 255).astype(np.uint8)).save(tmp_path / f"mask_{i}.png")
            masks.append(str(tmp_path / f"mask_{i}.png"))
    reads, read = [], scene._read_gray
    monkeypatch.setattr(scene, "_read_gray", lambda path, *args, **kwargs: reads.append(Path(path).name) or read(path, *args, **kwargs))
    budget = demo_app.MIN_COMPONENT_FACES * SCENE_INSTANCES
    _, glb, summary = generator.generate_scene(SCENE, masks, seed=1, steps=1, faces=budget)
    assert sorted(reads) == sorted(Path(m).name for m in masks)  # each mask file decoded once
    assert summary.startswith(f"{SCENE_INSTANCES} instances") and _triangles(glb) <= budget
    settings = generation_record(Path(glb))["settings"]
    assert settings["image"] == SCENE.name and settings.get("masks") == (SCENE_MASKS.name if labels else None)
    # each instance's source: its label id, or its uploaded file's name (it was its place in a stack, "mask 0")
    expected = [f"id {i}" for i in range(1, SCENE_INSTANCES + 1)] if labels else [Path(m).name for m in masks]
    assert settings["instance_masks"] == expected


def test_mask_errors_name_the_files_without_the_server_folders(generator, tmp_path):
    """The masks' own checks (in moca3d.data.scene) named the file by its path: gradio's upload folder, or the demo's."""
    width, height = Image.open(SCENE).size
    colour = np.zeros((height, width, 3), np.uint8)
    colour[:, : width // 2] = (255, 0, 0)
    upload = tmp_path / "0123abcd" / "labels.png"  # gradio keeps each upload in a folder named by its hash
    upload.parent.mkdir()
    Image.fromarray(colour).save(upload)
    assert _scene_error_of(generator, SCENE, [str(upload)]) == "label map labels.png must be single-channel (grey or label ids), not colour"
    Image.fromarray(colour).save(tmp_path / "mask_2.png")
    message = _scene_error_of(generator, SCENE, [str(SCENE_MASKS), str(tmp_path / "mask_2.png")])  # binary masks: linked into a folder
    assert message == "mask mask_2.png must be single-channel (grey or label ids), not colour"


def _triangles(glb) -> int:
    """The triangles of all meshes in a GLB."""
    return sum(len(mesh.faces) for mesh in trimesh.load(glb, file_type="glb").dump())


def _budget_error(handler, faces, *inputs) -> str:
    """The one-line gr.Error message `handler` (generate or generate_scene) raises for the triangle budget `faces`."""
    with pytest.raises(gr.Error) as info:
        handler(*inputs, steps=1, faces=faces)
    message = info.value.message
    assert "\n" not in message and message
    return message


BAD_BUDGETS = (-5, 2.5, 40.5, float("nan"), float("inf"), True, False, "60", 19)  # negative, fractional, bool, text, below 20


@pytest.mark.parametrize("scene", [False, True], ids=["object", "scene"])
def test_triangle_budget_is_honoured_and_checked(generator, scene):
    """Max triangles: the output has at most that many (shared by the parts or instances); empty or 0 is no limit;
    a bad value, or one below 20 per part (instance), is a one-line error."""
    handler, inputs, count, kind = ((generator.generate_scene, (SCENE, [SCENE_MASKS]), SCENE_INSTANCES, "instances") if scene
                                    else (generator.generate, (EXAMPLE, PARTS), PARTS, "parts"))
    floor = demo_app.MIN_COMPONENT_FACES * count
    _, full, summary = handler(*inputs, seed=1, steps=1)
    total = _triangles(full)
    assert f", {total:,} triangles: " in summary and "at most" not in summary
    budget = max(floor, total // 2)
    assert budget < total  # the full meshes are over it: decimated
    _, glb, summary = handler(*inputs, seed=1, steps=1, faces=float(budget))  # gradio's number box passes a float
    assert _triangles(glb) <= budget and f"(at most {budget:,})" in summary and summary.startswith(f"{count} {kind}")
    assert _nodes(glb, kind[:-1] + "_") == _nodes(full, kind[:-1] + "_")
    for no_limit in (None, 0, 0.0):  # an empty box, or 0: the full meshes
        assert _triangles(handler(*inputs, seed=1, steps=1, faces=no_limit)[1]) == total
    for bad in BAD_BUDGETS:
        assert _budget_error(handler, bad, *inputs) == (
            f"max triangles must be empty or 0 (the full meshes) or a whole number of at least 20, got {bad}")
    assert _budget_error(handler, floor - 1, *inputs) == (
        f"max triangles {floor - 1} is too few for {count} {kind}: at least 20 each ({floor} in all)")


def test_models_go_to_the_right_tab(pipeline_dir, scene_pipeline_dir):
    pipe, scene_pipe = MoCAPipeline.from_pretrained(pipeline_dir), MoCAPipeline.from_pretrained(scene_pipeline_dir)
    with pytest.raises(ConfigError, match="scene model .* --scene-model"):
        demo_app.DemoGenerator(scene_pipe, resolution=RESOLUTION)
    with pytest.raises(ConfigError, match="object image encoder"):
        demo_app.DemoGenerator(pipe, resolution=RESOLUTION, scene_pipeline=pipe)


def test_handler_writes_a_glb_with_named_parts(generator, tmp_path, monkeypatch):
    generator = demo_app.DemoGenerator(generator.pipeline, resolution=RESOLUTION, output_dir=tmp_path)
    for age, name in enumerate(("older.glb", "old.glb")):  # earlier results, beyond what the demo keeps
        (tmp_path / name).write_bytes(b"")
        os.utime(tmp_path / name, (1000 + age, 1000 + age))
    monkeypatch.setattr(demo_app, "KEPT_OUTPUTS", 2)
    viewer, download, summary = generator.generate(EXAMPLE, PARTS, seed=1, steps=STEPS)
    assert viewer == download and Path(download).parent == generator.output_dir
    assert sorted(p.name for p in generator.output_dir.glob("*.glb")) == sorted(["old.glb", Path(download).name])
    assert _nodes(download, "part_") == {f"part_{i:02d}" for i in range(PARTS)}
    assert summary.startswith(f"{PARTS} parts")
    assert generator.generate(EXAMPLE, 1, seed=1, steps=1)[2].startswith("1 part in")


def test_a_coloured_background_is_generated_with_a_note(generator, tmp_path, monkeypatch):
    """The background warning reaches the page (a gr.Warning notice and the summary), not only the server's console."""
    from moca3d.data.images import BACKGROUND_WARNING

    shown = []
    monkeypatch.setattr(demo_app.gr, "Warning", lambda message, *args, **kwargs: shown.append(message))
    image = Image.new("RGB", (64, 64), (40, 90, 200))
    image.paste((200, 30, 30), (20, 20, 44, 44))
    image.save(tmp_path / "photo.png")
    handler = demo_app.DemoGenerator(generator.pipeline, resolution=RESOLUTION, output_dir=tmp_path / "out")
    summary = handler.generate(str(tmp_path / "photo.png"), 1, seed=1, steps=1)[2]
    assert shown == [BACKGROUND_WARNING] and summary.endswith(f"Note: {BACKGROUND_WARNING}")
    shown.clear()
    assert "Note:" not in handler.generate(EXAMPLE, 1, seed=1, steps=1)[2] and not shown


def test_other_warnings_of_a_generation_still_reach_the_console(generator, tmp_path, monkeypatch):
    """Recording the InputWarnings for the page swallowed every other warning of the run (torch's, numpy's)."""
    import warnings

    shown = []
    monkeypatch.setattr(warnings, "showwarning", lambda message, category, *args, **kwargs: shown.append((str(message), category)))
    handler = demo_app.DemoGenerator(generator.pipeline, resolution=RESOLUTION, output_dir=tmp_path / "out")
    run = handler.pipeline.__call__

    def noisy(*args, **kwargs):
        warnings.warn("something the console should show", RuntimeWarning)
        return run(*args, **kwargs)

    monkeypatch.setattr(type(handler.pipeline), "__call__", lambda self, *a, **k: noisy(*a, **k))
    handler.generate(EXAMPLE, 1, seed=1, steps=1)
    assert ("something the console should show", RuntimeWarning) in shown


def test_demo_cleans_up_its_temporary_files(generator, pipeline_dir, tmp_path):
    own = demo_app.DemoGenerator(generator.pipeline, resolution=RESOLUTION)  # no output folder given: a temporary one
    assert own.output_dir.is_dir()
    own.remove_output_dir()  # what happens when the demo stops
    assert not own.output_dir.exists()
    given = demo_app.DemoGenerator(generator.pipeline, resolution=RESOLUTION, output_dir=tmp_path / "mine")
    assert not hasattr(given, "remove_output_dir")  # a folder the user named is theirs
    # gradio keeps a copy of every upload and result; without delete_cache it never deletes one
    demo = demo_app.build_app(pipeline_dir, device="cpu", resolution=RESOLUTION, output_dir=tmp_path, scenes=False)
    assert demo.delete_cache == (demo_app.CACHE_CHECK_SECONDS, demo_app.CACHE_SECONDS)


def _elem_ids(demo) -> set:
    return {getattr(block, "elem_id", None) for block in demo.blocks.values()}


def test_parts_slider_matches_the_model_limit(pipeline_dir, tmp_path):
    demo = demo_app.build_app(pipeline_dir, device="cpu", resolution=RESOLUTION, output_dir=tmp_path, scenes=False)
    slider = next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "num-parts")
    assert slider.maximum == MAX_PARTS == MoCAPipeline.from_pretrained(pipeline_dir).transformer.max_components
    assert slider.minimum == 1 and slider.value == demo_app.DEFAULT_PARTS
    assert "scene-tab" not in _elem_ids(demo)  # --no-scenes: objects only


def test_scene_tab_defaults_to_the_scene_guidance(pipeline_dir, scene_pipeline_dir, tmp_path):
    from moca3d.defaults import GUIDANCE, SCENE_GUIDANCE

    demo = demo_app.build_app(pipeline_dir, device="cpu", resolution=RESOLUTION, output_dir=tmp_path, scene_model_path=scene_pipeline_dir)
    blocks = {getattr(block, "elem_id", None): block for block in demo.blocks.values()}
    assert {"scene-tab", "scene-masks", "scene-generate-button"} <= set(blocks)
    assert blocks["scene-guidance"].value == SCENE_GUIDANCE and blocks["guidance"].value == GUIDANCE
    assert blocks["faces"].value is None and blocks["scene-faces"].value is None  # no triangle budget: the full meshes
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    for name in ("input-image", "scene-image"):  # both tabs pass an unreadable upload on to their handler
        assert blocks[name].preprocess(ImageData(path=str(text), orig_name=text.name)) == str(text)


def test_missing_builtin_model_names_the_fix(tmp_path, monkeypatch):
    from moca3d.cli import app

    monkeypatch.setattr(demo_app, "DEFAULT_MODEL_DIR", tmp_path / "default")
    with pytest.raises(ConfigError, match="--model PATH .*moca3d train-default --install"):
        demo_app.resolve_model(None)
    monkeypatch.setattr(demo_app, "DEFAULT_SCENE_MODEL_DIR", tmp_path / "scene")
    assert demo_app.resolve_scene_model(None) is None  # no built-in scene model: no scene tab, no error
    assert demo_app.resolve_scene_model(tmp_path, enabled=False) is None
    help_text = CliRunner().invoke(app, ["demo", "--help"], env={"COLUMNS": "200"}).output
    assert all(flag in help_text for flag in ("--model", "--port", "127.0.0.1", "--scene-model", "--no-scenes"))
    assert f"at most {demo_app.MAX_UPLOAD_MB} MB and {demo_app.MAX_PIXELS / 1e6:.1f} megapixels" in help_text
    assert "one binary mask per instance -> one mesh per instance" in help_text  # one paragraph, not broken mid-sentence


def test_busy_port_or_foreign_host_fails_before_loading(tmp_path):
    from moca3d.cli import app

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["demo", "--model", str(tmp_path / "absent"), "--port", str(port)])
    assert isinstance(result.exception, ConfigError)  # not gradio's OSError about `server_port` and `launch()`
    assert str(result.exception) == f"port {port} is in use (another demo running?): pass another --port"
    result = CliRunner().invoke(app, ["demo", "--model", str(tmp_path / "absent"), "--host", "192.0.2.1", "--port", str(_free_port())])
    assert isinstance(result.exception, ConfigError) and "cannot listen on 192.0.2.1" in str(result.exception)


def test_scene_model_with_no_scenes_fails_before_loading(tmp_path, monkeypatch):
    from moca3d.cli import app

    loaded = []
    monkeypatch.setattr(demo_app, "launch", lambda *args, **kwargs: loaded.append(kwargs))
    monkeypatch.setattr(demo_app, "resolve_model", lambda model: model)
    result = CliRunner().invoke(app, ["demo", "--model", str(tmp_path), "--scene-model", str(tmp_path / "scene"),
                                      "--no-scenes", "--port", str(_free_port())])
    assert isinstance(result.exception, ConfigError) and not loaded
    assert str(result.exception) == "--scene-model and --no-scenes contradict each other: drop one (--no-scenes shows objects only)"
    result = CliRunner().invoke(app, ["demo", "--model", str(tmp_path), "--no-scenes", "--port", str(_free_port())])
    assert result.exception is None and loaded[0]["scenes"] is False  # --no-scenes alone: objects only
    assert not loaded[0].get("prevent_thread_lock")  # the CLI serves until Ctrl+C


def test_the_printed_address_can_be_opened():
    from moca3d.commands.demo import page_url

    assert page_url("127.0.0.1", 7860) == "http://127.0.0.1:7860"
    assert page_url("0.0.0.0", 7860).startswith("http://127.0.0.1:7860 ")  # every interface: browse to this computer
    assert page_url("::1", 8000) == "http://[::1]:8000"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



def test_launch_can_return_at_once_for_a_repl_or_notebook(pipeline_dir, tmp_path, monkeypatch):
    """launch(prevent_thread_lock=True) returns the app with its server running on 127.0.0.1:PORT; .close() stops it."""
    built, build = [], demo_app.build_app
    monkeypatch.setattr(demo_app, "build_app", lambda *args, **kwargs: built.append(build(*args, **kwargs)) or built[-1])
    port, returned = _free_port(), []
    options = dict(port=port, device="cpu", prevent_thread_lock=True, resolution=RESOLUTION, output_dir=tmp_path, scenes=False)
    caller = threading.Thread(target=lambda: returned.append(demo_app.launch(pipeline_dir, **options)), daemon=True)
    caller.start()
    caller.join(LAUNCH_TIMEOUT_S)
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no http_proxy between the test and the server
    try:
        assert not caller.is_alive(), "launch(prevent_thread_lock=True) did not return"
        assert returned == built and returned[0].server_name == "127.0.0.1" and returned[0].server_port == port
        with direct.open(f"http://127.0.0.1:{port}/config", timeout=30) as page:  # the page's layout, as the browser reads it
            assert page.status == 200 and json.load(page)["title"] == demo_app.TITLE
    finally:
        for app in built:
            app.close()
    with pytest.raises(OSError):  # closed: nothing listens there any more
        direct.open(f"http://127.0.0.1:{port}/", timeout=5)


def test_launch_refuses_a_port_in_use_before_loading_a_model(monkeypatch):
    """From Python, a busy port surfaced as gradio's OSError after the models had loaded (the CLI checked it first)."""
    monkeypatch.setattr(demo_app, "build_app", lambda *args, **kwargs: pytest.fail("a model was loaded"))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port} is in use"):
            demo_app.launch(port=port, prevent_thread_lock=True)

def _nodes(glb: Path, prefix: str) -> set:
    """The GLB's node names that start with `prefix` (part_ or instance_)."""
    scene = trimesh.load(glb, file_type="glb")
    return {name for name in scene.graph.nodes if name.startswith(prefix)}


@pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # gradio's own pandas deprecations
@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing: install Debian's chromium (scripts/setup.sh does)")
def test_browser_generates_and_downloads_parts_and_instances(pipeline_dir, scene_pipeline_dir, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    port = _free_port()
    demo = demo_app.launch(
        pipeline_dir, port=port, device="cpu", prevent_thread_lock=True, resolution=RESOLUTION, default_steps=STEPS,
        output_dir=tmp_path / "outputs", scene_model_path=scene_pipeline_dir,
    )
    outside = []  # requests to anything but the local server: there must be none

    def local_only(route):
        if urlparse(route.request.url).hostname in LOCAL_HOSTS or route.request.url.startswith(("data:", "blob:")):
            return route.continue_()
        outside.append(route.request.url)
        return route.abort()

    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(accept_downloads=True)
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            page.route("**/*", local_only)
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            page.locator("#input-image input[type='file']").set_input_files(EXAMPLE)
            expect(page.locator("#input-image img").first).to_be_visible()
            parts = page.locator("#num-parts input[type='number']")
            parts.fill(str(PARTS))
            parts.press("Enter")
            expect(page.locator("#num-parts input[type='range']")).to_have_value(str(PARTS))
            page.locator("#advanced button").first.click()  # the accordion with the triangle budget
            page.locator("#faces input").fill(str(BROWSER_FACES))
            page.locator("#generate-button").click()
            link = page.locator("#glb-file a").first
            expect(link).to_be_visible(timeout=GENERATION_TIMEOUT_MS)
            expect(page.locator("#summary")).to_contain_text(f"{PARTS} parts")
            expect(page.locator("#summary")).to_contain_text(f"(at most {BROWSER_FACES})")
            expect(page.locator("#viewer canvas").first).to_be_attached()
            with page.expect_download() as download:
                link.click()
            saved = tmp_path / "downloaded.glb"
            download.value.save_as(saved)

            page.get_by_role("tab", name="Scene").click()
            page.locator("#scene-image input[type='file']").set_input_files(SCENE)
            expect(page.locator("#scene-image img").first).to_be_visible()
            page.locator("#scene-masks input[type='file']").set_input_files(SCENE_MASKS)
            expect(page.locator("#scene-masks")).to_contain_text(SCENE_MASKS.name)
            page.locator("#scene-generate-button").click()
            scene_link = page.locator("#scene-glb-file a").first
            expect(scene_link).to_be_visible(timeout=GENERATION_TIMEOUT_MS)
            expect(page.locator("#scene-summary")).to_contain_text(f"{SCENE_INSTANCES} instances")
            with page.expect_download() as scene_download:
                scene_link.click()
            saved_scene = tmp_path / "scene.glb"
            scene_download.value.save_as(saved_scene)
            browser.close()
    finally:
        demo.close()
    assert _nodes(saved, "part_") == {f"part_{i:02d}" for i in range(PARTS)}
    assert _triangles(saved) <= BROWSER_FACES
    assert _nodes(saved_scene, "instance_") == {f"instance_{i:02d}" for i in range(SCENE_INSTANCES)}
    assert not outside, f"the page tried to reach the network: {outside}"


def test_demo_serves_a_lora_adapter_folded_into_its_base(pipeline_dir, tmp_path, monkeypatch):
    """--lora reaches the app, whose object model is the base with the adapter merged (as `generate --lora` loads it)."""
    from moca3d.cli import app
    from moca3d.models.lora import add_lora, merge_lora, save_adapter
    from moca3d.models.transformer import PRIOR_FREE_MODULES
    from moca3d.training.checkpoints import frozen_fingerprint
    from moca3d.training.train_dit import Generator, adapter_config

    base = MoCAPipeline.from_pretrained(pipeline_dir)
    tuned = Generator(base.transformer, base.image_encoder)
    add_lora(tuned.transformer, 2, train_full=PRIOR_FREE_MODULES)
    tuned.image_encoder.requires_grad_(False)
    with torch.no_grad():  # a "trained" adapter: B away from its zero start
        for name, param in tuned.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    recipe = DiTTrainConfig.from_dict(dict(init_from=str(pipeline_dir), transformer_lora_rank=2, transformer={}))
    folder = save_adapter(tmp_path / "lora", tuned, adapter_config(recipe, tuned, frozen_fingerprint(tuned)))
    merge_lora(tuned.transformer)
    handlers, make = [], demo_app.DemoGenerator
    monkeypatch.setattr(demo_app, "DemoGenerator", lambda *args, **kwargs: handlers.append(make(*args, **kwargs)) or handlers[-1])
    demo_app.build_app(pipeline_dir, device="cpu", scenes=False, lora=folder, output_dir=tmp_path / "out")
    for name, value in tuned.transformer.state_dict().items():
        torch.testing.assert_close(handlers[0].pipeline.transformer.state_dict()[name], value, rtol=0, atol=1e-6, msg=name)
    seen = []
    monkeypatch.setattr(demo_app, "launch", lambda *args, **kwargs: seen.append(kwargs))
    monkeypatch.setattr(demo_app, "resolve_model", lambda model: model)
    result = CliRunner().invoke(app, ["demo", "--model", str(pipeline_dir), "--lora", str(folder), "--no-scenes", "--port", str(_free_port())])
    assert result.exception is None and seen[0]["lora"] == folder


def test_the_demo_names_its_share_switch_not_gradios_launch_argument(monkeypatch, capsys):
    """gradio printed "To create a public link, set `share=True` in `launch()`": a CLI user's switch is --share."""
    calls = []

    class Page:
        """Stands in for the built gr.Blocks: records how it is launched."""

        def launch(self, **options):
            calls.append(options)

        def block_thread(self):
            calls.append("blocked")

    monkeypatch.setattr(demo_app, "build_app", lambda *args, **kwargs: Page())
    port = _free_port()
    demo_app.launch(port=port)
    options, blocked = calls
    assert options["quiet"] and options["prevent_thread_lock"] and not options["share"] and blocked == "blocked"
    out = capsys.readouterr().out
    assert f"http://127.0.0.1:{port}" in out and "moca3d demo --share" in out and "share=True" not in out
    calls.clear()
    demo_app.launch(port=port, share=True, prevent_thread_lock=True)  # gradio's own lines then: the public link's
    (options,) = calls
    assert options["share"] and not options["quiet"] and capsys.readouterr().out == ""


def test_a_speck_of_a_label_id_is_one_note_naming_its_id(generator, tmp_path):
    """A stray 1-pixel id in an uploaded label map: one note, by its id (the pipeline checks the read masks again, as
    a positional stack, and warned a second time as "mask 3")."""
    labels = np.asarray(Image.open(SCENE_MASKS)).copy()
    stray = SCENE_INSTANCES + 1
    labels[0, 0] = stray  # a corner pixel: background in the example
    Image.fromarray(labels).save(tmp_path / "labels.png")
    _, _, summary = generator.generate_scene(SCENE, [str(tmp_path / "labels.png")], seed=1, steps=1)
    notes = [line for line in summary.split("\n\n")[1:]]
    assert len(notes) == 1 and f"mask id {stray} (instance_{stray - 1:02d}) covers only 1 pixel" in notes[0], summary
