"""Scene inputs that passed silently: a mask of a few pixels (a stray anti-aliased id, a near-empty mask) is warned
about by name and pixel count, and a blank (one flat colour) scene image is refused, by the pipeline and the CLI alike."""

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image
from typer.testing import CliRunner

from moca3d.cli import app
from moca3d.data.images import check_image, load_image
from moca3d.data.scene import TINY_MASK_PIXELS, load_masks, read_masks, scene_conditions, union_box
from moca3d.errors import InputError, InputWarning
from moca3d.pipeline import MoCAOutput, MoCAPipeline

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _labels() -> np.ndarray:
    """A 32x40 label map: id 3 a 10x12 block, id 7 a single pixel (as anti-aliasing leaves at a corner)."""
    labels = np.zeros((32, 40), np.uint8)
    labels[4:14, 5:17] = 3
    labels[20, 30] = 7
    return labels


def _scene() -> np.ndarray:
    """A 32x40 scene image: a grey floor, a red block where id 3 is."""
    image = np.full((32, 40, 3), 90, np.uint8)
    image[4:14, 5:17] = (220, 20, 20)
    return image


def test_a_one_pixel_label_id_is_kept_with_a_warning_naming_it(tmp_path):
    Image.fromarray(_labels()).save(tmp_path / "labels.png")
    for source in (_labels().astype(np.int64), tmp_path / "labels.png"):
        with pytest.warns(InputWarning, match=r"^mask id 7 \(instance_01\) covers only 1 pixel: a stray id left by anti-aliasing"
                                              r" or a near-empty mask\?") as caught:
            masks, names = read_masks(source)
        assert names == ["id 3", "id 7"] and masks.sum(axis=(1, 2)).tolist() == [120, 1]  # still an instance
        assert len(caught) == 1 and "\n" not in str(caught[0].message)


def test_near_empty_binary_masks_warn_by_file_name_or_place_after_overlaps(tmp_path):
    big, speck = np.zeros((24, 24), np.uint8), np.zeros((24, 24), np.uint8)
    big[2:20, 2:20], speck[22, 22:24] = 255, 255  # speck: 2 pixels
    folder = tmp_path / "masks"
    folder.mkdir()
    Image.fromarray(big).save(folder / "mask_1.png")
    Image.fromarray(speck).save(folder / "mask_2.png")
    with pytest.warns(InputWarning, match=r"mask 'mask_2.png' \(instance_01\) covers only 2 pixels.*\(1 mask\(s\) under 4 pixels\)"):
        assert read_masks(folder)[1] == ["mask_1.png", "mask_2.png"]
    # a mask a later one covers but for 3 pixels: counted after overlaps (it is also mostly hidden)
    cover = np.zeros((24, 24), bool)
    cover[2:20, 2:20] = True
    cover[19, 17:20] = False
    with pytest.warns(InputWarning) as caught:
        masks = load_masks([big > 0, cover])
    assert masks[0].sum() == 3
    assert any(str(w.message).startswith("mask 0 (instance_00) covers only 3 pixels") for w in caught), [str(w.message) for w in caught]


def test_masks_of_the_threshold_and_the_examples_load_quietly():
    labels = _labels()
    labels[20:22, 30:32] = 7  # a 2x2 block: TINY_MASK_PIXELS
    assert TINY_MASK_PIXELS == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_masks(labels.astype(np.int64))) == 2
        for name in ("scene4", "scene32"):  # scene32 holds a real occluded instance of 4 px (id 29)
            masks = load_masks(EXAMPLES / f"{name}_masks.png")
            scene_conditions(EXAMPLES / f"{name}.png", masks, size=16)


@pytest.mark.parametrize("colour", [(0, 0, 0), (128, 128, 128), (30, 160, 90)])
def test_a_flat_colour_scene_image_is_refused(colour):
    masks = load_masks(np.where(_labels() == 3, 3, 0))  # the block alone
    blank = np.zeros((32, 40, 3), np.uint8) + np.array(colour, np.uint8)
    message = rf"^the image is blank \(one flat colour, RGB {colour[0]}, {colour[1]}, {colour[2]}\): it shows nothing"
    with pytest.raises(InputError, match=message):
        scene_conditions(blank, masks, size=16)  # what MoCAPipeline.scene_condition runs
    with pytest.raises(InputError, match=message):
        check_image(load_image(blank), box=union_box(masks))  # generate-scene's check before loading the model
    jpeg = io.BytesIO()
    Image.fromarray(blank).save(jpeg, "JPEG", quality=75)  # a solid colour's JPEG reads back flat
    with pytest.raises(InputError, match=r"the image is blank \(one flat colour"):
        scene_conditions(Image.open(jpeg), masks, size=16)
    noisy = blank.astype(np.int64) + np.random.default_rng(0).integers(0, 4, blank.shape)  # sensor-like noise: still blank
    with pytest.raises(InputError, match=r"the image is blank \(one flat colour"):
        scene_conditions(noisy.clip(0, 255).astype(np.uint8), masks, size=16)
    shown = blank.copy()
    shown[4:14, 5:17] = (220, 20, 20)  # the instance shows: conditions as before
    assert scene_conditions(shown, masks, size=16).shape == (1, 7, 16, 16)


class _ReadingPipeline:
    """Stands in for a loaded scene pipeline: reads the masks it is given, as MoCAPipeline.generate_scene does."""

    def generate_scene(self, image, masks, **kwargs):
        self.masks = masks
        n = len(read_masks(masks, image_size=load_image(image).size)[0])
        names = [f"instance_{i:02d}" for i in range(n)]
        return MoCAOutput([trimesh.creation.box() for _ in names], names, torch.zeros(n, 1, 1), kind="instance")


def test_generate_scene_warns_once_by_label_id_and_refuses_a_black_image_before_loading(tmp_path, monkeypatch):
    Image.fromarray(_labels()).save(tmp_path / "labels.png")
    Image.fromarray(_scene()).save(tmp_path / "scene.png")
    Image.new("RGB", (40, 32), (0, 0, 0)).save(tmp_path / "black.png")
    pipe = _ReadingPipeline()
    monkeypatch.setattr(MoCAPipeline, "from_pretrained", classmethod(lambda cls, *args, **kwargs: pipe))
    args = ["--masks", str(tmp_path / "labels.png"), "--model", str(tmp_path), "--device", "cpu", "-o", str(tmp_path / "s.glb")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = CliRunner().invoke(app, ["generate-scene", str(tmp_path / "scene.png"), *args])
    assert res.exit_code == 0, res.output
    tiny = [str(w.message) for w in caught if issubclass(w.category, InputWarning)]
    assert len(tiny) == 1 and tiny[0].startswith("mask id 7 (instance_01) covers only 1 pixel"), tiny
    assert isinstance(pipe.masks, np.ndarray)  # read once, named by label id; the pipeline's second check is quiet

    def no_loading(*args, **kwargs):
        raise AssertionError("the model loaded for a blank image")

    monkeypatch.setattr(MoCAPipeline, "from_pretrained", classmethod(no_loading))
    res = CliRunner().invoke(app, ["generate-scene", str(tmp_path / "black.png"), *args])
    assert isinstance(res.exception, InputError), res.exception
    assert str(res.exception) == "the image is blank (one flat colour, RGB 0, 0, 0): it shows nothing of its instances to condition on"
