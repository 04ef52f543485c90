"""Scene inputs that misled silently: a label map among binary masks became one instance, a square photo turned by its
EXIF orientation misaligned with its masks, a list of mask files was recorded by place, and a CLI user was told a
Python call to reach the built-in scene model."""

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter
from typer.testing import CliRunner

from moca3d.cli import app
from moca3d.data.scene import read_masks, warn_exif_turn
from moca3d.defaults import DEFAULT_MODEL_DIR, DEFAULT_SCENE_MODEL_DIR, INSTANCE_MASKS
from moca3d.errors import InputError, InputWarning

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
LABELS = EXAMPLES / "scene4_masks.png"  # 256x256, ids 0-4
ORIENTATION = 0x0112  # the EXIF orientation tag


def _labels() -> np.ndarray:
    return np.asarray(Image.open(LABELS))


def _save(array: np.ndarray, path: Path, **kwargs) -> Path:
    Image.fromarray(array.astype(np.uint8)).save(path, **kwargs)
    return path


def test_a_label_map_in_a_mask_folder_or_list_is_refused_not_merged_into_one_instance(tmp_path):
    """ids 0-4 (or 0/60/.../240 for viewing) among binary masks were thresholded into a single instance."""
    labels = _labels()
    many = np.asarray(Image.open(EXAMPLES / "scene32_masks.png"))  # 32 ids, most of them small
    for folder, array in (("ids", labels), ("visible", labels * 60), ("many", many)):
        (tmp_path / folder).mkdir()
        _save(array, tmp_path / folder / "labels.png")
        with pytest.raises(InputError, match=r"^mask 'labels.png' holds \d+ grey levels \(0, [^)]*\), not a binary mask's two: "
                                             r"a label map\? pass it alone as the masks \(--masks FILE\)") as err:
            read_masks(tmp_path / folder)
        assert "\n" not in str(err.value)
    with pytest.raises(InputError, match=r"^mask 'labels.png' holds 5 grey levels \(0, 60, 120, 180, 240\)"):
        read_masks([tmp_path / "visible" / "labels.png"])  # a list of files, as the Python API takes it
    with pytest.raises(InputError, match=r"^mask 1 holds 5 grey levels \(0, 1, 2, 3, 4\)"):
        read_masks([(labels == 1).astype(np.uint8) * 255, labels])  # arrays: named by their places
    assert len(read_masks(LABELS)[0]) == 4  # the label map itself, as --masks


def test_jpeg_anti_aliased_and_soft_binary_masks_still_load(tmp_path):
    """The refusal must not catch binary masks whose in-between levels are JPEG noise, anti-aliased edges or blur."""
    labels = _labels()
    big = Image.new("L", (1024, 1024))  # a mask drawn 4x larger, downsampled: anti-aliased edges
    ImageDraw.Draw(big).ellipse([205, 205, 819, 770], fill=255)
    ImageDraw.Draw(big).rectangle([4, 4, 513, 259], fill=255)
    cases = {
        "jpeg50": [_save((labels == k) * 255, tmp_path / f"j50_{k}.jpg", quality=50) for k in (1, 3)],
        "jpeg95": [_save((labels == k) * 255, tmp_path / f"j95_{k}.jpg", quality=95) for k in (1, 3)],
        "jpeg01": [_save(labels == k, tmp_path / f"j01_{k}.jpg", quality=95) for k in (1, 3)],
        "bilinear": [_save(np.asarray(big.resize((256, 256), Image.BILINEAR)), tmp_path / "bilinear.png")],
        "box": [_save(np.asarray(big.resize((512, 512), Image.BOX).resize((256, 256), Image.BOX)), tmp_path / "box.png")],
        "aa_jpeg": [_save(np.asarray(big.resize((64, 64), Image.BILINEAR)), tmp_path / "aa.jpg", quality=60)],
        "blurred": [_save(np.asarray(big.resize((256, 256)).filter(ImageFilter.GaussianBlur(38))), tmp_path / "blur.png")],
    }
    for name, files in cases.items():
        masks, names = read_masks(files)
        assert masks.shape[0] == len(files) and masks.any(axis=(1, 2)).all(), name
        assert names == [f.name for f in files], name
    soft = np.asarray(big.resize((256, 256), Image.BILINEAR))
    assert len(np.unique(soft)) > 2  # it did hold in-between levels, all along its edges
    for k in (1, 3):  # the JPEG ones still cover their instance
        agree = (read_masks([tmp_path / f"j50_{k}.jpg"])[0][0] == (labels == k)).mean()
        assert agree > 0.99, (k, agree)


def test_a_list_of_mask_files_records_their_file_names(tmp_path):
    """The Python API recorded ['mask 0', 'mask 1'] for a list of paths, though README says a file's name is recorded."""
    labels = _labels()
    files = [_save((labels == k) * 255, tmp_path / f"mask_{k}.png") for k in (1, 3)]
    for given in (files, [str(f) for f in files]):
        masks, names = read_masks(given)
        assert names == ["mask_1.png", "mask_3.png"] and masks.shape == (2, 256, 256)
    assert read_masks([labels == 1, labels == 3])[1] == ["mask 0", "mask 1"]  # arrays: their places in the list
    with pytest.raises(InputError, match=r"^mask 'mask_1.png' is empty \(every pixel is covered by a later mask\)"):
        read_masks([files[0], _save((labels > 0) * 255, tmp_path / "all.png")])  # errors name the file too

    from moca3d.pipeline import MoCAPipeline

    out = MoCAPipeline.from_pretrained(DEFAULT_SCENE_MODEL_DIR).generate_scene(
        EXAMPLES / "scene4.png", [str(f) for f in files], steps=1, resolution=16, show_progress=False)
    assert out.settings[INSTANCE_MASKS] == ["mask_1.png", "mask_3.png"]


def _photo(path: Path, size: tuple, orientation: int | None) -> Path:
    """A JPEG of `size` (W, H) with that EXIF orientation (None: no EXIF)."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    exif = Image.Exif()
    if orientation is not None:
        exif[ORIENTATION] = orientation
    image.save(path, exif=exif.tobytes())
    return path


def test_an_exif_turn_that_keeps_the_image_sides_is_warned_of(tmp_path):
    """A square photo with orientation 6 was read turned and its masks were not: misaligned with no word (a turn that
    swaps a non-square image's sides is refused by the size check)."""
    for size, orientation, turn in (((64, 64), 6, "turned 90° clockwise"), ((64, 64), 8, "turned 90° anticlockwise"),
                                    ((80, 64), 3, "turned 180°"), ((80, 64), 2, "mirrored")):
        with pytest.warns(InputWarning, match=rf"^scene image p.jpg is read {turn} by its EXIF orientation \(as viewers show "
                                              r"it\): its masks must match the turned image, not its stored pixels$") as caught:
            warn_exif_turn(_photo(tmp_path / "p.jpg", size, orientation))
        assert len(caught) == 1
    with pytest.raises(InputError, match=r"sides swapped: an image with an EXIF orientation is read turned"):
        read_masks(np.ones((64, 80), np.uint8), image_size=(64, 80))  # the non-square case: the masks were not turned
    quiet = [_photo(tmp_path / "six.jpg", (80, 64), 6), _photo(tmp_path / "one.jpg", (64, 64), 1),
             _photo(tmp_path / "none.jpg", (64, 64), None), Image.open(_photo(tmp_path / "pil.jpg", (64, 64), 6))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for image in quiet:  # swapped sides (the size check tells), upright, or a PIL image (taken as it is, unturned)
            warn_exif_turn(image)


def test_a_cli_object_model_for_a_scene_is_told_to_omit_model(tmp_path):
    """`--model weights/default` was told `MoCAPipeline.from_pretrained(...)`: a Python hint for a CLI user."""
    res = CliRunner().invoke(app, ["generate-scene", str(EXAMPLES / "scene4.png"), "--masks", str(LABELS), "--model",
                                   str(DEFAULT_MODEL_DIR), "--steps", "1", "--device", "cpu", "-o", str(tmp_path / "s.glb")])
    assert isinstance(res.exception, InputError), res.output
    message = str(res.exception)
    assert "object image encoder" in message
    assert "the built-in one: omit --model (Python: MoCAPipeline.from_pretrained(" in message
    assert "\n" not in message and not (tmp_path / "s.glb").exists()


def test_generate_scene_warns_of_an_exif_turn_once_from_the_cli_and_the_api(tmp_path):
    """The warning existed but nothing called it: the CLI and the pipeline now do, the CLI once (it hands the
    pipeline the image read)."""
    from moca3d.defaults import DEFAULT_SCENE_MODEL_DIR
    from moca3d.pipeline import MoCAPipeline

    turned = tmp_path / "turned.jpg"
    exif = Image.Exif()
    exif[ORIENTATION] = 3  # 180°: the sides kept, the masks fit its size
    Image.open(EXAMPLES / "scene4.png").convert("RGB").rotate(180).save(turned, exif=exif.tobytes())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = CliRunner().invoke(app, ["generate-scene", str(turned), "--masks", str(LABELS), "--steps", "8", "--resolution",
                                       "32", "--device", "cpu", "-o", str(tmp_path / "s.glb")])
    assert res.exit_code == 0, res.output
    assert [str(w.message) for w in caught if "EXIF" in str(w.message)] == \
        ["scene image turned.jpg is read turned 180° by its EXIF orientation (as viewers show it): its masks must match the "
         "turned image, not its stored pixels"]
    pipe = MoCAPipeline.from_pretrained(DEFAULT_SCENE_MODEL_DIR)
    with pytest.warns(InputWarning, match="scene image turned.jpg is read turned 180°"):
        pipe.generate_scene(turned, LABELS, steps=1, resolution=16, show_progress=False)  # (its meshes not saved)
