"""Image conditioning (DESIGN.md §4): image -> condition tokens for cross-attention.

`ImageEncoder` is a small ViT trained from scratch with the built-in model; real-world weights
use DINOv2 (issue 8). Both take images in [0, 1] and return (B, M, D) tokens.
`preprocess_image` is the one definition of the image preparation shared by training and
inference: alpha -> white background, foreground crop with padding, square, resize.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from PIL import Image, UnidentifiedImageError

from moca3d.errors import InputError
from moca3d.models.vae import LayerNorm32, VecSetBlock

ImageLike = Union[str, Path, Image.Image, np.ndarray]


def load_image(image: ImageLike) -> Image.Image:
    """A PIL image from a path, a PIL image or an (H, W, 3|4) uint8 array; clear error otherwise."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise InputError(f"image not found: {path}")
        try:
            with Image.open(path) as im:
                im.load()
                return im.copy()
        except (UnidentifiedImageError, OSError) as err:
            raise InputError(f"cannot read image {path}: {err.__class__.__name__}") from None
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise InputError(f"image array must be (H, W, 3|4), got {image.shape}")
        return Image.fromarray(image.astype(np.uint8))
    if isinstance(image, Image.Image):
        return image
    raise InputError(f"unsupported image type {type(image).__name__}")


def foreground_box(rgb: np.ndarray, alpha: np.ndarray | None, threshold: int = 250) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of pixels that are opaque (alpha) or not near-white; None if empty."""
    fg = alpha > 127 if alpha is not None else (rgb < threshold).any(axis=2)
    ys, xs = np.nonzero(fg)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def preprocess_image(image: ImageLike, size: int, padding: float = 0.1, box=None) -> torch.Tensor:
    """Image -> (3, size, size) float in [0, 1]: white background, square foreground crop, resize.

    `box` (x0, y0, x1, y1) overrides the detected foreground (scenes crop all masks together).
    """
    im = load_image(image)
    rgba = np.asarray(im.convert("RGBA")).astype(np.float32)
    has_alpha = im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info)
    alpha = rgba[..., 3:] / 255.0
    rgb = rgba[..., :3] * alpha + 255.0 * (1 - alpha)  # composite on white
    rgb8 = rgb.round().clip(0, 255).astype(np.uint8)
    if box is None:
        box = foreground_box(rgb8, rgba[..., 3] if has_alpha else None)
    if box is None:
        raise InputError("the image has no foreground (it is blank or all white)")
    x0, y0, x1, y1 = box
    side = int(round(max(x1 - x0, y1 - y0) * (1 + 2 * padding)))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left, top = int(round(cx - side / 2)), int(round(cy - side / 2))
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(Image.fromarray(rgb8), (-left, -top))
    canvas = canvas.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255.0  # (3, S, S)


class ImageEncoder(ModelMixin, ConfigMixin):
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
        x = self.patch_embed((images - 0.5) / 0.5)  # (B, D, S/p, S/p)
        x = x.flatten(2).transpose(1, 2)  # (B, P, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
