"""DINOv2 image conditioning (DESIGN.md §4) from a local folder, with TripoSG's preprocessing.

Image -> [optional background removal] -> RGB on white -> resize shortest side to 256 (bicubic)
-> centre crop 224 -> ImageNet mean/std -> `transformers.Dinov2Model` -> last hidden states,
(B, 1 + (224/14)^2, hidden) = (B, 257, 1024) for DINOv2-large. Nothing is downloaded.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from moca3d.data.images import ImageLike, load_image
from moca3d.errors import CheckpointError, InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_SHORTEST = 256  # TripoSG's feature extractor: shortest side to 256 ...
CROP_SIZE = 224  # ... then a 224 x 224 centre crop
WHITE = 255

BackgroundRemover = Callable[[Image.Image], Image.Image]


def to_rgb_on_white(image: Image.Image) -> Image.Image:
    """Composite an image with alpha over white; plain RGB passes through."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (WHITE, WHITE, WHITE, WHITE))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def dino_preprocess(image: ImageLike, resize: int = RESIZE_SHORTEST, crop: int = CROP_SIZE,
                    background_remover: Optional[BackgroundRemover] = None) -> torch.Tensor:
    """One image -> (3, crop, crop) normalised pixels, TripoSG's DINOv2 preprocessing."""
    im = load_image(image)
    if background_remover is not None:
        im = background_remover(im)
        if not isinstance(im, Image.Image):
            raise InputError(f"the background remover must return a PIL image, got {type(im).__name__}")
    im = to_rgb_on_white(im)
    w, h = im.size
    scale = resize / min(w, h)
    im = im.resize((max(crop, round(w * scale)), max(crop, round(h * scale))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - crop) // 2, (h - crop) // 2
    im = im.crop((left, top, left + crop, top + crop))
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, crop, crop)
    return imagenet_normalize(x)


def imagenet_normalize(rgb: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1], (..., 3, H, W) -> ImageNet mean/std normalised, as DINOv2 was trained."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=rgb.dtype, device=rgb.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=rgb.dtype, device=rgb.device).view(3, 1, 1)
    return (rgb - mean) / std


def is_dino_folder(folder: Union[str, Path]) -> bool:
    """True for a `transformers` DINOv2 folder (its config.json's model_type), as converted pipelines hold."""
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("model_type") == "dinov2"
    except (OSError, ValueError, AttributeError):  # missing or unreadable file, bad JSON, not a JSON object
        return False


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' own progress bars ("Loading weights", "Writing model shards") off inside, as they were after."""
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            logging.enable_progress_bar()


def load_image_encoder(folder: Union[str, Path]) -> nn.Module:
    """An image encoder folder: DINOv2 for a `transformers` one (`is_dino_folder`, as converted pipelines hold), else the
    small ViT."""
    from moca3d.models.image_encoder import ImageEncoder

    return DINOv2Encoder.from_pretrained(folder) if is_dino_folder(folder) else ImageEncoder.from_pretrained(folder)


def is_dino(encoder: nn.Module) -> bool:
    """True for the DINOv2 wrapper of converted real-weight pipelines (not the small built-in encoder)."""
    return isinstance(encoder, DINOv2Encoder)


class DINOv2Encoder(nn.Module):
    """A local `transformers.Dinov2Model`: images -> condition tokens (B, 1 + patches, hidden)."""

    def __init__(self, model, background_remover: Optional[BackgroundRemover] = None,
                 resize: int = RESIZE_SHORTEST, crop: int = CROP_SIZE):
        super().__init__()
        self.model = model
        self.background_remover = background_remover
        self.resize, self.crop = resize, crop

    @classmethod
    def from_pretrained(cls, folder: Union[str, Path], dtype: Optional[torch.dtype] = None,
                        background_remover: Optional[BackgroundRemover] = None, **kwargs) -> "DINOv2Encoder":
        """Load from a local folder (config.json + weights); never touches the network."""
        from transformers import Dinov2Model

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{folder}: not a DINOv2 folder, config.json missing")
        with quiet_transformers():
            model = Dinov2Model.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype)
        return cls(model.eval(), background_remover, **kwargs)

    def save_pretrained(self, folder: Union[str, Path]) -> None:
        """Write the DINOv2 model as a `transformers` folder (what `from_pretrained` reads)."""
        with quiet_transformers():
            self.model.save_pretrained(folder)

    @property
    def out_dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def image_size(self) -> int:
        """The side of the pixels it takes: the centre crop (scene stacks are built at this size)."""
        return self.crop

    @property
    def num_tokens(self) -> int:
        """1 CLS + (crop / patch)^2 patch tokens (+ registers, if the model has them): 257 for DINOv2-large."""
        registers = getattr(self.model.config, "num_register_tokens", 0) or 0
        return 1 + registers + (self.crop // self.model.config.patch_size) ** 2

    def preprocess(self, images: Union[ImageLike, Sequence[ImageLike]]) -> torch.Tensor:
        """One image or a list -> (B, 3, crop, crop) normalised pixels."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        return torch.stack([dino_preprocess(im, self.resize, self.crop, self.background_remover) for im in images])

    def normalize_stacks(self, stacks: torch.Tensor) -> torch.Tensor:
        """Scene stacks (K, 7, S, S) in [0, 1] -> what forward takes: both RGB groups ImageNet-normalised, the mask as is."""
        instance, scene, mask = stacks[:, :3], stacks[:, 3:6], stacks[:, 6:]
        return torch.cat([imagenet_normalize(instance), imagenet_normalize(scene), mask], dim=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, crop, crop) normalised pixels (C = 3; 7 once widened for scenes) -> (B, M, hidden) last hidden states."""
        channels = self.model.config.num_channels
        if pixels.dim() != 4 or pixels.shape[1] != channels:
            raise InputError(f"pixels must be (B, {channels}, H, W), got {tuple(pixels.shape)}")
        p = next(self.model.parameters())
        device = pixels.device if p.device.type == "meta" else p.device  # offloaded weights: accelerate's hook placed the pixels
        return self.model(pixel_values=pixels.to(device=device, dtype=p.dtype)).last_hidden_state

    @torch.no_grad()
    def encode(self, images: Union[ImageLike, Sequence[ImageLike]]) -> torch.Tensor:
        """Images -> condition tokens (B, M, hidden)."""
        return self(self.preprocess(images))
