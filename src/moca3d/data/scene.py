"""Scene inputs (DESIGN.md §4): instance masks -> per-instance 7-channel conditions.

Masks come as a label map (an image or (H, W) integer array: 0 = background, one id per instance,
instances ordered by increasing id) or as a folder of binary masks (instances ordered by file name,
numbers compared as numbers: mask_2 before mask_10). A label map must be lossless (not JPEG or lossy
WebP) and its ids are taken as they are: 8/16/32-bit grey, palette indices (every non-zero index is
an instance, so a VOC-style 255 'void' border must be set to 0 first) or whole-number floats; one resized or
smoothed by interpolation, whose edges then hold invented ids, is refused (`check_unsmoothed`). A mask
with transparency (an alpha channel or a palette's transparent index) is its alpha. A folder's masks
may overlap: a pixel belongs to the LAST mask that covers it (as when painting a label map in file
order); an instance that loses all its pixels that way is reported as empty. An instance of fewer than
TINY_MASK_PIXELS pixels is kept, with a warning (a stray id of anti-aliasing, or a near-empty mask?). A binary mask
holding a label map's levels (plateaus of several greys) is refused rather than thresholded into one instance
(`check_binary_levels`).

Scene preprocessing: one square crop for the whole scene, around the union of the masks (the same
geometry as `preprocess_image` with an explicit box), then per instance i the stack
[scene RGB outside instance i turned white (3), scene RGB (3), mask of i (1)]: (N, 7, S, S).
Masks are resized by area averaging, so an instance smaller than a pixel keeps a soft trace.
`mask_layout` sums each cropped mask up as 8 numbers (centroid, box, size) for a transformer with
`layout_features`: where the instance sits in the image, handed to its tokens directly.

A transformer with `instance_views` = 2 also sees each instance up close: a second 7-channel stack
of the same kind, cropped from the full-resolution image around that instance alone (a padded
square, as an object image is cropped), so a small instance fills the frame instead of a few
pixels of it: (N, 14, S, S), each view encoded on its own and their tokens concatenated.
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps

from moca3d.data.dataset import (SCENE_CACHE, check_latent_lengths, common_encoder, common_token_order, load_cached_latents, load_latent_cache, pad_components, read_manifest,
                                 report_missing_latents, report_too_many_parts, save_latent_cache, PARTS_OPTION)
from moca3d.data.images import SCENE_CHANNELS, ImageLike, load_image, preprocess_image, readable, rgb_on_white
from moca3d.errors import ConfigError, InputError, InputWarning, warn_input
from moca3d.geometry.mesh_io import component_names

SCENE_PADDING = 0.1  # crop margin around the union of the masks, as a fraction of its size
MAX_HIDDEN_SHARE = 0.5  # warn when later masks cover more than this share of a mask
LOW_RANGE_MAX = 8  # a binary mask whose levels stay at or below this is a 0/1 one (JPEG noise adds a few)
MASK_THRESHOLD = 127  # a binary mask pixel is on above this grey level
INSTANCE_VIEWS = (1, 2)  # the scene crop alone, or with a crop zoomed on the instance
ZOOM_MIN_SIDE = 8  # px of the full-resolution image: the smallest square a zoomed view crops
MASK_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
RAW_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # PIL modes whose values are the ids
SLIVER_PIXELS = 16  # an instance this small in a label map with too many ids hints at smoothed edges
# warn about an instance of fewer pixels (full resolution, after overlaps): a speck a stray anti-aliased id or a near-empty
# mask leaves; it stays an instance (real occluded ones get that small: examples/scene32's id 29 keeps 4 px, so no warning)
TINY_MASK_PIXELS = 4
TINY_MASK_WARNING = r"mask .* covers only"  # the start of its warning (`tiny_masks_quiet`)
# a label map looks resized or smoothed when this share of its edge pixels (at least SLIVER_PIXELS of them) hold an id
# between a lower and a higher neighbour's, as interpolated edges do (unsmoothed procedural scenes: under 0.07 at 64 px)
SMOOTHED_EDGE_SHARE = 0.1
# a binary mask is refused as a label map (`check_binary_levels`) when it holds at most LABEL_MAP_MAX_LEVELS grey levels (one
# per instance; soft, anti-aliased or JPEG masks hold ~70-256) and at least three plateaus: levels whose flat pixels (3x3 of
# that level alone: not an edge) cover LEVEL_PLATEAU_SHARE of the image, one of them farther than LEVEL_NOISE of the
# plateaus' range from the darkest and the brightest (JPEG leaves plateaus at 1 and 254 of a 0/255 mask). 17 of
# examples/scene32's 32 ids keep over 0.1% flat (one is enough); a wide blur (radius 15% of the side) keeps plateaus too,
# but holds over 200 levels
LABEL_MAP_MAX_LEVELS = 64
LEVEL_PLATEAU_SHARE = 0.001
LEVEL_NOISE = 0.1
# EXIF orientations (`load_image` turns an image file upright by them) and what each does; 2-4 keep the sides as they are
EXIF_TURNS = {2: "mirrored", 3: "turned 180°", 4: "flipped upside down", 5: "mirrored and turned 90°",
              6: "turned 90° clockwise", 7: "mirrored and turned 90°", 8: "turned 90° anticlockwise"}
SIDE_KEEPING_TURNS = (2, 3, 4)

MasksLike = Union[str, Path, Image.Image, np.ndarray, Sequence[Union[np.ndarray, Image.Image, str, Path]]]


# ----------------------------------------------------------------------------- parsing


def _natural_key(name: str) -> list:
    """Sort key comparing digit runs as numbers: mask_2 < mask_10."""
    return [int(tok) if tok.isdigit() else tok.lower() for tok in re.split(r"(\d+)", name)]


def _lossy_format(im: Image.Image, path: Path) -> str | None:
    """'JPEG' or 'lossy WebP' when the file's compression is lossy (fine for binary masks, not label ids)."""
    if im.format == "JPEG":
        return "JPEG"
    if im.format != "WEBP":
        return None
    with open(path, "rb") as f:  # RIFF chunks after the 12-byte header: 'VP8 ' is lossy, 'VP8L' lossless
        f.seek(12)
        while len(header := f.read(8)) == 8:
            tag, size = header[:4], int.from_bytes(header[4:], "little")
            if tag in (b"VP8 ", b"VP8L"):
                return "lossy WebP" if tag == b"VP8 " else None
            f.seek(size + (size & 1), 1)
    return None


def warn_exif_turn(image: ImageLike) -> None:
    """Warn (InputWarning, one line) when a scene image file is read turned by an EXIF orientation that keeps its sides
    (any turn of a square image; 180° or a mirror of any image): masks drawn on its stored pixels then fit its size and
    silently misalign (a turn that swaps the sides is caught by `check_masks`' size check)."""
    if not isinstance(image, (str, Path)):
        return  # `load_image` turns files only: an image or array given is taken as it is
    path = Path(image)
    if not path.is_file():
        return  # `load_image` names a missing file
    with readable(path):
        with Image.open(path) as im:
            orientation, (w, h) = im.getexif().get(ExifTags.Base.Orientation, 1), im.size
    if orientation not in EXIF_TURNS or (orientation not in SIDE_KEEPING_TURNS and w != h):
        return
    warn_input(f"scene image {path.name} is read {EXIF_TURNS[orientation]} by its EXIF orientation (as viewers show it): "
               "its masks must match the turned image, not its stored pixels")


def _read_gray(path: Path, binary: bool = False) -> np.ndarray:
    """(H, W) array of a single-channel image: label ids, palette indices or grey levels.

    With transparency (alpha, or a palette's transparent index) a binary mask (`binary`) is its alpha:
    255 where opaque. A label map's transparent pixels read as 0 and its visible ones as their ids,
    or as 255 for a cut-out (visible pixels of one colour, or in colour).
    """
    kind = "mask" if binary else "label map"
    with readable(path, kind):
        with Image.open(path) as im:
            im.load()
            if not binary and (lossy := _lossy_format(im, path)):
                raise InputError(f"label map {path} is a {lossy}: lossy compression invents ids at the edges; save it as PNG")
            im = ImageOps.exif_transpose(im)  # upright, as the scene image is read
            if binary and im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")
            alpha = np.asarray(im.getchannel("A")) if "A" in im.getbands() else None
            if alpha is None and im.mode in RAW_MODES:
                values = np.asarray(im)
                return values.astype(np.float64 if values.dtype.kind == "f" else np.int64)
            rgb = np.asarray(im.convert("RGB")).astype(np.int64)  # (H, W, 3)
    grey = (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])  # (H, W)
    if alpha is not None and alpha.min() < 255:
        visible = alpha > MASK_THRESHOLD
        if binary or not grey[visible].all() or len(np.unique(rgb[visible][:, 0])) <= 1:
            return np.where(visible, 255, 0)
        return np.where(visible, rgb[..., 0], 0)
    if not grey.all():
        raise InputError(f"{kind} {path} must be single-channel (grey or label ids), not colour")
    return rgb[..., 0]


def _binary(gray: np.ndarray, name: str) -> np.ndarray:
    """(H, W) grey levels of mask `name` -> bool mask (`check_binary_levels` first): on above 0.5 for 0/1 images (up to
    LOW_RANGE_MAX: a 0/1 JPEG's noise), else above MASK_THRESHOLD or half the brightest level, whichever is lower (a
    low-contrast 0/100 mask)."""
    check_binary_levels(gray, name)
    top = float(gray.max(initial=0))
    return gray > (0.5 if top <= LOW_RANGE_MAX else min(MASK_THRESHOLD, top / 2))


def _neighbourhood(values: np.ndarray, reduce) -> np.ndarray:
    """(H, W): `reduce` (np.minimum or np.maximum) over each pixel's 3x3 neighbourhood (edges repeated), columns then rows."""
    padded = np.pad(values, 1, mode="edge")
    cols = reduce(reduce(padded[:-2], padded[1:-1]), padded[2:])  # (H, W + 2)
    return reduce(reduce(cols[:, :-2], cols[:, 1:-1]), cols[:, 2:])


def _grey_levels(gray: np.ndarray, most: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(H, W) grey levels -> their distinct values (L,), ascending, and, when L <= `most` (at most 256), each pixel's
    index among them (H, W) uint8 (else None): compact for 3x3 windows. 8/16-bit ones by histogram, quicker than sorting."""
    if gray.dtype.kind in "iu" and gray.size and gray.min() >= 0 and gray.max() < 2 ** 16:
        levels = np.flatnonzero(np.bincount(gray.ravel()))
        if len(levels) > most or len(levels) <= 2:  # (two levels: a plain binary mask, no index needed)
            return levels, None
        lookup = np.zeros(int(levels[-1]) + 1, np.uint8)
        lookup[levels] = np.arange(len(levels))
        return levels, lookup[gray]
    levels, index = np.unique(gray, return_inverse=True)
    return levels, index.reshape(gray.shape).astype(np.uint8) if len(levels) <= most else None


def check_binary_levels(gray: np.ndarray, name: str) -> None:
    """Refuse (one-line InputError) a binary mask that looks like a label map: few grey levels (at most
    LABEL_MAP_MAX_LEVELS), three or more of them plateaus, one between the darkest and the brightest beyond JPEG noise.

    Thresholded, such a map would silently become one instance. Anti-aliased edges and JPEG ringing hold their
    in-between levels along edges (no plateau); a soft or blurred mask holds too many levels. See LEVEL_PLATEAU_SHARE.
    """
    if gray.dtype == bool:
        return
    levels, index = _grey_levels(gray, LABEL_MAP_MAX_LEVELS)
    if index is None or len(levels) <= 2:
        return
    flat = _neighbourhood(index, np.minimum) == _neighbourhood(index, np.maximum)  # (H, W): inside a plateau
    counts = np.bincount(index[flat], minlength=len(levels))  # (L,) flat pixels of each level
    plateaus = levels[counts >= max(LEVEL_PLATEAU_SHARE * gray.size, SLIVER_PIXELS)]
    if len(plateaus) < 3:
        return
    noise = LEVEL_NOISE * (plateaus[-1] - plateaus[0])
    if not ((plateaus > plateaus[0] + noise) & (plateaus < plateaus[-1] - noise)).any():
        return
    shown = ", ".join(f"{v:g}" for v in levels[:5]) + (", ..." if len(levels) > 5 else "")
    raise InputError(f"mask {name} holds {len(levels)} grey levels ({shown}), not a binary mask's two: a label map? pass "
                     "it alone as the masks (--masks FILE), not among binary masks (a trimap or a half-transparent "
                     "region: save it as 0/255)")


def check_unsmoothed(labels: np.ndarray, name: str = "the label map") -> None:
    """Refuse a label map whose resized or smoothed (anti-aliased) edges invented ids (one-line InputError).

    Interpolation leaves, along the edges between instances, ids between theirs: thin slivers that would become
    instances of their own, or rings added to real instances of those ids (a map upscaled with PIL's default filter).
    The map is refused when at least SMOOTHED_EDGE_SHARE of its edge pixels hold an id between a lower and a higher
    neighbour's. Small instances of an unsmoothed map pass: the share stays low (a thin instance among others is a few
    pixels of many: 0.013 for examples/scene32_masks.png; smoothed or resized maps measured 0.15-0.32).
    """
    below = _neighbourhood(labels, np.minimum) < labels  # a lower id among the 8 neighbours
    above = _neighbourhood(labels, np.maximum) > labels  # a higher one
    between, edge = int((below & above).sum()), below | above
    if between < SLIVER_PIXELS or between < SMOOTHED_EDGE_SHARE * edge.sum():
        return
    thin = np.setdiff1d(np.unique(labels[edge & (labels != 0)]), np.unique(labels[~edge]))  # ids with no inner pixel
    seen = (f"ids such as {thin[0]} ({int((labels == thin[0]).sum())} px; {len(thin)} in all) appear only along the edges "
            "between other ids" if len(thin) else f"{between} of its {int(edge.sum())} edge pixels hold an id between their "
            "neighbours'")
    raise InputError(f"{name} looks resized or smoothed: {seen}, where interpolation invents them; resize label maps with "
                     "nearest-neighbour (PIL Image.NEAREST) and save them unsmoothed (real instances that thin: pass binary "
                     "masks in a folder)")


def _label_map(labels: np.ndarray, max_instances: int | None, name: str = "the label map") -> tuple[np.ndarray, list[str]]:
    """(H, W) label map -> (N, H, W) bool, one mask per non-zero id in increasing order (checked: `check_unsmoothed`), and
    each instance's id ("id 7")."""
    if labels.ndim != 2:
        raise InputError(f"a label map must be (H, W), got {labels.shape}")
    if labels.dtype.kind == "f":
        if not np.isfinite(labels).all() or (labels != np.round(labels)).any():
            raise InputError("a label map must hold whole-number ids, not fractions (was it resized or smoothed?)")
        labels = labels.astype(np.int64)
    ids, counts = np.unique(labels, return_counts=True)
    if ids[0] < 0:
        raise InputError(f"{name} holds negative ids (e.g. {int(ids[0])}): 0 is the background and each instance a positive id")
    counts = counts[ids != 0]
    ids = ids[ids != 0]
    if max_instances is not None and len(ids) > max_instances:  # before an (N, H, W) stack of a depth map's size
        slivers = int((counts < SLIVER_PIXELS).sum())
        hint = f" ({slivers} of them under {SLIVER_PIXELS} pixels: was the label map smoothed or anti-aliased?)" if slivers else ""
        _check_count(len(ids), max_instances, hint)
    check_unsmoothed(labels, name)  # under the limit, smoothed edges would become instances of their own
    return labels[None] == ids[:, None, None], [f"id {int(i)}" for i in ids]  # (N, H, W)


def resolve_overlaps(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> the same with each pixel kept only in the last mask that covers it."""
    if masks.sum(axis=0, dtype=np.int32).max(initial=0) <= 1:
        return masks
    later = np.flip(np.cumsum(np.flip(masks, 0), axis=0, dtype=np.int32), 0)  # (N, H, W): masks i..N-1 on the pixel
    return masks & (later == 1)


def _folder_masks(folder: Path) -> tuple[np.ndarray, list[str]]:
    """Binary masks of a folder, in natural file-name order: (N, H, W) bool and the file names."""
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in MASK_EXTENSIONS and not p.name.startswith(".") and p.is_file()),
                   key=lambda p: (_natural_key(p.name), p.name))
    if not files:
        raise InputError(f"mask folder {folder} holds no images ({', '.join(MASK_EXTENSIONS)})")
    arrays = [_read_gray(p, binary=True) for p in files]
    odd = next((i for i, a in enumerate(arrays) if a.shape != arrays[0].shape), None)
    if odd is not None:  # named by file: in the demo the folder is a temporary one
        (h0, w0), (h1, w1) = arrays[0].shape, arrays[odd].shape
        raise InputError(f"the masks differ in size: {files[0].name} is {w0}x{h0}, {files[odd].name} is {w1}x{h1}")
    return np.stack([_binary(a, f"'{p.name}'") for p, a in zip(files, arrays)]), [p.name for p in files]


def load_masks(masks: MasksLike, image_size: tuple[int, int] | None = None, max_instances: int | None = None) -> np.ndarray:
    """Masks -> (N, H, W) bool, checked: a label map (path, PIL image or (H, W) int array), a folder, or binary masks.

    Binary masks ((N, H, W) bool array, a list of (H, W) arrays, PIL images or paths, or a folder) overlap-resolve with
    the later mask winning. `image_size` (W, H) must match; N must be 1..max_instances; no mask may be empty.
    """
    return read_masks(masks, image_size, max_instances)[0]


def read_masks(masks: MasksLike, image_size: tuple[int, int] | None = None,
               max_instances: int | None = None) -> tuple[np.ndarray, list[str] | None]:
    """`load_masks`, with where each instance's mask came from: its label id ("id 7"), its file's name, or its place
    in a list or stack of binary masks given as arrays or images ("mask 0")."""
    names: list[str] | None = None
    if masks is None:
        raise InputError("no masks given: a label map, a folder of binary masks or a list of them")
    if isinstance(masks, torch.Tensor):  # a label map (H, W) or binary masks (N, H, W)
        masks = masks.detach().cpu().numpy()
    if isinstance(masks, Image.Image):  # a label map read by the caller
        masks = np.asarray(masks if masks.mode in RAW_MODES else masks.convert("L"))
    elif isinstance(masks, (list, tuple)) and masks and all(isinstance(m, (str, Path)) for m in masks):  # binary mask files
        missing = next((m for m in masks if not Path(m).is_file()), None)
        if missing is not None:
            raise InputError(f"mask not found: {missing}")
        names = [Path(m).name for m in masks]
        masks = [_read_gray(Path(m), binary=True) for m in masks]
    if isinstance(masks, (str, Path)):
        path = Path(masks)
        if path.is_dir():
            stack, names = _folder_masks(path)
        elif path.is_file():
            stack, names = _label_map(_read_gray(path), max_instances, f"label map {path}")
        else:
            raise InputError(f"masks not found: {path}")
    elif isinstance(masks, np.ndarray) and masks.ndim == 2:
        if masks.dtype == bool:
            raise InputError("a single (H, W) bool mask is ambiguous: pass a list of masks or an integer label map")
        stack, names = _label_map(masks if masks.dtype.kind == "f" else masks.astype(np.int64), max_instances)
    else:
        arrays = [np.asarray(m) for m in masks]
        if not arrays or any(a.ndim != 2 for a in arrays) or len({a.shape for a in arrays}) > 1:
            raise InputError("binary masks must be a non-empty list (or stack) of equally sized (H, W) arrays, images or files; "
                             f"got {type(masks).__name__}")
        files = names is not None  # read from their files above: named by them, else by their places in the list
        names = names or [f"mask {i}" for i in range(len(arrays))]
        stack = np.stack([_binary(a, f"'{n}'" if files else f"{i}") for i, (a, n) in enumerate(zip(arrays, names))])
    return check_masks(stack, image_size, max_instances, names), names


def _check_count(n: int, max_instances: int, hint: str = "") -> None:
    """Refuse more instances than the model has ids for."""
    if n > max_instances:
        raise InputError(f"{n} masks exceed the model's limit of {max_instances} instances{hint}")


@contextmanager
def tiny_masks_quiet() -> Iterator[None]:
    """`check_masks`' tiny-mask warning silenced: for masks already read, and warned of by their ids or file names, that
    the pipeline checks again as a positional stack (or test scenes whose small visible instances are what they are)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=TINY_MASK_WARNING, category=InputWarning)
        yield


def check_masks(masks: np.ndarray, image_size: tuple[int, int] | None = None, max_instances: int | None = None,
                names: list[str] | None = None) -> np.ndarray:
    """Validate (N, H, W) bool masks (count, size, emptiness; warned: mostly hidden, tiny) after resolving overlaps;
    returns them."""
    n, h, w = masks.shape
    if n == 0:
        raise InputError("the masks hold no instance (a label map needs non-zero ids)")
    if max_instances is not None:
        _check_count(n, max_instances)
    if image_size is not None and (w, h) != tuple(image_size):
        turned = (" (sides swapped: an image with an EXIF orientation is read turned, as viewers show it; turn the masks "
                  "alike)") if (h, w) == tuple(image_size) else ""
        raise InputError(f"the masks are {w}x{h} but the image is {image_size[0]}x{image_size[1]}{turned}")

    def label(i: int) -> str:  # "mask 3", "mask id 7" or "mask 'chair.png'"
        if not names or names[i] == f"mask {i}":
            return f"{i}"
        return names[i] if names[i].startswith("id ") else f"'{names[i]}'"

    for stage, note in ((masks, ""), (resolve_overlaps(masks), " (every pixel is covered by a later mask)")):
        empty = np.flatnonzero(~stage.any(axis=(1, 2)))
        if len(empty):
            raise InputError(f"mask {label(empty[0])} is empty{note}")
    kept = stage.sum(axis=(1, 2)) / masks.sum(axis=(1, 2))  # (N,) share of each mask its instance keeps
    hidden = np.flatnonzero(kept < 1 - MAX_HIDDEN_SHARE)
    if len(hidden):  # later masks win overlaps (documented); most of one lost is likely a mistake in the masks
        i = hidden[0]
        warn_input(f"mask {label(i)} keeps {kept[i]:.0%} of its pixels: later masks cover the rest (overlaps go to the later "
                   f"mask; {len(hidden)} mask(s) keep under {1 - MAX_HIDDEN_SHARE:.0%})")
    pixels = stage.sum(axis=(1, 2))  # (N,) what each instance keeps
    tiny = np.flatnonzero(pixels < TINY_MASK_PIXELS)
    if len(tiny):  # used as it is (an occluded instance gets that small), but its mesh rests on a speck
        i, count = tiny[0], int(pixels[tiny[0]])
        warn_input(f"mask {label(i)} ({component_names('instance', n)[i]}) covers only {count} pixel{'s' * (count != 1)}: a stray id left by "
                   f"anti-aliasing or a near-empty mask? remove it if it is no instance ({len(tiny)} mask(s) under "
                   f"{TINY_MASK_PIXELS} pixels)")
    return stage


# ----------------------------------------------------------------------------- conditions


def union_box(masks: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) around every pixel of (N, H, W) masks."""
    ys, xs = np.nonzero(masks.any(axis=0))
    if len(xs) == 0:
        raise InputError("the masks are all empty")
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def square_crop(box: tuple[int, int, int, int], padding: float) -> tuple[int, int, int]:
    """(left, top, side) of the padded square around `box`: the crop `preprocess_image` makes for it."""
    x0, y0, x1, y1 = box
    side = int(round(max(x1 - x0, y1 - y0) * (1 + 2 * padding)))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return int(round(cx - side / 2)), int(round(cy - side / 2)), side


def crop_masks(masks: np.ndarray, box: tuple[int, int, int, int], size: int, padding: float = SCENE_PADDING) -> torch.Tensor:
    """(N, H, W) bool -> (N, size, size) soft masks in [0, 1] (area average, 8-bit), cropped like the image."""
    left, top, side = square_crop(box, padding)
    out = []
    for m in masks:
        canvas = Image.new("L", (side, side), 0)
        canvas.paste(Image.fromarray(m.astype(np.uint8) * 255), (-left, -top))
        out.append(np.asarray(canvas.resize((size, size), Image.BOX)))
    return torch.from_numpy(np.stack(out)).float() / 255.0  # (N, S, S)


def stack_conditions(scene: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Scene (3, S, S), or one per instance (N, 3, S, S), and soft masks (N, S, S) -> (N, 7, S, S):
    [instance on white, scene, mask]."""
    scenes = scene if scene.dim() == 4 else scene[None].expand(len(masks), -1, -1, -1)  # (N, 3, S, S)
    m = masks[:, None]  # (N, 1, S, S)
    instance = scenes * m + (1.0 - m)  # (N, 3, S, S): white outside the instance, as object renders
    return torch.cat([instance, scenes, m], dim=1)  # (N, 7, S, S)


def scene_inputs(image: ImageLike, masks: np.ndarray, size: int, padding: float = SCENE_PADDING) -> tuple[torch.Tensor, torch.Tensor]:
    """Scene image and (N, H, W) masks -> cropped scene (3, S, S) and soft masks (N, S, S)."""
    box = union_box(masks)
    return preprocess_image(image, size, padding, box=box), crop_masks(masks, box, size, padding)


def _crop_square(x: torch.Tensor, square: tuple[int, int, int], size: int) -> torch.Tensor:
    """(C, H, W) -> (C, size, size): the square (left, top, side), zero outside the image, resized (antialiased)."""
    left, top, side = square
    H, W = x.shape[-2:]
    x0, y0, x1, y1 = max(left, 0), max(top, 0), min(left + side, W), min(top + side, H)
    canvas = x.new_zeros(x.shape[0], side, side)
    if x1 > x0 and y1 > y0:
        canvas[:, y0 - top: y1 - top, x0 - left: x1 - left] = x[:, y0:y1, x0:x1]
    return F.interpolate(canvas[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def _instance_boxes(masks: torch.Tensor) -> list:
    """(N, H, W) bool -> each mask's (x0, y0, x1, y1), None for an empty one (one host transfer for all of them)."""
    def extent(on: torch.Tensor) -> torch.Tensor:  # (N, K) bool -> (N, 2): first and one past the last True
        k = torch.arange(on.shape[1], device=on.device)
        return torch.stack([torch.where(on, k, on.shape[1]).amin(1), torch.where(on, k, -1).amax(1) + 1], dim=1)

    xs, ys = extent(masks.any(dim=1)), extent(masks.any(dim=2))  # columns, rows
    return [(x0, y0, x1, y1) if x1 > x0 else None for (x0, x1), (y0, y1) in zip(xs.tolist(), ys.tolist())]


def zoom_conditions(image: torch.Tensor, masks: torch.Tensor, size: int, padding: float = SCENE_PADDING) -> torch.Tensor:
    """Full-resolution image (3, H, W) in [0, 1] and (N, H, W) bool masks -> each instance's zoomed view
    (N, 7, S, S): `stack_conditions` of a padded square around the instance alone (at least ZOOM_MIN_SIDE px);
    an empty (occluded) instance gets the scene crop around all the masks."""
    boxes = _instance_boxes(masks)
    shown = [b for b in boxes if b is not None]
    if not shown:
        raise InputError("the masks are all empty")
    union = (min(b[0] for b in shown), min(b[1] for b in shown), max(b[2] for b in shown), max(b[3] for b in shown))
    scene_square = square_crop(union, padding)  # the scene crop's square (`union_box` of the masks)
    ink = torch.cat([1.0 - image.float(), torch.zeros_like(image[:1], dtype=torch.float32)])  # (4, H, W): white -> 0
    views = []
    for m, box in zip(masks, boxes):
        square = scene_square
        if box is not None:
            left, top, side = square_crop(box, padding)
            grow = max(ZOOM_MIN_SIDE - side, 0)
            square = (left - grow // 2, top - grow // 2, side + grow)
        ink[3] = m.float()
        views.append(_crop_square(ink, square, size))
    crops = torch.stack(views).clamp(0.0, 1.0)  # (N, 4, S, S)
    return stack_conditions(1.0 - crops[:, :3], crops[:, 3])


def check_views(views: int) -> None:
    """A one-line error unless `views` is a known number of views per instance."""
    if views not in INSTANCE_VIEWS:
        raise ConfigError(f"instance views must be one of {INSTANCE_VIEWS}, got {views}")


def scene_conditions(image: ImageLike, masks: np.ndarray, size: int, padding: float = SCENE_PADDING, views: int = 1) -> torch.Tensor:
    """Scene image and (N, H, W) masks -> per-instance encoder inputs (N, 7 * views, S, S) in [0, 1]:
    the scene crop's stacks, then (views = 2) the zoomed ones of `zoom_conditions`."""
    check_views(views)
    image = load_image(image)  # read once for both views
    stacks = stack_conditions(*scene_inputs(image, masks, size, padding))  # (N, 7, S, S)
    if views == 1:
        return stacks
    rgb = torch.from_numpy(rgb_on_white(image)[0].copy()).permute(2, 0, 1).float() / 255.0  # (3, H, W)
    return torch.cat([stacks, zoom_conditions(rgb, torch.from_numpy(masks), size, padding)], dim=1)  # (N, 14, S, S)


def mask_layout(masks: torch.Tensor) -> torch.Tensor:
    """Soft masks (..., S, S) in [0, 1] -> each mask's layout (..., 8) in the crop's [-1, 1] frame:
    [visible, centroid x, centroid y, box x0, y0, x1, y1, sqrt(area share)]; all zero for an empty mask."""
    S = masks.shape[-1]
    w = masks.float()
    mass = w.sum(dim=(-2, -1))  # (...)
    visible = mass > 0
    coords = (torch.arange(S, dtype=w.dtype, device=w.device) + 0.5) / S * 2 - 1  # pixel centres, (S,)
    safe = mass.clamp_min(1e-12)
    cx = (w.sum(dim=-2) * coords).sum(-1) / safe  # columns: x
    cy = (w.sum(dim=-1) * coords).sum(-1) / safe  # rows: y (down)

    def extent(profile: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        on = profile > 0  # (..., S)
        lo = torch.where(on, coords, torch.full_like(coords, 2.0)).amin(-1)
        hi = torch.where(on, coords, torch.full_like(coords, -2.0)).amax(-1)
        return lo, hi

    x0, x1 = extent(w.amax(dim=-2))
    y0, y1 = extent(w.amax(dim=-1))
    area = (mass / (S * S)).sqrt()
    out = torch.stack([visible.to(w.dtype), cx, cy, x0, y0, x1, y1, area], dim=-1)  # (..., 8)
    return out * visible[..., None].to(w.dtype)


def conditions_layout(stacks: torch.Tensor) -> torch.Tensor:
    """Stacks (..., 7 * views, S, S) of `scene_conditions` -> `mask_layout` of the scene crop's mask channel (..., 8)."""
    return mask_layout(stacks[..., SCENE_CHANNELS - 1, :, :])


# ----------------------------------------------------------------------------- prepared scenes


def visible_instances(masks: torch.Tensor) -> torch.Tensor:
    """Indices of the instances whose (cropped, soft) mask in (N, S, S) keeps at least one non-zero pixel."""
    return torch.nonzero(masks.flatten(1).amax(1) > 0)[:, 0]


def _labels_of(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool (disjoint) -> (H, W) uint8 label map, id i + 1 for instance i (the inverse of `component_masks`)."""
    labels = np.zeros(masks.shape[1:], dtype=np.uint8)
    for i, m in enumerate(masks):
        labels[m] = i + 1
    return labels


def component_masks(label_path: str | Path, num_components: int) -> np.ndarray:
    """(N, H, W) bool from a prepared mask.png, where id i+1 is component i (an occluded one is all False)."""
    labels = _read_gray(Path(label_path))
    return labels[None] == np.arange(1, num_components + 1)[:, None, None]


class SceneLatentDataset:
    """Latents (N, L, C) and per-instance conditions of the prepared scenes of a split, in memory.

    Each scene keeps its cropped render (3, S, S) and soft instance masks (N, S, S) as 8-bit tensors;
    `batch` builds the 7-channel stacks. An instance hidden in the render (an all-zero mask) stays in
    the scene: its condition is the scene RGB alone. With `views` = 2 each scene also keeps its
    full-resolution render (3, H, W) and label map (H, W) (8-bit), and the stacks get each instance's
    zoomed view (`zoom_conditions`), built per batch.
    """

    def __init__(self, root: str | Path, split: str, image_size: int, max_components: int = 32, padding: float = SCENE_PADDING,
                 latents: bool = True, views: int = 1, parts_option: tuple[str, str] = PARTS_OPTION):
        """`latents=False`: the conditions alone (no cached latents needed, `self.latents` stays empty); `parts_option` as
        LatentDataset's."""
        check_views(views)
        self.root = Path(root)
        self.padding, self.views = padding, views
        self.latents: list[torch.Tensor] = []
        self.scenes: list[torch.Tensor] = []  # (3, S, S) uint8
        self.masks: list[torch.Tensor] = []  # (N, S, S) uint8
        self.renders: list[torch.Tensor] = []  # (3, H, W) uint8, views = 2 only
        self.labels: list[torch.Tensor] = []  # (H, W) uint8: id i + 1 = instance i, views = 2 only
        self.ids: list[str] = []
        orders, encoders, missing, too_many = set(), set(), [], []
        for rec in read_manifest(root, split):
            asset = self.root / "assets" / rec["id"]
            path = asset / "latents.safetensors"
            n = rec["num_components"]
            if rec.get("kind") != "scene":
                continue
            if n > max_components:
                too_many.append(rec["id"])
                continue
            if latents and not path.is_file():
                missing.append(rec["id"])
                continue
            masks = component_masks(asset / "mask.png", n)
            if not masks.any():
                continue
            render = load_image(asset / "render.png")  # read once for both views
            scene, soft = scene_inputs(render, masks, image_size, padding)
            if latents:
                z, made = load_cached_latents(path)
                self.latents.append(z)
                orders.add(made["token_order"])
                encoders.add(made["encoder"])
            self.scenes.append((scene * 255).round().to(torch.uint8))
            self.masks.append((soft * 255).round().to(torch.uint8))
            if views == 2:
                self.renders.append(torch.from_numpy(rgb_on_white(render)[0].copy()).permute(2, 0, 1))
                self.labels.append(torch.from_numpy(_labels_of(masks)))
            self.ids.append(rec["id"])
        too_many_note = report_too_many_parts(too_many, len(self.ids), root, f"'{split}' scenes", max_components, parts_option)
        if not self.ids:
            hint = " (run `moca3d prepare --procedural scenes` and `moca3d encode-dataset`)" if missing or not too_many else ""
            raise InputError(f"{root}: no '{split}' scenes with cached latents{hint}{too_many_note}")
        report_missing_latents(missing, root, split)
        check_latent_lengths(self.latents, root)
        self.token_order = common_token_order(orders, root)  # VecSetVAE.encode's token_order
        self.encoder = common_encoder(encoders, root)  # the VAE encoder's id (None: not recorded)

    def __len__(self) -> int:
        return len(self.ids)

    def save_cache(self, path: str | Path) -> Path:
        """One safetensors file of the split (`moca3d cache-latents`): latents, 8-bit scene crops and instance masks
        (and with `views` = 2 the full-resolution renders and label maps)."""
        if not self.latents:
            raise InputError(f"{self.root}: this dataset was read without latents, there is nothing to cache")
        full = {"renders": torch.stack(self.renders), "labels": torch.stack(self.labels)} if self.views == 2 else {}
        return save_latent_cache(path, SCENE_CACHE, self.latents, self.ids, self.token_order, self.encoder,
                                 images=torch.stack(self.scenes), masks=torch.cat(self.masks), **full)  # (A, 3, S, S), (sum N, S, S)

    @classmethod
    def from_cache(cls, path: str | Path, max_components: int = 32, image_size: int | None = None, views: int = 1,
                   padding: float = SCENE_PADDING) -> "SceneLatentDataset":
        """A dataset from `save_cache`'s file (scenes with more than `max_components` instances left out)."""
        cache = load_latent_cache(path, SCENE_CACHE, max_components, image_size)
        if views == 2 and "renders" not in cache:
            raise InputError(f"{path}: this scene cache has no full-resolution renders for zoomed instance views:"
                             " write it again with `moca3d cache-latents --instance-views 2`")
        self = cls.__new__(cls)
        self.root = Path(path).parent
        self.padding, self.views = padding, views
        self.latents, self.scenes, self.masks = cache["latents"], cache["images"], cache["masks"]
        self.renders, self.labels = (cache["renders"], cache["labels"]) if views == 2 else ([], [])
        self.ids, self.token_order, self.encoder = cache["ids"], cache["token_order"], cache["encoder"]
        return self

    def to(self, device) -> "SceneLatentDataset":
        """Move every latent, scene crop, mask (and full-resolution render and label map) to `device`."""
        for name in ("latents", "scenes", "masks", "renders", "labels"):
            setattr(self, name, [x.to(device) for x in getattr(self, name)])
        return self

    def conditions(self, index: int, instances: Sequence[int] | None = None) -> torch.Tensor:
        """The stacks (K, 7 * views, S, S) of scene `index`'s instances (default: all of them, K = N)."""
        pick = slice(None) if instances is None else list(instances)
        stacks = stack_conditions(self.scenes[index].float() / 255.0, self.masks[index][pick].float() / 255.0)
        if self.views == 1:
            return stacks
        labels = self.labels[index]
        ids = torch.arange(1, len(self.masks[index]) + 1, device=labels.device)
        full = labels[None] == ids[:, None, None]  # (N, H, W)
        zoom = zoom_conditions(self.renders[index].float() / 255.0, full, stacks.shape[-1], self.padding)
        return torch.cat([stacks, zoom[pick]], dim=1)  # (K, 14, S, S)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Pad to the largest instance count: latents (B, N, L, C), component_mask (B, N), images (B, N, 7 * views, S, S)."""
        latents, mask = pad_components([self.latents[i] for i in indices])
        images, _ = pad_components([self.conditions(i) for i in indices])  # (B, N, 7 * views, S, S)
        return {"latents": latents, "component_mask": mask, "images": images}
