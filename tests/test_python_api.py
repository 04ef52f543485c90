"""The Python API as a researcher scripts it: input types, seeds, outputs and their formats, diffusers-like niceties."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

import moca3d
from moca3d.data.scene import read_masks
from moca3d.errors import InputError, InputWarning
from moca3d.metrics import MetricsConfig, evaluate_object, object_metrics, self_iou
from moca3d.pipeline import MoCAPipeline

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FAST = dict(steps=1, resolution=16, show_progress=False)


@pytest.fixture(scope="module")
def pipe():
    return MoCAPipeline.from_pretrained()


def test_images_as_tensors_and_grey_arrays_condition_as_their_rgb_array(pipe):
    """A channels-first tensor (batched or not, 0..1 floats or uint8) and a grey (H, W) array are images too (they were
    refused as "unsupported image type" / "must be (H, W, 3|4)")."""
    rgb = np.array(Image.open(EXAMPLES / "chair.png").convert("RGB"))  # (H, W, 3) uint8
    expected = pipe.encode_image(rgb)
    chw = torch.from_numpy(rgb).permute(2, 0, 1)  # (3, H, W)
    for tensor in (chw, chw[None], chw.float() / 255):
        assert torch.allclose(pipe.encode_image(tensor), expected, atol=1e-6)
    grey = rgb.mean(axis=2).round().astype(np.uint8)  # (H, W)
    assert torch.equal(pipe.encode_image(grey), pipe.encode_image(np.repeat(grey[..., None], 3, axis=2)))
    assert torch.equal(pipe.encode_image(torch.from_numpy(grey)), pipe.encode_image(grey))  # a grey tensor too
    with pytest.raises(InputError, match="channels first"):
        pipe.encode_image(torch.zeros(2, 3, 64, 64))


def test_seeds_numpy_integers_and_none(pipe):
    """numpy's integers seed as Python's (torch.Generator refused them); None draws a seed and records it."""
    image = EXAMPLES / "chair.png"
    a = pipe(image, num_parts=np.int64(2), seed=np.int64(3), shift=np.float32(1.0), **FAST)
    b = pipe(image, num_parts=2, seed=3, **FAST)
    assert torch.equal(a.latents, b.latents) and a.settings["seed"] == 3
    json.dumps(a.settings)  # what an OBJ's first line holds: numpy's numbers were not JSON
    drawn = pipe(image, num_parts=2, seed=None, **FAST)
    again = pipe(image, num_parts=2, seed=drawn.settings["seed"], **FAST)  # the recorded seed reproduces it
    assert torch.equal(drawn.latents, again.latents)
    with pytest.raises(InputError, match="number of parts must be a whole number >= 1, got None"):
        pipe(image, num_parts=None, **FAST)  # it took the image's token count (65) as the part count


def test_output_is_a_sequence_of_meshes_and_saves_only_what_it_names(pipe, tmp_path):
    out = pipe(EXAMPLES / "chair.png", num_parts=3, **FAST)
    assert len(out) == 3 and list(out) == out.meshes and out[1] is out.meshes[1]
    assert repr(out).startswith("MoCAOutput(3 parts") and "seed 0" in repr(out)
    for suffix in (".ply", ".stl", ".gltf", ""):  # each was written as a GLB under that name
        with pytest.raises(InputError, match=".glb .* or .obj"):
            out.save(tmp_path / f"chair{suffix}")
        assert not (tmp_path / f"chair{suffix}").exists()
    assert "object" in repr(pipe) and pipe.dtype == torch.float32
    assert "MoCAPipeline" in dir(moca3d)  # imported lazily, listed all the same


def test_label_maps_refuse_negative_ids_and_take_tensors():
    labels = np.zeros((20, 30), np.int64)
    labels[2:6, 3:9], labels[10:15, 20:25] = 2, 1
    with pytest.raises(InputError, match="negative ids"):
        read_masks(labels - 1)  # the background would have become an instance, and id 0 dropped
    masks, sources = read_masks(torch.from_numpy(labels))
    assert masks.shape == (2, 20, 30) and sources == ["id 1", "id 2"]
    assert read_masks(labels * 1_000_000)[1] == ["id 1000000", "id 2000000"]  # panoptic-sized ids, not "id 1e+06"
    with pytest.raises(InputError, match="no masks given"):
        read_masks(None)


def test_metrics_take_one_mesh_or_a_scene_and_warn_where_self_iou_clips():
    box = trimesh.creation.box()
    few = MetricsConfig(num_points=2000)
    assert evaluate_object(box, trimesh.Scene([box]), few)["fscore@0.1"] > 0.9  # itself, to the floor of 2000 points
    assert object_metrics(trimesh.Scene([box, box.copy().apply_translation([2, 0, 0])]), [box], few)["num_pred"] == 2
    big = [box.copy().apply_scale(4), box.copy().apply_scale(4).apply_translation([2, 0, 0])]  # IoU 1/3, not in [-1, 1]^3
    with pytest.warns(InputWarning, match="outside the voxel grid"):  # measured in their own box (the grid clipped them,
        assert self_iou(big, resolution=32, normalize=False) == pytest.approx(1 / 3, abs=0.05)  # and 16x took 1.2 GB)
    nothing = object_metrics([trimesh.Trimesh()], trimesh.Scene([box]), few)  # an all-empty prediction, a Scene as GT
    assert nothing["num_gt"] == 1 and nothing["fscore@0.1"] == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert self_iou(big, resolution=32) == pytest.approx(1 / 3, abs=0.05)  # normalised: inside the grid, no warning


def test_an_all_opaque_alpha_is_no_alpha():
    """An RGBA image whose alpha is 255 everywhere (as many exports are) crops and warns as its RGB pixels do: its alpha
    made the whole frame foreground (no crop) and silenced the coloured-background warning."""
    from moca3d.data.images import preprocess_image

    rgb = np.full((100, 80, 3), 255, np.uint8)
    rgb[10:30, 5:25] = [200, 10, 10]  # an object off-centre on white
    opaque = np.concatenate([rgb, np.full((100, 80, 1), 255, np.uint8)], axis=2)
    assert torch.equal(preprocess_image(opaque, 32), preprocess_image(rgb, 32))
    grey = opaque.copy()
    grey[..., :3][(rgb == 255).all(axis=2)] = [120, 140, 160]  # a grey background, still opaque
    with pytest.warns(InputWarning, match="has no transparency and most of its border is not white"):
        preprocess_image(grey, 32)


def test_tiny_objects_and_animations_are_warned_about(tmp_path):
    from moca3d.data.images import load_image, preprocess_image

    tiny = np.full((12, 12, 3), 255, np.uint8)
    tiny[3:9, 3:9] = 0
    with pytest.warns(InputWarning, match="the object spans only 6 px"):
        preprocess_image(tiny, 64)
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with pytest.warns(InputWarning, match="anim.gif holds 2 frames: the first one is used"):
        load_image(tmp_path / "anim.gif")


def test_from_and_save_pretrained_paths(pipe, tmp_path):
    from moca3d.errors import CheckpointError, ConfigError

    folder = pipe.save_pretrained(tmp_path / "copy")
    assert MoCAPipeline.from_pretrained(folder / "model_index.json").source["model"] == str(folder)  # the index names its folder
    with pytest.raises(CheckpointError, match="an empty path"):
        MoCAPipeline.from_pretrained("")  # it read the current folder
    (tmp_path / "taken").write_text("x")
    with pytest.raises(ConfigError, match="taken is a file: save_pretrained writes a folder"):
        pipe.save_pretrained(tmp_path / "taken")  # a raw FileExistsError


def test_an_export_records_how_many_components_it_was_trained_on(object_dataset, object_pipeline, tmp_path):
    """Asking for more parts than any training example held is allowed (up to max_components) and warned about."""
    import json

    from moca3d.data.dataset import read_manifest

    root, _ = object_dataset
    most = max(r["num_components"] for r in read_manifest(root, "train"))
    tiny = MoCAPipeline.from_pretrained(object_pipeline)
    assert tiny.trained_components == most
    assert json.loads(tiny.save_pretrained(tmp_path / "copy").joinpath("model_index.json").read_text())["_trained_components"] == most
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        tiny(EXAMPLES / "chair.png", num_parts=most, **FAST)
    with pytest.warns(InputWarning, match=f"{most + 1} parts: this model was trained on at most {most}"):
        tiny(EXAMPLES / "chair.png", num_parts=most + 1, **FAST)
    with warnings.catch_warnings():  # said once per pipeline and count: a folder of images said it for each image
        warnings.simplefilter("error", InputWarning)
        tiny(EXAMPLES / "chair.png", num_parts=most + 1, **FAST)
    with pytest.warns(InputWarning, match=f"{most + 2} parts: this model was trained on at most {most}"):
        tiny(EXAMPLES / "chair.png", num_parts=most + 2, **FAST)


def test_a_fine_tune_keeps_its_base_models_component_range(object_dataset, object_pipeline, tmp_path):
    """Fine-tuned on examples of at most 4 parts, a model trained on up to 10 recorded 4 (and warned at 5)."""
    import json

    from conftest import tiny_dit_recipe
    from moca3d.training.train_dit import train

    root, _ = object_dataset
    base = json.loads((Path(object_pipeline) / "model_index.json").read_text())["_trained_components"]
    few = tiny_dit_recipe(steps=1, init_from=str(object_pipeline), max_components=4, transformer={}, image_encoder={})
    with pytest.warns(InputWarning, match="more than max_components 4 parts"):
        result = train(root, tmp_path / "tune", few, device="cpu", progress=False)
    assert base > 4 and MoCAPipeline.from_pretrained(result["pipeline"]).trained_components == base


def test_input_warnings_point_at_the_callers_line():
    """An InputWarning raised deep inside moca3d is attributed to the caller's line outside the package (warn_input),
    whatever the depth: a script sees its own line, not one of ours."""
    import warnings

    import numpy as np

    from moca3d.data.images import preprocess_image
    from moca3d.data.scene import load_masks
    from moca3d.errors import InputWarning

    grey = np.full((64, 64, 3), 128, np.uint8)
    grey[20:40, 20:40] = 0  # an object on a grey background: the background warning
    labels = np.zeros((64, 64), np.uint8)
    labels[:32], labels[40, 40] = 1, 2  # instance 2 is one pixel: the tiny-mask warning, three calls deep
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        preprocess_image(grey, 32)
        load_masks(labels)  # load_masks -> read_masks -> check_masks
    ours = [w for w in caught if issubclass(w.category, InputWarning)]
    assert len(ours) == 2, [str(w.message) for w in caught]
    assert all(w.filename == __file__ for w in ours), [(w.filename, w.lineno) for w in ours]


def test_diffusers_argument_names_mean_ours(pipe):
    """num_inference_steps, guidance_scale and generator (diffusers', TripoSG's and PartCrafter's call) are steps, guidance
    and a seed; the generator's seed is recorded and reproduces the output; both names at odds are one-line errors."""
    image = EXAMPLES / "chair.png"
    ours = pipe(image, num_parts=2, steps=2, guidance=3.0, seed=5, resolution=16, show_progress=False)
    theirs = pipe(image, num_parts=2, num_inference_steps=2, guidance_scale=3.0, seed=5, resolution=16, show_progress=False)
    assert torch.equal(ours.latents, theirs.latents)
    assert (theirs.settings["steps"], theirs.settings["guidance"]) == (2, 3.0)
    a = pipe(image, num_parts=2, generator=torch.Generator().manual_seed(1), **FAST)
    b = pipe(image, num_parts=2, generator=torch.Generator().manual_seed(1), **FAST)
    c = pipe(image, num_parts=2, seed=a.settings["seed"], **FAST)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.latents, c.latents)
    assert a.settings["seed"] != pipe(image, num_parts=2, generator=torch.Generator().manual_seed(2), **FAST).settings["seed"]
    for bad, match in ((dict(steps=3, num_inference_steps=2), "steps=3 and num_inference_steps=2 disagree"),
                       (dict(guidance=3.0, guidance_scale=4.0), "guidance=3.0 and guidance_scale=4.0 disagree"),
                       (dict(seed=4, generator=torch.Generator()), "give seed=4 or a generator, not both"),
                       (dict(generator=7), "generator must be a torch.Generator")):
        with pytest.raises(InputError, match=match):
            pipe(image, num_parts=2, **{"resolution": 16, "show_progress": False, **bad})


def test_scene_generation_takes_diffusers_argument_names():
    """generate_scene maps the same names; a guidance_scale agrees with its own default guidance (2), not the objects' (7)."""
    from moca3d.defaults import DEFAULT_SCENE_MODEL_DIR
    scene = MoCAPipeline.from_pretrained(DEFAULT_SCENE_MODEL_DIR)
    args = dict(image=EXAMPLES / "scene4.png", masks=EXAMPLES / "scene4_masks.png", resolution=16, show_progress=False)
    ours = scene.generate_scene(**args, steps=1, guidance=5.0, seed=2)
    theirs = scene.generate_scene(**args, num_inference_steps=1, guidance_scale=5.0, generator=None, seed=2)
    assert torch.equal(ours.latents, theirs.latents) and theirs.settings["guidance"] == 5.0
    with pytest.raises(InputError, match="guidance=7.0 and guidance_scale=5.0 disagree"):
        scene.generate_scene(**args, guidance=7.0, guidance_scale=5.0)
