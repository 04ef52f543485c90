"""DINOv2 encoder from a local folder: TripoSG preprocessing, token shape, background hook (no network)."""

import numpy as np
import pytest
import torch
from PIL import Image

from moca3d.errors import CheckpointError
from moca3d.models.dino import CROP_SIZE, IMAGENET_MEAN, IMAGENET_STD, DINOv2Encoder, dino_preprocess

PATCH = 14


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=CROP_SIZE, patch_size=PATCH)
    folder = tmp_path_factory.mktemp("dino")
    Dinov2Model(cfg).save_pretrained(folder)
    return folder


def test_preprocess_resize_crop_normalise():
    # 512 x 256 image: left half red, right half blue; shortest side -> 256 keeps 512 x 256, crop the centre 224
    arr = np.zeros((256, 512, 3), dtype=np.uint8)
    arr[:, :256, 0] = 255
    arr[:, 256:, 2] = 255
    x = dino_preprocess(arr)
    assert x.shape == (3, CROP_SIZE, CROP_SIZE)
    red = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x[:, 100, 10], red, atol=1e-4, rtol=0)  # left of the crop is red
    assert x[2, 100, 200] > x[0, 100, 200]  # right of the crop is blue


def test_encoder_tokens_and_background_hook(dino_dir):
    enc = DINOv2Encoder.from_pretrained(dino_dir)
    assert enc.num_tokens == 1 + (CROP_SIZE // PATCH) ** 2 and enc.out_dim == 32
    calls = []

    def remove_background(im):
        calls.append(im.size)
        rgba = im.convert("RGBA")
        rgba.putalpha(0)  # everything is background -> all white
        return rgba

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8))
    tokens = enc.encode([img, img])
    assert tokens.shape == (2, enc.num_tokens, 32)
    # The tokens are the DINOv2 model's last hidden states of the preprocessed image, one image of a batch as alone.
    from transformers import Dinov2Model

    reference = Dinov2Model.from_pretrained(dino_dir).eval()
    other = Image.fromarray(np.random.default_rng(1).integers(0, 255, (200, 320, 3), dtype=np.uint8))
    with torch.no_grad():
        expected = reference(pixel_values=dino_preprocess(other)[None]).last_hidden_state
    torch.testing.assert_close(enc.encode([img, other])[1:], expected, atol=1e-5, rtol=0)
    enc.background_remover = remove_background
    white = enc.encode(img)
    assert calls == [(300, 300)]
    torch.testing.assert_close(white, enc.encode(Image.new("RGB", (300, 300), (255, 255, 255))))
    assert not torch.allclose(white, tokens[:1])


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="config.json missing"):
        DINOv2Encoder.from_pretrained(tmp_path)
