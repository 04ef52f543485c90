"""Image conditioning (DESIGN.md §4): image -> condition tokens for cross-attention.

`ImageEncoder` is a small ViT trained from scratch with the built-in model; real-world weights
use DINOv2 (issue 8). Both take images in [0, 1] and return (B, M, D) tokens.
`preprocess_image` is the one definition of the image preparation shared by training and
inference: alpha -> white background, foreground crop with padding, square, resize.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from PIL import Image, ImageOps, UnidentifiedImageError

from moca3d.errors import ConfigError, InputError, InputWarning
from moca3d.models.lora import add_lora, merge_lora
from moca3d.models.modeling import AtomicSaveMixin
from moca3d.models.vae import LayerNorm32, VecSetBlock

ImageLike = Union[str, Path, Image.Image, np.ndarray]


MIN_IMAGE_SIDE = 8  # px: below this there is no object to crop
BORDER_WHITE = 240  # a border pixel with every channel at least this is background (JPEG noise stays above it)
BORDER_SHARE = 0.5  # warn when more of an alpha-less object image's border than this is not white
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


def load_image(image: ImageLike) -> Image.Image:
    """A PIL image from a path, a PIL image or an (H, W, 3|4) uint8, uint16 or [0, 1] float array; clear error otherwise."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if path.is_dir():
            raise InputError(f"{path} is a folder, not an image")
        if not path.is_file():
            raise InputError(f"image not found: {path}")
        if path.stat().st_size == 0:
            raise InputError(f"cannot read image {path}: the file is empty")
        try:
            with Image.open(path) as im:
                im.load()
                im = ImageOps.exif_transpose(im)  # a copy, upright as a viewer shows it (phones store rotated pixels)
        except UnidentifiedImageError:
            raise InputError(f"cannot read image {path}: not an image format PIL knows (PNG, JPG, WebP, …)") from None
        except Image.DecompressionBombError as err:
            raise InputError(f"cannot read image {path}: too large ({err})") from None
        except OSError as err:
            raise InputError(f"cannot read image {path}: truncated or corrupt ({err})") from None
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise InputError(f"image array must be (H, W, 3|4), got {image.shape}")
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
    else:
        raise InputError(f"unsupported image type {type(image).__name__}")
    if min(im.size) < MIN_IMAGE_SIDE:
        raise InputError(f"image is {im.size[0]}x{im.size[1]} px: at least {MIN_IMAGE_SIDE} px a side is needed")
    return to_8bit(im)


def foreground_box(rgb: np.ndarray, alpha: np.ndarray | None, threshold: int = 250) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of pixels that are opaque (alpha) or not near-white; None if empty."""
    fg = alpha > 127 if alpha is not None else (rgb < threshold).any(axis=2)
    ys, xs = np.nonzero(fg)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def non_white_border(rgb: np.ndarray) -> float:
    """The share of the pixels on an (H, W, 3) image's outer frame (1% of its side, at least 1 px) that are not white."""
    h, w = rgb.shape[:2]
    k = max(1, round(0.01 * min(h, w)))
    frame = np.ones((h, w), dtype=bool)
    frame[k:h - k, k:w - k] = False
    return float((rgb[frame] < BORDER_WHITE).any(axis=-1).mean())


def rgb_on_white(image: ImageLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Image -> (H, W, 3) uint8 RGB composited on white, and its (H, W) alpha if it has one (else None)."""
    im = load_image(image)
    rgba = np.asarray(im.convert("RGBA")).astype(np.float32)
    has_alpha = im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info)
    alpha = rgba[..., 3:] / 255.0
    rgb = rgba[..., :3] * alpha + 255.0 * (1 - alpha)  # composite on white
    return rgb.round().clip(0, 255).astype(np.uint8), rgba[..., 3] if has_alpha else None


def preprocess_image(image: ImageLike, size: int, padding: float = 0.1, box=None) -> torch.Tensor:
    """Image -> (3, size, size) float in [0, 1]: white background, square foreground crop, resize.

    `box` (x0, y0, x1, y1) overrides the detected foreground (scenes crop all masks together).
    """
    rgb8, alpha = rgb_on_white(image)
    if box is None:
        box = foreground_box(rgb8, alpha)
        if box is None:
            raise InputError("the image has no foreground (it is blank or all white)")
        if alpha is None and non_white_border(rgb8) > BORDER_SHARE:
            warnings.warn(BACKGROUND_WARNING, InputWarning, stacklevel=2)
    else:
        x0, y0, x1, y1 = box
        if foreground_box(rgb8[y0:y1, x0:x1], None if alpha is None else alpha[y0:y1, x0:x1]) is None:
            raise InputError("the image is blank (all white or transparent) inside the box of its masks")
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

class ImageEncoder(AtomicSaveMixin, ModelMixin, ConfigMixin):
    """A small ViT: (B, C_in, S, S) images in [0, 1] -> (B, 1 + (S/patch)^2, width) tokens."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 128,
        patch_size: int = 16,
        width: int = 256,
        num_layers: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        if image_size % patch_size:
            raise InputError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, width))
        self.blocks = nn.ModuleList(
            VecSetBlock(width, num_heads, mlp_ratio, self_attention=True, cross_attention=False, eps=1e-6) for _ in range(num_layers)
        )
        self.norm = LayerNorm32(width, eps=1e-6)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def out_dim(self) -> int:
        return self.config.width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C_in, S, S) in [0, 1] -> (B, M, width)."""
        if images.dim() != 4 or images.shape[1] != self.config.in_channels or images.shape[-1] != self.config.image_size:
            raise InputError(
                f"images must be (B, {self.config.in_channels}, {self.image_size}, {self.image_size}), got {tuple(images.shape)}"
            )
        x = self.patch_embed(((images - 0.5) / 0.5).to(self.patch_embed.weight.dtype))  # (B, D, S/p, S/p)
        x = x.flatten(2).transpose(1, 2)  # (B, P, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# -- scene conditioning (DESIGN.md §4): a 7-channel first projection, LoRA fine-tuning ---------------
#
# A scene model's encoder sees, per instance, [instance-masked RGB (3), scene RGB (3), mask (1)]
# (MIDI's recipe). The object encoder's first projection (a patch Conv2d) is widened from 3 to 7
# input channels, the original channels first, and the encoder is then fine-tuned with LoRA.
# The helpers find the projection by attribute path, so they serve the built-in ImageEncoder
# (`patch_embed`) and a transformers `Dinov2Model` (`embeddings.patch_embeddings.projection`) alike,
# bare or inside a wrapper module.

SCENE_CHANNELS = 7  # instance-masked RGB, scene RGB, instance mask
FIRST_PROJECTION_NAMES = ("patch_embed", "embeddings.patch_embeddings.projection")
WIDEN_INITS = ("zero", "clone")


def encode_views(encoder: nn.Module, stacks: torch.Tensor) -> torch.Tensor:
    """Per-instance stacks of V views (K, 7V, S, S) -> each instance's tokens of all its views, in view order
    (K, V*M, D): every view is encoded on its own, by the same encoder (`moca3d.data.scene.scene_conditions`)."""
    K, C = stacks.shape[:2]
    if C % SCENE_CHANNELS:
        raise InputError(f"scene conditions must have a multiple of {SCENE_CHANNELS} channels, got {C}")
    views = C // SCENE_CHANNELS
    pixels = stacks.reshape(K * views, SCENE_CHANNELS, *stacks.shape[2:])  # (K*V, 7, S, S)
    if hasattr(encoder, "normalize_stacks"):  # DINOv2 takes ImageNet-normalised RGB (models/dino.py)
        pixels = encoder.normalize_stacks(pixels)
    tokens = encoder(pixels)  # (K*V, M, D)
    return tokens.reshape(K, views * tokens.shape[1], tokens.shape[2])


def first_projection_path(encoder: nn.Module) -> str:
    """Attribute path of the encoder's first projection: the first Conv2d named like a known patch embedding."""
    for name, module in encoder.named_modules():
        if isinstance(module, nn.Conv2d) and any(name == n or name.endswith("." + n) for n in FIRST_PROJECTION_NAMES):
            return name
    raise ConfigError(f"{type(encoder).__name__}: no first projection Conv2d named {' or '.join(FIRST_PROJECTION_NAMES)}")


def input_channels(encoder: nn.Module) -> int:
    """Number of image channels the encoder takes (3 for objects, 7 for scenes)."""
    return encoder.get_submodule(first_projection_path(encoder)).in_channels


def widen_input_channels(encoder: nn.Module, in_channels: int = SCENE_CHANNELS, init: str = "zero", path: str | None = None) -> nn.Module:
    """Widen the first projection Conv2d (found by `path`, or by name) to `in_channels` inputs, in place.

    The original channels keep their weights and come first. init="zero": the new channels get zero
    weights, so the output for the original channels is unchanged. init="clone": each full group of
    new channels copies the original weights (the scene RGB gets the RGB weights), a remaining partial
    group (the mask) gets their mean over channels. The encoder's channel count in its config (and a
    transformers patch embedding's `num_channels` check) follows.
    """
    if init not in WIDEN_INITS:
        raise ConfigError(f"init must be one of {', '.join(WIDEN_INITS)}, got {init!r}")
    path = path or first_projection_path(encoder)
    old = encoder.get_submodule(path)
    if not isinstance(old, nn.Conv2d):
        raise ConfigError(f"{path} is a {type(old).__name__}, not a Conv2d")
    c_old = old.in_channels
    if in_channels <= c_old:
        raise ConfigError(f"cannot widen {path} from {c_old} to {in_channels} channels")
    new = nn.Conv2d(
        in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation, old.groups,
        bias=old.bias is not None, padding_mode=old.padding_mode,
    ).to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        w = old.weight  # (D, c_old, p, p)
        new.weight.zero_()
        new.weight[:, :c_old] = w
        if init == "clone":
            for start in range(c_old, in_channels, c_old):
                stop = min(start + c_old, in_channels)
                new.weight[:, start:stop] = w if stop - start == c_old else w.mean(dim=1, keepdim=True)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    parent_path, _, child = path.rpartition(".")
    parent = encoder.get_submodule(parent_path) if parent_path else encoder
    setattr(parent, child, new)
    if hasattr(parent, "num_channels"):  # transformers' Dinov2PatchEmbeddings checks its input against it
        parent.num_channels = in_channels
    parts = path.split(".")
    for depth in range(len(parts)):  # the encoder and every module on the way (a wrapped Dinov2Model)
        _set_config_channels(encoder.get_submodule(".".join(parts[:depth])), in_channels)
    return encoder


def _set_config_channels(encoder: nn.Module, in_channels: int) -> None:
    """Record the channel count in a diffusers (`in_channels`) or transformers (`num_channels`) config."""
    config = getattr(encoder, "config", None)
    if isinstance(encoder, ConfigMixin) and "in_channels" in encoder.config:
        encoder.register_to_config(in_channels=in_channels)
    elif config is not None and hasattr(config, "num_channels"):
        config.num_channels = in_channels


def add_encoder_lora(
    encoder: nn.Module, rank: int = 16, alpha: float | None = None, dropout: float = 0.0,
    target_modules: list[str] | None = None, train_projection: bool = True,
) -> nn.Module:
    """Inject peft LoRA into the encoder's linear layers, in place; only LoRA (and the first projection) train.

    `target_modules` defaults to every nn.Linear of the encoder (attention and MLP projections).
    `train_projection` keeps the first projection Conv2d fully trainable: the new channels of a
    widened encoder start at zero (or as copies) and need full-rank updates to learn the mask and
    scene inputs. Every other base weight is frozen.
    """
    full = [first_projection_path(encoder)] if train_projection else []
    return add_lora(encoder, rank, alpha, dropout, target_modules=target_modules, train_full=full)


def merge_encoder_lora(encoder: nn.Module) -> int:
    """Fold the encoder's LoRA adapters into its layers (plain names again, so it saves as an ordinary encoder)."""
    return merge_lora(encoder)
