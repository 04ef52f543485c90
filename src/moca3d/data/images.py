"""Images in: loading (paths, PIL images, arrays; 16-bit and float; large ones shrunk), alpha -> white, and
`preprocess_image`, the one definition of the image preparation shared by training and inference: a light background
-> white, foreground crop with padding, square, resize.

Light to import (no diffusers), so the CLI checks an image in a second, before any model loads.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator, Union

import numpy as np
import torch
from PIL import Image, ImageOps, TiffImagePlugin, UnidentifiedImageError

from moca3d.errors import InputError, InputWarning, warn_input

ImageLike = Union[str, Path, Image.Image, np.ndarray, torch.Tensor, bytes, BinaryIO]  # what load_image reads


SCENE_CHANNELS = 7  # a scene condition's stack: instance-masked RGB, scene RGB, instance mask
MIN_IMAGE_SIDE = 8  # px: below this there is no object to crop
MAX_ENLARGEMENT = 4  # an object's crop enlarged more than this to the encoder's size is warned about (a blur)
MAX_WORKING_SIDE = 4096  # px: an object image's longest side at most, shrunk on reading (by a whole factor): the
                         # encoders see a crop of a few hundred px, and more pixels only cost memory and time
BORDER_WHITE = 240  # a border pixel with every channel at least this is light: background (paper, a studio backdrop)
BORDER_SHARE = 0.5  # warn when more of an alpha-less object image's border than this is not light
FOREGROUND_WHITE = 250  # on white, a pixel with a channel below this is the object's (anti-aliasing, JPEG noise above)
BACKGROUND_PERCENTILE = 1  # the light border's noise floor: this percentile of its pixels' darkest channels ...
BACKGROUND_MARGIN = 5  # ... less this many grey levels is the darkest a background pixel gets
FRAME_SHARE = 0.05  # a drawn frame (dark lines all round a light background) this thin (share of a side): background
OPAQUE_MODES = ("1", "L", "RGB", "CMYK")  # PIL modes without alpha, bar a "transparency" entry (palettes may have it)
TIFF_SAMPLE_FORMAT, TIFF_FLOAT = 339, 3  # the TIFF tag of the samples' type, and its value for IEEE floating point
TIFF_BITS_PER_SAMPLE = 258
FLAT_SPREAD = 5  # grey levels: an image whose every channel spans no more is one flat colour (as near-white is 250-255)
BACKGROUND_WARNING = ("the image has no transparency and most of its border is not white: the model expects one object on a "
                      "white or transparent background (render or photo with the background removed, e.g. by rembg), so "
                      "the background is read as part of the object")


def to_8bit(im: Image.Image) -> Image.Image:
    """16/32-bit integer and float greyscale images -> 8-bit 'L' (PIL would clip them to white); others as they are."""
    if im.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return im
    values = np.asarray(im, dtype=np.float64)
    finite = values[np.isfinite(values)]
    top = finite.max() if finite.size else 0.0
    if im.mode == "F":
        scale = 1.0 if top <= 1.0 else 255.0  # floats in [0, 1], or already in [0, 255]
    else:
        scale = 65535.0 if top > 255 else 255.0  # 16-bit data (PIL opens 16-bit PNGs as 'I' or 'I;16')
    return Image.fromarray((np.nan_to_num(values) / scale * 255.0).round().clip(0, 255).astype(np.uint8), "L")


@contextmanager
def readable(path: Path, what: str = "image") -> Iterator[None]:
    """PIL's errors inside, reading `path`, as one-line InputErrors naming it as `what` (image, mask, label map)."""
    try:
        yield
    except UnidentifiedImageError:
        if Path(path).is_file() and Path(path).stat().st_size == 0:
            raise InputError(f"cannot read {what} {path}: the file is empty") from None
        if (bits := float_tiff_bits(path)) is not None:
            raise InputError(f"cannot read {what} {path}: a TIFF of {bits}-bit floating-point samples, which PIL reads "
                             "only as 32-bit greyscale: save it with 8- or 16-bit integer samples") from None
        raise InputError(f"cannot read {what} {path}: not an image format PIL knows (PNG, JPG, WebP, …)") from None
    except Image.DecompressionBombError as err:
        raise InputError(f"cannot read {what} {path}: too large ({err})") from None
    except OSError as err:
        raise InputError(f"cannot read {what} {path}: truncated or corrupt ({err})") from None


def float_tiff_bits(path: Path) -> int | None:
    """The bits of a TIFF's floating-point samples (its first image's), else None (not a TIFF, or integer samples)."""
    try:
        with open(path, "rb") as fp:
            ifd = TiffImagePlugin.ImageFileDirectory_v2(fp.read(8))  # SyntaxError: not a TIFF header
            fp.seek(ifd.next)
            ifd.load(fp)
    except (OSError, SyntaxError, ValueError, KeyError):
        return None
    formats, bits = ifd.get(TIFF_SAMPLE_FORMAT, ()), ifd.get(TIFF_BITS_PER_SAMPLE, ())
    formats = formats if isinstance(formats, tuple) else (formats,)
    bits = bits if isinstance(bits, tuple) else (bits,)
    return int(bits[0]) if TIFF_FLOAT in formats and bits else None


def shrink(im: Image.Image, max_side: int) -> Image.Image:
    """`im` reduced by the smallest whole factor that brings its longer side to at most `max_side` (box filter), or as
    it is when it already fits."""
    factor = math.ceil(max(im.size) / max_side)
    if factor <= 1:
        return im
    if im.mode in ("1", "P", "PA"):  # averaging palette indices or bits makes no colours (a palette may hold alpha)
        im = im.convert("L" if im.mode == "1" else "RGBA")
    return im.reduce(factor)


def load_image(image: ImageLike, max_side: int | None = None) -> Image.Image:
    """A PIL image from a path, an encoded file's bytes or binary file object, a PIL image, an (H, W[, 3|4]) uint8, uint16
    or [0, 1] float array, or a torch tensor laid out as torch's images are, ([1,] 1|3|4, H, W) or (H, W); clear error
    otherwise (a URL too: nothing is downloaded). With `max_side`, a larger
    image is shrunk to it (`shrink`; a JPEG decoded at a reduced scale already)."""
    if isinstance(image, torch.Tensor):  # channels first
        array = image.detach().float().cpu().numpy() if image.is_floating_point() else image.detach().cpu().numpy()
        if array.ndim == 4 and array.shape[0] == 1:
            array = array[0]  # a batch of one
        if array.ndim == 2:
            array = array[None]  # grey (H, W), as a 2-D array is
        if array.ndim != 3 or array.shape[0] not in (1, 3, 4):
            raise InputError(f"an image tensor must be (1|3|4, H, W) (channels first; one image per call), got {tuple(image.shape)}")
        image = np.moveaxis(array, 0, -1)  # (H, W, C)
    if isinstance(image, np.ndarray) and (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1)):
        image = np.repeat(image.reshape(image.shape[:2])[..., None], 3, axis=2)  # grey -> (H, W, 3)
    if isinstance(image, (bytes, bytearray, memoryview)):  # an encoded file's bytes (an upload, a database row)
        image = io.BytesIO(bytes(image))
    if isinstance(image, str) and re.match(r"[A-Za-z][A-Za-z0-9+.-]+://", image):  # a scheme (not a drive letter, C://)
        raise InputError(f"{image}: moca3d reads local files only (no downloads): save the image and give its path")
    source = None
    if isinstance(image, (str, Path)):
        path = source = Path(image)
        if path.is_dir():
            raise InputError(f"{path} is a folder, not an image")
        if not path.is_file():
            raise InputError(f"image not found: {path}")
    elif hasattr(image, "read"):  # a binary file object (open(..., "rb"), io.BytesIO)
        source, path = image, Path(str(getattr(image, "name", "<bytes>")))
    if source is not None:
        with readable(path), warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # ours: shrunk, or refused past PIL's limit
            with Image.open(source) as im:
                if max_side is not None and max(im.size) > max_side:
                    ratio = max_side / max(im.size)  # a JPEG decodes at 1/2, 1/4 or 1/8 scale, no smaller than this
                    im.draft(im.mode, (math.ceil(im.size[0] * ratio), math.ceil(im.size[1] * ratio)))
                im.load()
                if getattr(im, "n_frames", 1) > 1 and im.format != "MPO":  # an animation (a phone's MPO JPEG: a preview)
                    warn_input(f"{path.name} holds {im.n_frames} frames: the first one is used")
                im = ImageOps.exif_transpose(im)  # a copy, upright as a viewer shows it (phones store rotated pixels)
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise InputError(f"image array must be (H, W), (H, W, 3) or (H, W, 4), got {image.shape}")
        if image.dtype.kind == "f":  # [0, 1] floats, as from torchvision or matplotlib
            if not np.isfinite(image).all() or image.min(initial=0.0) < 0.0 or image.max(initial=0.0) > 1.0:
                raise InputError("a float image array must hold finite values in [0, 1]")
            image = image.astype(np.float64) * 255.0
        elif image.dtype == np.uint16:
            image = image / 257.0
        elif image.dtype != np.uint8:
            raise InputError(f"image array must be uint8, uint16 or float in [0, 1], got {image.dtype}")
        im = Image.fromarray(np.round(image).astype(np.uint8))
    elif isinstance(image, Image.Image):
        im = image
    elif isinstance(image, (list, tuple)):
        raise InputError(f"one image per call, got a {type(image).__name__} of {len(image)}: call the pipeline once per image "
                         "(`moca3d generate FOLDER` loads the model once for a folder of them)")
    else:
        raise InputError(f"unsupported image type {type(image).__name__}")
    if min(im.size) < MIN_IMAGE_SIDE:
        raise InputError(f"image is {im.size[0]}x{im.size[1]} px: at least {MIN_IMAGE_SIDE} px a side is needed")
    im = to_8bit(im)
    return im if max_side is None else shrink(im, max_side)


def foreground_box(rgb: np.ndarray, alpha: np.ndarray | None,
                   threshold: int = FOREGROUND_WHITE) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of pixels that are opaque (alpha) or have a channel below `threshold`; None if empty."""
    fg = alpha > 127 if alpha is not None else (rgb < threshold).any(axis=2)
    ys, xs = np.nonzero(fg)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def border_pixels(rgb: np.ndarray) -> np.ndarray:
    """The (N, 3) pixels on an (H, W, 3) image's outer frame, 1% of its shorter side wide (at least 1 px)."""
    h, w = rgb.shape[:2]
    k = max(1, round(0.01 * min(h, w)))
    frame = np.ones((h, w), dtype=bool)
    frame[k:h - k, k:w - k] = False
    return rgb[frame]


def non_white_border(rgb: np.ndarray) -> float:
    """The share of an (H, W, 3) image's outer frame (`border_pixels`) that is not light (BORDER_WHITE)."""
    return float((border_pixels(rgb) < BORDER_WHITE).any(axis=-1).mean())


def frame_width(rgb: np.ndarray) -> int:
    """The width of a frame drawn round an (H, W, 3) image: its outer lines on all four sides darker than BORDER_WHITE
    throughout, up to FRAME_SHARE of the shorter side, with a light border inside them; 0 if there is none."""
    dark = (rgb < BORDER_WHITE).any(axis=-1)
    h, w = dark.shape
    n, most = 0, max(1, round(FRAME_SHARE * min(h, w)))
    while n < most and dark[n].all() and dark[h - 1 - n].all() and dark[:, n].all() and dark[:, w - 1 - n].all():
        n += 1
    return n if n and non_white_border(rgb[n:h - n, n:w - n]) <= BORDER_SHARE else 0


def white_background(rgb: np.ndarray) -> tuple[np.ndarray, int] | None:
    """An alpha-less (H, W, 3) object image on a light background (its border, inside any drawn frame, mostly light:
    white, paper, a studio backdrop) as the model sees it, with the level below which a channel makes a pixel the
    object's; None on another background (BACKGROUND_WARNING).

    The background's colour is the median of the light border pixels. Pure white, the image is as it is and the level
    FOREGROUND_WHITE (a saturated background has no noise below it: darker light pixels are the object's edges).
    Off-white, it is scaled to white, and the level is the light border's noise floor less BACKGROUND_MARGIN (at most
    FOREGROUND_WHITE). A frame is painted white."""
    n = frame_width(rgb)
    h, w = rgb.shape[:2]
    if non_white_border(rgb[n:h - n, n:w - n]) > BORDER_SHARE:
        return None
    light = border_pixels(rgb[n:h - n, n:w - n])
    light = light[(light >= BORDER_WHITE).all(axis=-1)]
    colour = np.median(light, axis=0)
    level = FOREGROUND_WHITE
    if (colour < 255).any():  # off-white: scaled so that it is white, as the model's renders are
        gain = 255.0 / colour
        rgb = (rgb * gain).round().clip(0, 255).astype(np.uint8)
        floor = np.percentile((light * gain).round().clip(0, 255).min(axis=-1), BACKGROUND_PERCENTILE)
        level = int(min(FOREGROUND_WHITE, floor - BACKGROUND_MARGIN))
    if n:
        rgb = rgb.copy()
        rgb[:n], rgb[h - n:], rgb[:, :n], rgb[:, w - n:] = 255, 255, 255, 255
    return rgb, level


def flat_colour(rgb: np.ndarray) -> tuple[int, int, int] | None:
    """The colour of an (H, W, 3) image whose every channel spans at most FLAT_SPREAD levels (blank: all black, all
    grey, ...; a solid colour's JPEG reads back exact), else None."""
    low, high = rgb.min(axis=(0, 1)), rgb.max(axis=(0, 1))
    if (high.astype(np.int16) - low > FLAT_SPREAD).any():
        return None
    return tuple(int(c) for c in (low.astype(np.int16) + high) // 2)


def refuse_flat(rgb: np.ndarray, shows: str) -> None:
    """InputError for an (H, W, 3) image of one flat colour (`flat_colour`): it shows `shows` to condition on."""
    if (colour := flat_colour(rgb)) is not None:
        raise InputError(f"the image is blank (one flat colour, RGB {colour[0]}, {colour[1]}, {colour[2]}): it shows "
                         f"{shows} to condition on")


def rgb_on_white(image: ImageLike, max_side: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Image -> (H, W, 3) uint8 RGB composited on white, and its (H, W) alpha if it has one that is not opaque
    everywhere (else None: an all-opaque alpha, as many exports carry, says nothing of where the object is). With
    `max_side`, a larger image is shrunk to it first (`load_image`)."""
    im = load_image(image, max_side)
    if im.mode in OPAQUE_MODES and "transparency" not in im.info:  # nothing to composite (as fast as it is exact)
        return np.asarray(im.convert("RGB")), None
    rgba = np.asarray(im.convert("RGBA")).astype(np.float32)
    has_alpha = im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info)
    has_alpha = has_alpha and bool((rgba[..., 3] < 255).any())
    alpha = rgba[..., 3:] / 255.0
    rgb = rgba[..., :3] * alpha + 255.0 * (1 - alpha)  # composite on white
    return rgb.round().clip(0, 255).astype(np.uint8), rgba[..., 3] if has_alpha else None


def preprocess_image(image: ImageLike, size: int, padding: float = 0.1, box=None) -> torch.Tensor:
    """Image -> (3, size, size) float in [0, 1]: white background, square foreground crop, resize.

    Without `box`, the object is found by its alpha, else against its light background (`white_background`: white,
    or off-white scaled to white, inside any drawn frame); an image over MAX_WORKING_SIDE is shrunk first. `box`
    (x0, y0, x1, y1) overrides the detected foreground (scenes crop all masks together, at full size). An image blank
    (inside `box`), or one flat colour throughout (`flat_colour`), is refused.
    """
    rgb8, alpha = rgb_on_white(image, MAX_WORKING_SIDE if box is None else None)
    if box is None:
        background = white_background(rgb8) if alpha is None else None
        picture, threshold = background if background is not None else (rgb8, FOREGROUND_WHITE)
        box = foreground_box(picture, alpha, threshold)
        if box is None:
            raise InputError("the image has no foreground (it is blank or all white)")
        refuse_flat(rgb8, "no object")
        rgb8 = picture
        if alpha is None and background is None:
            warn_input(BACKGROUND_WARNING)
        span = max(box[2] - box[0], box[3] - box[1])
        if span * (1 + 2 * padding) * MAX_ENLARGEMENT < size:
            warn_input(f"the object spans only {span} px: the model sees it enlarged to {size} px, a blur; a larger "
                       "picture of it does better")
    else:
        x0, y0, x1, y1 = box
        if foreground_box(rgb8[y0:y1, x0:x1], None if alpha is None else alpha[y0:y1, x0:x1]) is None:
            raise InputError("the image is blank (all white or transparent) inside the box of its masks")
        refuse_flat(rgb8, "nothing of its instances")  # the whole image: a tight box may hold one flat-shaded instance
    x0, y0, x1, y1 = box
    side = int(round(max(x1 - x0, y1 - y0) * (1 + 2 * padding)))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left, top = int(round(cx - side / 2)), int(round(cy - side / 2))
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(Image.fromarray(rgb8), (-left, -top))
    canvas = canvas.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255.0  # (3, S, S)



def check_image(image: ImageLike, box=None) -> None:
    """Refuse (InputError) what `preprocess_image` would refuse, quietly (its warnings come when it runs for real): a
    check before the slow model loading."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)
        preprocess_image(image, 8, box=box)
