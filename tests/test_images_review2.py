"""Object images from a user walkthrough: off-white and framed backgrounds, very large images, one-colour images,
float TIFFs."""

import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moca3d.data import images
from moca3d.data.images import check_image, foreground_box, load_image, preprocess_image, rgb_on_white
from moca3d.errors import InputError, InputWarning

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SIZE = 64  # the encoder's input side in these tests
CANVAS = 384  # px: the side of the off-white canvases the chair is pasted on
AT = 64  # px: where the chair (256 px) goes on them
# The crops of the project's own renders (white backgrounds, shaded objects), as they were before the off-white rule.
EXAMPLE_BOXES = {"airplane": (16, 109, 240, 183), "chair": (71, 31, 180, 239), "lamp": (41, 62, 193, 180),
                 "shelf": (75, 18, 183, 218), "sofa": (23, 66, 200, 222), "table": (18, 72, 220, 211)}


def chair_on(background: np.ndarray) -> np.ndarray:
    """examples/chair.png's object pixels (its white left out) pasted at (AT, AT) on `background` (H, W, 3)."""
    chair = np.asarray(Image.open(EXAMPLES / "chair.png").convert("RGB"))
    canvas = background.copy()
    where = (chair < 250).any(axis=-1)
    canvas[AT:AT + 256, AT:AT + 256][where] = chair[where]
    return canvas


def quietly(image, size=SIZE) -> torch.Tensor:
    """preprocess_image, failing the test on any warning (the background one above all)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return preprocess_image(image, size)


def near_chair(tensor: torch.Tensor) -> bool:
    """Whether a preprocessed image is the chair cropped as examples/chair.png is (JPEG noise and edges aside)."""
    return (tensor - preprocess_image(EXAMPLES / "chair.png", SIZE)).abs().mean().item() < 0.05


@pytest.mark.parametrize("name", sorted(EXAMPLE_BOXES))
def test_the_projects_renders_crop_as_before(name):
    """White 255 backgrounds: the same box and the same pixels as the fixed 250 threshold gave; no warning."""
    path = EXAMPLES / f"{name}.png"
    rgb, alpha = rgb_on_white(path)
    assert alpha is None and foreground_box(rgb, None) == EXAMPLE_BOXES[name]
    assert torch.equal(quietly(path, 224), preprocess_image(path, 224, box=EXAMPLE_BOXES[name]))
    opaque = Image.open(path).convert("RGBA")  # composited on white: the same pixels as the plain RGB reading
    assert np.array_equal(rgb_on_white(opaque)[0], rgb) and np.array_equal(rgb_on_white(opaque.convert("L"))[0],
                                                                           rgb_on_white(opaque.convert("LA"))[0])


def test_a_white_background_keeps_its_crop_where_light_object_edges_touch_the_border():
    """Pure white (saturated) has no noise below it: light pixels on the border are the object's, and stay so."""
    picture = np.full((CANVAS, CANVAS, 3), 255, np.uint8)
    picture[100:300, :] = 245  # a light grey object cut by the left and right sides, across the whole border there
    picture[150:250, 150:250] = (200, 30, 30)
    assert foreground_box(picture, None) == (0, 100, CANVAS, 300)
    assert torch.equal(quietly(picture), preprocess_image(picture, SIZE, box=(0, 100, CANVAS, 300)))


@pytest.mark.parametrize("level", [240, 245, 249])
def test_an_off_white_background_is_background(tmp_path, level):
    """Paper or a studio backdrop (240-249) passed the border check (no warning) but was all foreground to the crop:
    the whole image was cropped, the object tiny in it, and every part decoded empty."""
    path = tmp_path / "photo.jpg"
    Image.fromarray(chair_on(np.full((CANVAS, CANVAS, 3), level, np.uint8))).save(path)
    x = quietly(path)
    assert near_chair(x) and x[:, 0, 0].min() == 1.0  # cropped to the chair, the backdrop made white
    with pytest.raises(InputError, match="no foreground"):  # a blank sheet of it is blank
        check_image(np.full((64, 64, 3), level, np.uint8))


def test_an_uneven_or_noisy_light_background_is_background():
    """A light backdrop shaded 242-250 across, with sensor noise; and JPEG-like noise on white."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(242, 250, CANVAS)[None, :, None] + rng.normal(0, 1.0, (CANVAS, CANVAS, 3))
    assert near_chair(quietly(chair_on(ramp.round().clip(0, 255).astype(np.uint8))))
    white = np.full((CANVAS, CANVAS, 3), 255) - rng.integers(0, 10, (CANVAS, CANVAS, 3))
    assert near_chair(quietly(chair_on(white.astype(np.uint8))))


def test_a_thin_drawn_frame_is_background():
    """Dark lines all round a white background were foreground: the whole image was the crop."""
    plain = chair_on(np.full((CANVAS, CANVAS, 3), 255, np.uint8))
    for width, colour in ((1, 0), (3, 128), (8, 200)):
        framed = plain.copy()
        framed[:width], framed[-width:], framed[:, :width], framed[:, -width:] = colour, colour, colour, colour
        assert torch.equal(quietly(framed), preprocess_image(plain, SIZE))
    coloured = np.full((CANVAS, CANVAS, 3), (40, 90, 200), np.uint8)  # a coloured background is not a frame
    with pytest.warns(InputWarning, match="most of its border is not white"):
        preprocess_image(chair_on(coloured), SIZE)


def test_one_colour_object_images_are_refused(tmp_path):
    """All black, all grey, a solid colour's JPEG: refused as scenes are, not generated from."""
    for colour in ((0, 0, 0), (128, 128, 128), (200, 30, 30)):
        with pytest.raises(InputError, match=r"the image is blank \(one flat colour, RGB .*\): it shows no object"):
            check_image(Image.new("RGB", (64, 64), colour))
    Image.new("RGB", (64, 64), (30, 60, 90)).save(tmp_path / "solid.jpg")
    with pytest.raises(InputError, match="one flat colour"):
        preprocess_image(tmp_path / "solid.jpg", SIZE)
    with pytest.raises(InputError, match="no foreground"):  # white (and transparent) ones say so, as before
        check_image(Image.new("RGB", (64, 64), (255, 255, 255)))
    flat_with_object = np.zeros((64, 64, 3), np.uint8)
    flat_with_object[20:40, 20:40] = 255  # something on the flat colour: warned about (its background), not refused
    with pytest.warns(InputWarning, match="most of its border is not white"):
        preprocess_image(flat_with_object, SIZE)


def test_a_large_image_is_shrunk_on_reading_without_pils_warning(tmp_path, monkeypatch):
    """PIL printed its DecompressionBombWarning (with its file path) and the whole image was worked on in float: 6 GB.
    An object image over MAX_WORKING_SIDE is reduced by a whole factor first; smaller ones are read as they are."""
    side = 40
    picture = Image.fromarray(chair_on(np.full((CANVAS, CANVAS, 3), 255, np.uint8)))
    picture.resize((side * 3, side * 3)).save(tmp_path / "big.png")
    picture.resize((side * 3, side * 3)).save(tmp_path / "big.jpg")
    monkeypatch.setattr(images, "MAX_WORKING_SIDE", side)
    for name in ("big.png", "big.jpg"):
        assert max(load_image(tmp_path / name, max_side=side).size) <= side
        assert max(rgb_on_white(tmp_path / name, side)[0].shape) <= side
        assert load_image(tmp_path / name).size == (side * 3, side * 3)  # scenes' masks match the image at full size
    assert torch.equal(preprocess_image(tmp_path / "big.png", SIZE),
                       preprocess_image(Image.open(tmp_path / "big.png").reduce(3), SIZE))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", (side * 3) ** 2 - 1)  # PIL warns past this, refuses past twice it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        preprocess_image(tmp_path / "big.png", SIZE)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", (side * 3) ** 2 // 2 - 1)
    with pytest.raises(InputError, match="big.png: too large"):
        load_image(tmp_path / "big.png")


def test_a_palette_image_with_alpha_in_its_palette_is_shrunk_as_composited():
    """Reduced, a palette image's indices would be averaged: it is converted first (its palette's alpha kept)."""
    rgba = np.zeros((90, 90, 4), np.uint8)
    rgba[30:60, 30:60] = (200, 30, 30, 255)
    palette = Image.fromarray(rgba).convert("P")
    rgb, _ = rgb_on_white(palette, 30)
    assert rgb.shape == (30, 30, 3) and tuple(rgb[15, 15]) == (200, 30, 30)
    assert tuple(rgb[0, 0]) == (255, 255, 255)


def float_rgb_tiff(path: Path, side: int = 8) -> None:
    """An uncompressed little-endian RGB TIFF of 32-bit float samples (PIL cannot write one)."""
    data = np.random.default_rng(0).random((side, side, 3), np.float32).tobytes()
    values = 8 + 2 + 11 * 12 + 4  # header, tag count, 11 tags, next-IFD offset; then 3 bit depths, 3 sample formats
    tags = [(256, 4, 1, side), (257, 4, 1, side), (258, 3, 3, values), (259, 3, 1, 1), (262, 3, 1, 2),
            (273, 4, 1, values + 12), (277, 3, 1, 3), (278, 4, 1, side), (279, 4, 1, len(data)), (284, 3, 1, 1),
            (339, 3, 3, values + 6)]  # (tag, type, count, value or offset): 339 SampleFormat, 3 = IEEE float
    header = b"II*\x00" + struct.pack("<IH", 8, len(tags)) + b"".join(struct.pack("<HHII", *tag) for tag in tags)
    path.write_bytes(header + struct.pack("<I6H", 0, 32, 32, 32, 3, 3, 3) + data)


def test_a_float_colour_tiff_is_named_as_such(tmp_path):
    """It was "not an image format PIL knows (PNG, JPG, WebP, …)", though PIL reads TIFFs: not their float colour."""
    float_rgb_tiff(tmp_path / "rgb.tif")
    with pytest.raises(InputError, match=r"rgb.tif: a TIFF of 32-bit floating-point samples") as info:
        load_image(tmp_path / "rgb.tif")
    assert "\n" not in str(info.value) and "format PIL knows" not in str(info.value)
    (tmp_path / "text.tif").write_text("not a TIFF")
    with pytest.raises(InputError, match="not an image format PIL knows"):
        load_image(tmp_path / "text.tif")
