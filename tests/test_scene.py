"""Scenes (issue 7): mask parsing, 7-channel widening, encoder LoRA, scene fine-tuning and generation, tiny."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image, ImageFilter
from typer.testing import CliRunner

from moca3d.data.images import load_image
from moca3d.data.prepare import PrepareConfig, prepare, procedural_jobs
from moca3d.data.scene import ZOOM_MIN_SIDE, component_masks, load_masks, mask_layout, read_masks, scene_conditions, zoom_conditions
from moca3d.errors import ConfigError, InputError
from moca3d.metrics import evaluate_scene
from moca3d.geometry.inside import QueryConfig
from moca3d.geometry.mesh_io import load_components
from moca3d.geometry.render import RenderConfig
from moca3d.geometry.sampling import SurfaceSamplingConfig
from moca3d.metrics import MetricsConfig
from moca3d.models.image_encoder import (
    ImageEncoder, add_encoder_lora, encode_views, first_projection_path, input_channels, merge_encoder_lora, widen_input_channels,
)
from moca3d.models.lora import is_lora_parameter, within
from moca3d.models.transformer import PRIOR_FREE_MODULES
from moca3d.models.vae import VecSetVAE
from moca3d.pipeline import MoCAPipeline
from moca3d.training.train_dit import DiTTrainConfig, build_models, export_pipeline, train
from moca3d.training.train_vae import encode_dataset

TINY_VAE = dict(num_latents=16, latent_channels=4, width_encoder=32, width_decoder=32, num_attention_heads=4, num_layers_encoder=1, num_layers_decoder=1, embed_frequency=4)
TINY_ENCODER = dict(image_size=32, patch_size=8, width=32, num_layers=1, num_heads=4)
TINY_TRANSFORMER = dict(width=32, num_layers=2, num_heads=4, compression=4)
SMALL_SCENES = (2, 6, 38)  # procedural scenes of stream 2 with 3, 3 and 4 objects
SURFACE_POINTS = 256
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _save(array: np.ndarray, path) -> None:
    Image.fromarray(array.astype(np.uint8)).save(path)


# ----------------------------------------------------------------------------- masks


def test_label_map_gives_one_mask_per_id_in_order(tmp_path):
    labels = np.zeros((20, 30), np.uint8)
    labels[2:6, 3:9] = 7
    labels[10:15, 20:25] = 3
    _save(labels, tmp_path / "labels.png")
    for source in (tmp_path / "labels.png", labels.astype(np.int64)):
        masks = load_masks(source, image_size=(30, 20), max_instances=4)
        assert masks.shape == (2, 20, 30)
        assert masks[0].sum() == 25 and masks[0][12, 22]  # id 3 comes first
        assert masks[1].sum() == 24 and masks[1][3, 4]
        assert read_masks(source)[1] == ["id 3", "id 7"]  # what a generated scene records of each instance
    assert read_masks(Image.fromarray(labels))[1] == ["id 3", "id 7"]
    assert read_masks([labels == 7, labels == 3])[1] == ["mask 0", "mask 1"]  # arrays: their places in the list


def test_folder_masks_natural_order_and_later_mask_wins(tmp_path):
    h, w = 16, 16
    a = np.zeros((h, w), np.uint8)
    a[0:8, 0:8] = 255
    b = np.zeros((h, w), np.uint8)
    b[4:12, 4:12] = 255  # overlaps a on [4:8, 4:8]
    _save(a, tmp_path / "mask_2.png")
    _save(b, tmp_path / "mask_10.png")  # natural order: mask_2 first, mask_10 second
    masks = load_masks(tmp_path, image_size=(w, h))
    assert masks.shape == (2, h, w)
    assert masks[1].sum() == 64 and masks[0].sum() == 64 - 16  # the shared pixels went to the later mask
    assert not (masks[0] & masks[1]).any()
    covered = np.zeros((h, w), np.uint8)
    covered[5:7, 5:7] = 255  # inside mask_10, which comes later
    _save(covered, tmp_path / "mask_3.png")
    with pytest.raises(InputError, match="'mask_3.png' is empty .*covered by a later mask"):
        load_masks(tmp_path)


def test_mask_errors_are_clear(tmp_path):
    labels = np.zeros((20, 30), np.int64)
    labels[:4, :4], labels[5:9, 5:9], labels[10:14, 10:14] = 1, 2, 3
    with pytest.raises(InputError, match="masks are 30x20 but the image is 32x20"):
        load_masks(labels, image_size=(32, 20))
    with pytest.raises(InputError, match="3 masks exceed the model's limit of 2"):
        load_masks(labels, max_instances=2)
    with pytest.raises(InputError, match="no instance"):
        load_masks(np.zeros((8, 8), np.int64))
    with pytest.raises(InputError, match="mask 1 is empty"):
        load_masks([labels == 1, np.zeros((20, 30), bool)])
    folder = tmp_path / "masks"
    folder.mkdir()
    _save(np.full((8, 8), 255), folder / "a.png")
    _save(np.zeros((8, 8)), folder / "b.png")
    with pytest.raises(InputError, match="'b.png' is empty$"):
        load_masks(folder)
    _save(np.full((9, 8), 255), folder / "b.png")
    with pytest.raises(InputError, match="differ in size"):
        load_masks(folder)
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[..., 0] = 200
    _save(colour, tmp_path / "colour.png")
    with pytest.raises(InputError, match="single-channel"):
        load_masks(tmp_path / "colour.png")
    with pytest.raises(InputError, match="masks not found"):
        load_masks(tmp_path / "missing.png")


def test_masks_as_users_save_them(tmp_path):
    """0/1 files and cut-outs (alpha) read as their masks; a JPEG label map and a blank scene are refused."""
    on = np.zeros((16, 16), bool)
    on[4:9, 3:12] = True
    cutout = np.zeros((16, 16, 4), np.uint8)
    cutout[..., :3] = np.random.default_rng(0).integers(0, 256, (16, 16, 3))  # colourful, as a photo cut-out
    cutout[..., 3] = np.where(on, 255, 0)
    black = np.zeros((16, 16, 4), np.uint8)
    black[..., 3] = np.where(on, 200, 0)  # one colour, the instance only in the alpha channel
    for name, array in (("zero_one", on.astype(np.uint8)), ("cutout", cutout), ("black", black)):
        folder = tmp_path / name
        folder.mkdir()
        _save(array, folder / "m.png")
        assert np.array_equal(load_masks(folder)[0], on), name
    labels = np.zeros((16, 16, 4), np.uint8)
    labels[..., :3] = np.where(on, 2, 1)[..., None]  # grey ids 1 and 2, the id-1 pixels transparent
    labels[..., 3] = np.where(on | (np.arange(16) < 2)[None], 255, 0)
    _save(labels, tmp_path / "labels.png")
    masks = load_masks(tmp_path / "labels.png")
    assert masks.shape == (2, 16, 16) and np.array_equal(masks[1], on) and masks[0].sum() == 2 * 16 - (on[:, :2].sum())
    Image.fromarray(np.where(on, 255, 0).astype(np.uint8)).save(tmp_path / "labels.jpg", quality=95)
    with pytest.raises(InputError, match="is a JPEG: lossy compression invents ids"):
        load_masks(tmp_path / "labels.jpg")
    folder = tmp_path / "jpeg"
    folder.mkdir()
    Image.fromarray(np.where(on, 255, 0).astype(np.uint8)).save(folder / "m.jpg", quality=95)
    assert np.array_equal(load_masks(folder)[0], on)  # thresholded binary masks may be JPEGs
    with pytest.raises(InputError, match="blank .* inside the box of its masks"):
        scene_conditions(np.full((16, 16, 3), 255, np.uint8), load_masks(on.astype(np.int64)), size=8)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "m.png").write_text("not a picture")
    with pytest.raises(InputError, match="not an image format"):
        load_masks(tmp_path / "bad")


def test_label_maps_keep_their_ids_in_every_lossless_format(tmp_path):
    """16-bit big-endian and float TIFFs keep ids above 255; lossy WebP and fractional ids are refused."""
    labels = np.zeros((20, 30), np.int64)
    labels[:5, :5], labels[6:10, 6:10], labels[12:, 12:] = 256, 300, 1000
    Image.fromarray(labels.astype(">u2")).save(tmp_path / "big_endian.tif")  # mode I;16B
    Image.fromarray(labels.astype(np.float32)).save(tmp_path / "float.tif")  # mode F
    Image.fromarray((labels > 0).astype(np.uint8) * 7).save(tmp_path / "lossless.webp", lossless=True)
    for name, count in (("big_endian.tif", 3), ("float.tif", 3), ("lossless.webp", 1)):
        masks = load_masks(tmp_path / name)
        assert masks.shape == (count, 20, 30), name
        assert np.array_equal(masks.sum(axis=0), labels > 0), name
    assert np.array_equal(load_masks(tmp_path / "big_endian.tif")[2], labels == 1000)
    Image.fromarray((labels > 0).astype(np.uint8) * 7).save(tmp_path / "lossy.webp", lossless=False, quality=80)
    with pytest.raises(InputError, match="is a lossy WebP: lossy compression invents ids"):
        load_masks(tmp_path / "lossy.webp")
    with pytest.raises(InputError, match="whole-number ids"):
        load_masks(labels + 0.25)
    many = np.zeros((20, 30), np.int64)
    many[0, :6] = np.arange(1, 7)  # six one-pixel ids, as a smoothed edge leaves them
    many[5:15, 5:15] = 7
    with pytest.raises(InputError, match="7 masks exceed the model's limit of 4 instances .6 of them under 16 pixels: was"):
        load_masks(many, max_instances=4)


def test_smoothed_label_maps_are_refused_and_small_instances_kept(tmp_path):
    """A resized or anti-aliased label map invents thin ids along its edges: refused in one line, even under the
    instance limit. Unsmoothed maps with small and thin instances load as they are: the examples and a procedural
    32-object scene (scene 141 of stream 4: an instance of 3 px on the edge between the floor's 0 and id 20)."""
    labels = np.zeros((24, 24), np.uint8)
    labels[4:14, 3:12], labels[8:20, 12:21] = 2, 5
    _save(np.asarray(Image.fromarray(labels).resize((36, 36), Image.BILINEAR)), tmp_path / "resized.png")  # ids 1, 3, 4 invented
    with pytest.raises(InputError, match=r"resized.png looks resized or smoothed: ids such as 1 \(52 px; 3 in all\) .*Image.NEAREST"):
        load_masks(tmp_path / "resized.png", max_instances=50)
    assert len(load_masks(np.asarray(Image.fromarray(labels).resize((36, 36), Image.NEAREST)).astype(np.int64))) == 2
    # ids 1..3, each an instance: upscaled with PIL's default filter, the edge 0|3 gets rings of 1 and 2, which are real
    # ids with pixels inside (no id is edge-only): they were added to instances 1 and 2 silently
    three = np.zeros((48, 64), np.uint8)
    three[8:40, 4:18], three[8:40, 24:38], three[8:40, 44:60] = 1, 2, 3
    upscaled = np.asarray(Image.fromarray(three).resize((128, 96)))
    assert set(np.unique(upscaled)) == {0, 1, 2, 3}
    with pytest.raises(InputError, match=r"looks resized or smoothed: \d+ of its \d+ edge pixels hold an id between"):
        load_masks(upscaled.astype(np.int64))
    scene32 = np.asarray(Image.open(EXAMPLES / "scene32_masks.png"))
    spread = Image.fromarray((scene32 * 7).astype(np.uint8))  # ids 7..224, so that interpolation has room
    for smoothed in (spread.resize((384, 384), Image.BILINEAR), spread.filter(ImageFilter.GaussianBlur(1))):
        with pytest.raises(InputError, match="looks resized or smoothed"):
            load_masks(np.asarray(smoothed).astype(np.int64), max_instances=1000)

    from moca3d.data.procedural import generate_scene
    from moca3d.geometry.mesh_io import normalize_meshes
    from moca3d.geometry.render import floor_plane, render, scene_camera

    asset = generate_scene(4, 141, min_objects=17, max_objects=32)
    meshes, _ = normalize_meshes(asset.meshes)
    config = RenderConfig()  # `moca3d prepare`'s renders
    _, rendered = render(meshes, scene_camera(meshes, config), asset.colors, [(floor_plane(meshes), config.floor_color)], config)
    assert (rendered == 1).sum() == 3 and (scene32 == 29).sum() == 4  # scene32: 4 px along id 15's edge
    for source, labels in ((EXAMPLES / "scene4_masks.png", np.asarray(Image.open(EXAMPLES / "scene4_masks.png"))),
                           (EXAMPLES / "scene32_masks.png", scene32), (rendered.astype(np.int64), rendered)):
        ids = np.unique(labels[labels > 0])
        assert np.array_equal(load_masks(source, max_instances=50), labels[None] == ids[:, None, None])


def test_mask_folders_read_alpha_and_skip_what_is_not_a_mask(tmp_path, monkeypatch):
    """A grey cut-out's and a palette's transparency decide the mask; subfolders are skipped; huge images refused."""
    on = np.zeros((16, 16), bool)
    on[4:9, 3:12] = True
    grey = np.zeros((16, 16, 2), np.uint8)
    grey[..., 0] = np.random.default_rng(0).integers(0, 256, (16, 16))  # a dark-and-light grey object
    grey[..., 1] = np.where(on, 255, 0)
    palette = Image.fromarray(np.where(on, 5, 0).astype(np.uint8), "P")
    palette.putpalette([0, 0, 0] * 5 + [40, 40, 40] + [0] * 750)  # index 5 is dark grey: only transparency tells
    for name, save in (("grey", lambda f: Image.fromarray(grey, "LA").save(f)),
                       ("palette", lambda f: palette.save(f, transparency=0))):
        folder = tmp_path / name
        folder.mkdir()
        save(folder / "m.png")
        (folder / "sub.png").mkdir()  # a folder with an image's name is not a mask
        assert np.array_equal(load_masks(folder)[0], on), name
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses images over twice this
    with pytest.raises(InputError, match="cannot read mask .*m.png: too large"):
        load_masks(tmp_path / "grey")
    with pytest.raises(InputError, match="cannot read image .*m.png: too large"):
        load_image(tmp_path / "grey" / "m.png")


def test_scene_conditions_crop_image_and_masks_together():
    image = np.full((120, 160, 3), 90, np.uint8)  # a grey floor everywhere (no white background)
    image[20:50, 20:50] = [220, 20, 20]  # red instance 1
    image[70:100, 110:140] = [20, 20, 220]  # blue instance 2
    labels = np.zeros((120, 160), np.int64)
    labels[20:50, 20:50], labels[70:100, 110:140] = 1, 2
    x = scene_conditions(image, load_masks(labels), size=32)
    assert x.shape == (2, 7, 32, 32)
    torch.testing.assert_close(x[0, 3:6], x[1, 3:6])  # both see the same scene crop
    for i, colour in ((0, 0), (1, 2)):
        inside = x[i, 6] > 0.99  # the instance's own pixels
        mean = x[i, :3, inside].mean(dim=1)  # (3,) its mean colour in the scene crop
        assert inside.sum() >= 16 and mean[colour] > 0.75 and mean.min() < 0.2  # the mask lies on its colour
        torch.testing.assert_close(x[i, :3, inside], x[i, 3:6, inside])  # masked RGB = scene RGB inside
        assert (x[i, :3, x[i, 6] == 0] == 1).all()  # and white outside


def test_zoomed_views_frame_each_instance():
    """instance_views 2: the first 7 channels are the scene crop's stacks unchanged; the zoomed view of an instance is
    the padded square around it alone (exactly the image there at scale 1), a one-pixel instance is zoomed to
    ZOOM_MIN_SIDE px, and a hidden instance falls back to the scene crop."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    labels = np.zeros((64, 64), np.int64)
    labels[20:30, 20:30], labels[50, 5] = 1, 2  # a 10 px square and a single pixel
    masks = load_masks(labels)
    x = scene_conditions(image, masks, size=16, padding=0.3, views=2)
    assert x.shape == (2, 14, 16, 16)
    torch.testing.assert_close(x[:, :7], scene_conditions(image, masks, size=16, padding=0.3), atol=0, rtol=0)
    # the square's view: side 10 * 1.6 = 16 px from (17, 17), no resampling
    rgb = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(x[0, 10:13], rgb[:, 17:33, 17:33], atol=1e-6, rtol=0)
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[3:13, 3:13] = True
    assert torch.equal(x[0, 13] > 0.5, inside)
    torch.testing.assert_close(x[0, 7:10, inside], x[0, 10:13, inside])  # instance on white = scene inside
    assert (x[0, 7:10, x[0, 13] == 0] == 1).all()
    # the pixel's view: an 8 px square scaled by 2, so the pixel covers about 2 x 2 of the 16 x 16 frame
    assert ZOOM_MIN_SIDE == 8 and 3.0 < float(x[1, 13].sum()) < 5.0 and x[1, 6].sum() < 0.5
    hidden = torch.from_numpy(np.stack([masks[0], np.zeros_like(masks[0])]))  # instance 2 occluded
    z = zoom_conditions(rgb, hidden, 16, padding=0.3)
    assert z[1, 6].abs().sum() == 0  # no mask
    scene = scene_conditions(image, masks[:1], size=16, padding=0.3)[0, 3:6]  # the scene crop (bicubic)
    assert (z[1, 3:6] - scene).abs().mean() < 0.06  # the same crop, resampled bilinearly


def test_encode_views_encodes_each_view_alone():
    encoder = _encoder()
    stacks = torch.rand(3, 14, 32, 32)
    widen_input_channels(encoder, 7)
    with torch.no_grad():
        tokens = encode_views(encoder, stacks)
        torch.testing.assert_close(tokens, torch.cat([encoder(stacks[:, :7]), encoder(stacks[:, 7:])], dim=1), atol=1e-6, rtol=0)
        assert torch.equal(encode_views(encoder, stacks[:, :7]), encoder(stacks[:, :7]))
    with pytest.raises(InputError, match="multiple of 7 channels"):
        encode_views(encoder, stacks[:, :10])


# ----------------------------------------------------------------------------- widening and LoRA


def test_mask_layout_of_known_boxes():
    """Centroid, box and sqrt(area share) in the crop's [-1, 1] frame (pixel centres), exact for a box; soft
    pixels weight the centroid but count in the box; an empty mask gives zeros, visible flag included."""
    S = 8
    masks = torch.zeros(2, 3, S, S)
    masks[0, 0, 2:4, 4:8] = 1.0  # rows 2-3, columns 4-7
    masks[0, 1, 0, 0] = 1.0
    masks[0, 1, 0, 2] = 0.5
    layout = mask_layout(masks)  # (2, 3, 8)
    assert layout.shape == (2, 3, 8)
    centre = lambda i: (i + 0.5) / S * 2 - 1
    expected = [1.0, 0.5, -0.25, centre(4), centre(2), centre(7), centre(3), (8 / 64) ** 0.5]
    torch.testing.assert_close(layout[0, 0], torch.tensor(expected), atol=1e-6, rtol=0)
    cx = (centre(0) * 1.0 + centre(2) * 0.5) / 1.5
    soft = [1.0, cx, centre(0), centre(0), centre(0), centre(2), centre(0), (1.5 / 64) ** 0.5]
    torch.testing.assert_close(layout[0, 1], torch.tensor(soft), atol=1e-6, rtol=0)
    assert torch.equal(layout[0, 2], torch.zeros(8)) and torch.equal(layout[1], torch.zeros(3, 8))
    flipped = mask_layout(masks.flip(-1))[0, 0]  # mirrored in x: x features negate and swap, y unchanged
    torch.testing.assert_close(flipped[[1, 3, 5]], -layout[0, 0, [1, 5, 3]], atol=1e-6, rtol=0)
    torch.testing.assert_close(flipped[[0, 2, 4, 6, 7]], layout[0, 0, [0, 2, 4, 6, 7]], atol=1e-6, rtol=0)


def _encoder() -> ImageEncoder:
    torch.manual_seed(0)
    return ImageEncoder(**TINY_ENCODER).eval()


def test_zero_widening_keeps_rgb_output_and_clone_differs():
    encoder = _encoder()
    rgb = torch.rand(2, 3, 32, 32)
    extra = torch.rand(2, 4, 32, 32)
    with torch.no_grad():
        before = encoder(rgb)
        widen_input_channels(encoder, 7, init="zero")
        assert encoder.config.in_channels == 7 and input_channels(encoder) == 7
        torch.testing.assert_close(encoder(torch.cat([rgb, extra], 1)), before, rtol=0, atol=0)
        original = _encoder().patch_embed
        cloned = widen_input_channels(_encoder(), 7, init="clone")
        w = cloned.patch_embed.weight  # (D, 7, p, p)
        torch.testing.assert_close(w[:, :3], original.weight, rtol=0, atol=0)  # the RGB weights kept
        torch.testing.assert_close(w[:, 3:6], original.weight, rtol=0, atol=0)  # scene RGB starts from them
        torch.testing.assert_close(w[:, 6], original.weight.mean(dim=1), rtol=0, atol=0)  # the mask: their mean
        torch.testing.assert_close(cloned.patch_embed.bias, original.bias, rtol=0, atol=0)
        assert not torch.allclose(cloned(torch.cat([rgb, extra], 1)), before, atol=1e-4)
    with pytest.raises(ConfigError, match="init must be"):
        widen_input_channels(_encoder(), 7, init="random")


def test_widening_finds_the_dinov2_projection():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    tiny = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=28, patch_size=14)
    model = Dinov2Model(Dinov2Config(**tiny)).eval()
    assert first_projection_path(model) == "embeddings.patch_embeddings.projection"
    pixels = torch.rand(1, 3, 28, 28)
    with torch.no_grad():
        before = model(pixel_values=pixels).last_hidden_state
        widen_input_channels(model, 7, init="zero")
        after = model(pixel_values=torch.cat([pixels, torch.rand(1, 4, 28, 28)], 1)).last_hidden_state
    assert model.config.num_channels == 7
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    wrapper = torch.nn.Module()  # as a wrapper module (models/dino.py) holds it
    wrapper.model = Dinov2Model(Dinov2Config(**tiny))
    widen_input_channels(wrapper, 7, init="clone")
    assert wrapper.model.config.num_channels == 7 and input_channels(wrapper) == 7


def test_lora_parameters_are_the_only_trainable_encoder_ones():
    encoder = widen_input_channels(_encoder(), 7)
    x = torch.rand(2, 7, 32, 32)
    with torch.no_grad():
        before = encoder(x)
    add_encoder_lora(encoder, rank=2, train_projection=False)
    trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
    assert trainable and all(is_lora_parameter(n) for n in trainable)
    assert all(not p.requires_grad for n, p in encoder.named_parameters() if not is_lora_parameter(n))
    assert sum("lora_A" in n for n in trainable) == sum(isinstance(m, torch.nn.Linear) for m in _encoder().modules())
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), before)  # LoRA B starts at zero
    encoder.zero_grad()
    encoder(x).square().mean().backward()
    assert all(p.grad is None for n, p in encoder.named_parameters() if not is_lora_parameter(n))
    # with the projection: LoRA plus the widened first projection, nothing else
    other = add_encoder_lora(widen_input_channels(_encoder(), 7), rank=2)
    names = {n for n, p in other.named_parameters() if p.requires_grad and not is_lora_parameter(n)}
    assert names == {"patch_embed.weight", "patch_embed.bias"}
    # merging folds the adapters into plain layers with the same output
    with torch.no_grad():
        for n, p in encoder.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
        adapted = encoder(x)
        assert merge_encoder_lora(encoder) == len(trainable) // 2
        torch.testing.assert_close(encoder(x), adapted, atol=1e-5, rtol=1e-4)
    assert set(encoder.state_dict()) == set(_encoder().state_dict())


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Three tiny procedural scenes with cached latents, and an (untrained) tiny object pipeline to start from."""
    root = tmp_path_factory.mktemp("scenes")
    cfg = PrepareConfig(
        surface=SurfaceSamplingConfig(num_points=SURFACE_POINTS), queries=QueryConfig(num_queries=128),
        render=RenderConfig(size=64, supersample=1), val_fraction=0.0, test_fraction=0.0,
    )
    jobs = [job for i in SMALL_SCENES for job in procedural_jobs("scenes", 1, seed=2, start=i)]
    prepare(jobs, root, cfg, workers=1, progress=False)
    torch.manual_seed(0)
    vae = VecSetVAE(**TINY_VAE).eval()
    vae_dir = root / "vae"
    vae.save_pretrained(vae_dir)
    encode_dataset(root, vae, "test", num_points=SURFACE_POINTS, progress=False)
    recipe = DiTTrainConfig.from_dict(dict(transformer=TINY_TRANSFORMER, image_encoder=TINY_ENCODER))
    obj = root / "object_pipeline"
    export_pipeline(obj, build_models(recipe, (16, 4)), vae_dir)
    return root, obj


def scene_recipe(init_from, steps=2, **kw):
    recipe = dict(condition="scene", init_from=str(init_from), lora_rank=2, steps=steps, batch_size=2, warmup_steps=1, checkpoint_every=1, log_every=1)
    return DiTTrainConfig.from_dict({**recipe, **kw})


def test_scene_finetune_with_transformer_lora_merges_both_adapters(scenes, tmp_path):
    """Scene recipe + transformer LoRA: the encoder's and the transformer's adapters both fold into plain layers."""
    root, obj = scenes
    result = train(root, tmp_path / "run", scene_recipe(obj, steps=1, transformer_lora_rank=2, lr=1e-2), device="cpu", progress=False)
    pipe, start = MoCAPipeline.from_pretrained(result["pipeline"]), MoCAPipeline.from_pretrained(obj)
    for model in (pipe.transformer, pipe.image_encoder):
        assert not any(is_lora_parameter(n) for n in model.state_dict())
    after, before = pipe.transformer.state_dict(), start.transformer.state_dict()
    assert set(after) == set(before) and not torch.equal(after["proj_out.weight"], before["proj_out.weight"])
    frozen = [k for k in before if "norm" in k and not within(k, PRIOR_FREE_MODULES)]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen), "a frozen transformer tensor changed"


def _visible_scene(root):
    """A prepared scene whose every instance shows in the render: its folder and instance count."""
    for folder in sorted((root / "assets").iterdir()):
        if (folder / "mask.png").is_file():
            n = len(trimesh.load(folder / "mesh.glb", file_type="glb").geometry)
            if component_masks(folder / "mask.png", n).any(axis=(1, 2)).all():
                return folder, n
    pytest.fail("every tiny scene hides an instance")


def test_scene_finetune_generate_and_evaluate(scenes, tmp_path):
    root, obj = scenes
    with pytest.raises(ConfigError, match="needs init_from"):
        DiTTrainConfig.from_dict(dict(condition="scene"))
    run = tmp_path / "run"
    first = train(root, run, scene_recipe(obj, steps=1), device="cpu", progress=False)
    assert np.isfinite(first["final_loss"])
    second = train(root, run, scene_recipe(obj, steps=2), device="cpu", progress=False)  # resumes the LoRA state
    assert second["steps"] == 2 and "pipeline" in second
    pipe = MoCAPipeline.from_pretrained(run / "pipeline")
    assert pipe.is_scene_model and pipe.image_encoder.config.in_channels == 7
    assert not any(is_lora_parameter(n) for n in pipe.image_encoder.state_dict())  # LoRA merged on export
    start = MoCAPipeline.from_pretrained(obj)
    assert not torch.equal(pipe.transformer.proj_out.weight, start.transformer.proj_out.weight)  # fine-tuned together

    folder, n = _visible_scene(root)
    out = pipe.generate_scene(folder / "render.png", folder / "mask.png", steps=2, guidance=2.0, seed=1, resolution=16, show_progress=False)
    assert len(out.meshes) == n and out.latents.shape == (n, 16, 4)
    glb = trimesh.load(out.save(tmp_path / "scene.glb"), file_type="glb")
    names = {f"instance_{i:02d}" for i in range(n)}
    assert names <= set(glb.graph.nodes) and not {f"instance_{n:02d}"} & set(glb.graph.nodes)
    again = pipe.generate_scene(folder / "render.png", folder / "mask.png", steps=2, guidance=2.0, seed=1, resolution=16, show_progress=False)
    assert torch.equal(out.latents, again.latents)
    ids = np.unique(np.asarray(Image.open(folder / "mask.png")))
    assert out.settings["instance_masks"] == [f"id {i}" for i in ids[ids != 0]]  # each instance's label id, in the file

    with pytest.raises(InputError, match="object image encoder"):
        start.generate_scene(folder / "render.png", folder / "mask.png", steps=1, show_progress=False)
    many = np.arange(64 * 64).reshape(64, 64) % (pipe.transformer.max_components + 2)
    with pytest.raises(InputError, match="exceed the model's limit"):
        pipe.generate_scene(folder / "render.png", many, steps=1, show_progress=False)

    from moca3d.evaluation import category_of, evaluate_scenes

    report = evaluate_scenes(pipe, root, "train", count=1, steps=1, resolution=16, metric_points=500, progress=False)
    assert report["count"] == 1 and not report["skipped"]
    row = report["scenes"][0]
    assert {"chamfer", "fscore@0.1", "instance_fscore@0.1", "instance_chamfer", "self_iou", "num_empty"} <= set(row)
    assert set(report["mean"]) >= {"fscore@0.1", "instance_fscore@0.1", "self_iou"}
    # the row is the metric of the scene's own generation (same settings and metric seed)
    scene_dir = root / "assets" / row["id"]
    gt, _ = load_components(scene_dir / "mesh.glb")
    masks = component_masks(scene_dir / "mask.png", len(gt))
    meshes = pipe.generate_scene(scene_dir / "render.png", masks, steps=1, seed=0, resolution=16, show_progress=False).meshes
    expected = evaluate_scene(meshes, gt, MetricsConfig(num_points=500, seed=0))
    for key in ("chamfer", "fscore@0.1", "instance_chamfer", "instance_fscore@0.1", "self_iou", "num_empty"):
        assert row[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key
    # each instance's scores, name and mask share; their mean is the scene's instance F-score
    instances = row["instances"]
    assert len(instances) == row["num_gt"] and all(0.0 < i["mask_fraction"] < 1.0 for i in instances)
    assert np.mean([i["fscore@0.1"] for i in instances]) == pytest.approx(row["instance_fscore@0.1"])
    assert sum(i["empty"] for i in instances) == row["num_empty"]
    assert all(i["category"] == category_of(i["name"]) and (i["chamfer"] is None) == i["empty"] for i in instances)
    assert sum(c["count"] for c in report["by_category"].values()) == row["num_gt"]
    # the VAE ceiling: GT instances through the VAE, decoded like a generation
    ceiling = evaluate_scenes(pipe, root, "train", count=1, resolution=16, metric_points=500, progress=False, reconstruct=True)
    assert ceiling["reconstruct"] and ceiling["scenes"][0]["num_gt"] == row["num_gt"]
    assert ceiling["scenes"][0]["num_pred"] == row["num_gt"]
    assert 0.0 <= ceiling["mean"]["fscore@0.1"] <= 1.0 and set(ceiling["mean"]) == set(report["mean"])


def test_scene_metrics_count_an_empty_instance_as_f_zero_and_leave_it_out_of_the_chamfer_mean():
    gt = [trimesh.creation.box(extents=[1, 1, 1]), trimesh.creation.box(extents=[1, 1, 1]).apply_translation([3, 0, 0])]
    row = evaluate_scene([gt[0].copy(), trimesh.Trimesh()], gt, MetricsConfig(num_points=20_000))
    assert row["num_empty"] == 1 and row["num_pred"] == row["num_gt"] == 2
    assert row["instance_fscore@0.1"] == pytest.approx(0.5, abs=0.005)  # (1 + 0) / 2 instances
    assert row["instance_chamfer"] == pytest.approx(row["instances"][0]["chamfer"])  # the mean over the non-empty one
    assert row["instance_chamfer"] < 0.05  # itself: the sampling floor
    assert row["instances"][1] == {"empty": True, "chamfer": None, "fscore@0.1": 0.0, "fscore@0.05": 0.0}
    assert 0.0 < row["fscore@0.1"] < 1.0  # the fused scene misses the second box
    none = evaluate_scene([trimesh.Trimesh(), trimesh.Trimesh()], gt, MetricsConfig(num_points=2000))
    assert none["chamfer"] == float("inf") and none["fscore@0.1"] == 0.0 and none["num_empty"] == 2


def test_evaluation_skips_scenes_with_hidden_instances(scenes, tmp_path):
    import shutil

    from moca3d.evaluation import evaluate_scenes

    root, obj = scenes
    folder, _ = _visible_scene(root)
    copy = tmp_path / "data"
    shutil.copytree(folder, copy / "assets" / folder.name)
    lines = (root / "manifest.jsonl").read_text().splitlines()
    (copy / "manifest.jsonl").write_text("\n".join(line for line in lines if folder.name in line) + "\n")
    labels = np.asarray(Image.open(folder / "mask.png")).copy()
    labels[labels == 1] = 0  # instance 0 hidden behind the others
    _save(labels, copy / "assets" / folder.name / "mask.png")
    with pytest.raises(InputError, match="none of the 1 selected 'train' scenes could be evaluated .every one has an instance hidden"):
        evaluate_scenes(MoCAPipeline.from_pretrained(obj), copy, "train", count=1, steps=1, progress=False)


def test_evaluate_scenes_scores_a_folder_of_predictions(scenes, tmp_path):
    """Another method's scene outputs, instance i for mask i in the scene's frame: the GT itself scores 1 at scene and
    instance level; a scene without one is listed as missing; a wrong instance count is one line; no model loads."""
    import shutil

    from conftest import cli_report
    from typer.testing import CliRunner

    from moca3d.cli import app
    from moca3d.geometry.mesh_io import load_components, save_components

    root, _ = scenes
    folder, n = _visible_scene(root)
    data = tmp_path / "data"  # the visible scene and a second one, which gets no prediction
    other = next(f for f in sorted((root / "assets").iterdir()) if f.is_dir() and f != folder)
    for asset in (folder, other):
        shutil.copytree(asset, data / "assets" / asset.name)
    lines = (root / "manifest.jsonl").read_text().splitlines()
    (data / "manifest.jsonl").write_text("\n".join(line for line in lines if folder.name in line or other.name in line) + "\n")
    preds = tmp_path / "preds"
    meshes, names = load_components(folder / "mesh.glb")
    save_components(preds / f"{folder.name}.glb", meshes, names)
    args = ["evaluate-scenes", str(data), "--split", "train", "--metric-points", "3000", "--predictions", str(preds)]
    report = cli_report(args, tmp_path / "scores.json")
    scored = {row["id"]: row for row in report["scenes"]}
    hidden = [s["id"] for s in report["skipped"]]
    assert folder.name in scored and scored[folder.name]["fscore@0.1"] == 1.0
    assert scored[folder.name]["instance_fscore@0.1"] == pytest.approx(1.0, abs=0.005)  # itself: to the sampling floor
    assert report["missing"] == ([] if other.name in hidden else [other.name]) and "model" not in report
    assert scored[folder.name]["paired_by_name"] is False
    # the same instances, named as the GT's, listed in another order: paired by name, as `evaluate --scene` pairs them
    # (by position they scored instance F 0.33 here while `evaluate --scene` scored the same file 0.89)
    save_components(preds / f"{folder.name}.glb", meshes[::-1], names[::-1])
    reordered = {row["id"]: row for row in cli_report(args, tmp_path / "reordered.json")["scenes"]}[folder.name]
    assert reordered["paired_by_name"] is True
    assert reordered["instance_fscore@0.1"] == pytest.approx(scored[folder.name]["instance_fscore@0.1"], abs=0.005)
    save_components(preds / f"{folder.name}.glb", meshes[:-1], names[:-1])
    short = CliRunner().invoke(app, args)
    assert isinstance(short.exception, InputError)
    assert f"the prediction of {folder.name} has {n - 1} instances, its masks {n}" in str(short.exception)


def test_scene_predictions_keep_an_empty_instance_in_its_place(scenes, tmp_path):
    """A generated scene GLB keeps an empty instance as a node without geometry: read as an empty mesh in its place
    (not dropped, which shifted instance i and refused the count); a zero-area part scores as empty too."""
    import shutil

    from moca3d.evaluation import evaluate_scenes
    from moca3d.geometry.mesh_io import load_components, save_components

    root, _ = scenes
    folder, n = _visible_scene(root)
    data = tmp_path / "data"
    shutil.copytree(folder, data / "assets" / folder.name)
    line = next(x for x in (root / "manifest.jsonl").read_text().splitlines() if folder.name in x)
    (data / "manifest.jsonl").write_text(line + "\n")
    meshes, names = load_components(folder / "mesh.glb")
    flat = trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [2, 0, 0]], [[0, 1, 2]])
    for broken in (trimesh.Trimesh(), flat):  # instance 0: empty (as generate-scene writes it), then zero area
        save_components(tmp_path / "preds" / f"{folder.name}.glb", [broken, *meshes[1:]], names, metadata={"verb": "generate-scene"})
        report = evaluate_scenes(None, data, "train", metric_points=20_000, progress=False, predictions=tmp_path / "preds")
        instances = report["scenes"][0]["instances"]
        assert len(instances) == n and report["missing"] == []
        assert instances[0]["fscore@0.1"] == 0.0 and all(i["fscore@0.1"] > 0.99 for i in instances[1:])  # sampling floor


def test_generate_scene_cli_with_a_mask_folder(scenes, tmp_path):
    from moca3d.cli import app

    root, obj = scenes
    run = tmp_path / "run"
    train(root, run, scene_recipe(obj, steps=1, widen_init="clone"), device="cpu", progress=False)
    folder, n = _visible_scene(root)
    masks = tmp_path / "masks"
    masks.mkdir()
    labels = np.asarray(Image.open(folder / "mask.png"))
    for i in range(n):
        _save((labels == i + 1) * 255, masks / f"instance_{i}.png")
    runner = CliRunner()
    args = ["generate-scene", str(folder / "render.png"), "--masks", str(masks), "-o", str(tmp_path / "s.glb"),
            "--model", str(run / "pipeline"), "--steps", "1", "--resolution", "16", "--device", "cpu"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    nodes = set(trimesh.load(tmp_path / "s.glb", file_type="glb").graph.nodes)
    assert {f"instance_{i:02d}" for i in range(n)} <= nodes
    shown = runner.invoke(app, ["info", str(tmp_path / "s.glb")]).output  # which mask file each instance came from
    assert "masks: " + ", ".join(f"instance_{i:02d} instance_{i}.png" for i in range(n)) in shown
    budget = 20 * n  # --faces at its floor, 20 an instance
    res = runner.invoke(app, args[:-4] + ["--resolution", "32", "--device", "cpu", "--faces", str(budget)])
    assert res.exit_code == 0, res.output
    written = trimesh.load(tmp_path / "s.glb", force="scene")
    assert 0 < sum(len(g.faces) for g in written.geometry.values()) <= budget
    res = runner.invoke(app, args[:6] + ["--model", str(tmp_path / "nowhere"), "--faces", str(budget - 1)])
    assert isinstance(res.exception, ConfigError) and f"--faces {budget - 1} is too few for {n} components" in str(res.exception)
    _save(np.zeros((32, 32)), masks / "instance_99.png")  # a mask of the wrong size
    res = runner.invoke(app, args)
    assert isinstance(res.exception, InputError) and "differ in size" in str(res.exception)


def test_train_scene_cli_dense_baseline_from_a_moca_checkpoint(scenes, tmp_path):
    """--attention-mode dense fine-tunes the MoCA object model as the dense-global baseline (router dropped)."""
    from moca3d.cli import app

    root, obj = scenes
    assert MoCAPipeline.from_pretrained(obj).transformer.config.attention_mode == "moc"
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(scene_recipe(obj, steps=3).to_dict()))
    runner = CliRunner()
    base = ["train-scene", str(root), "--config", str(recipe), "--device", "cpu"]
    res = runner.invoke(app, [*base, "-o", str(tmp_path / "dense"), "--attention-mode", "dense", "--time-limit", "600"])
    assert res.exit_code == 0, res.output
    pipe = MoCAPipeline.from_pretrained(tmp_path / "dense" / "pipeline")
    assert pipe.is_scene_model and pipe.transformer.config.attention_mode == "dense"
    assert not any(".router." in k for k in pipe.transformer.state_dict())
    res = runner.invoke(app, [*base, "-o", str(tmp_path / "bad"), "--attention-mode", "sparse"])
    assert isinstance(res.exception, ConfigError) and "--attention-mode" in str(res.exception)


def test_scene_latent_cache_round_trip_and_training_from_it(scenes, tmp_path):
    """`moca3d cache-latents` of prepared scenes keeps latents, scene crops and instance masks exactly; `train CACHE`
    with a scene recipe follows the same draws as training from the folder; a cache of the other kind is refused."""
    from moca3d.cli import app
    from moca3d.data.scene import SceneLatentDataset
    from moca3d.training.train_dit import LatentDataset

    root, obj = scenes
    cache = tmp_path / "scenes.safetensors"
    res = CliRunner().invoke(app, ["cache-latents", str(root), "-o", str(cache), "--image-size", str(TINY_ENCODER["image_size"])])
    assert res.exit_code == 0, res.output
    data = SceneLatentDataset(root, "train", TINY_ENCODER["image_size"])
    assert f"{len(data)} scenes" in res.output
    back = SceneLatentDataset.from_cache(cache)
    assert back.ids == data.ids and back.token_order == data.token_order
    for name in ("latents", "scenes", "masks"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(data, name), getattr(back, name))), name
    assert torch.equal(back.batch([0, 1])["images"], data.batch([0, 1])["images"])  # (B, N, 7, S, S)
    few = min(z.shape[0] for z in data.latents)
    small = SceneLatentDataset.from_cache(cache, max_components=few)
    assert small.ids == [i for i, z in zip(data.ids, data.latents) if z.shape[0] <= few]
    assert all(len(m) == len(z) for m, z in zip(small.masks, small.latents))
    with pytest.raises(ConfigError, match="cached images are 32 px"):
        SceneLatentDataset.from_cache(cache, image_size=64)
    with pytest.raises(InputError, match="a latent cache of scenes, the recipe trains on objects"):
        LatentDataset.from_cache(cache)
    mixed = tmp_path / "mixed"  # the same split with one record an object: refused, a cache holds one kind
    mixed.mkdir()
    (mixed / "assets").symlink_to((root / "assets").resolve())
    records = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    records[0]["kind"] = "object"
    (mixed / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    res = CliRunner().invoke(app, ["cache-latents", str(mixed), "-o", str(tmp_path / "mixed.safetensors"), "--split", records[0]["split"]])
    assert res.exit_code != 0 and "mixes scenes and objects" in str(res.exception or res.output)
    folder = train(root, tmp_path / "folder", scene_recipe(obj, steps=2), device="cpu", progress=False)
    cached = train(cache, tmp_path / "cached", scene_recipe(obj, steps=2), device="cpu", progress=False)
    assert cached["final_loss"] == pytest.approx(folder["final_loss"], rel=1e-6)
    assert MoCAPipeline.from_pretrained(cached["pipeline"]).is_scene_model


def test_scene_encoder_pretraining_feeds_scene_finetuning(scenes, tmp_path):
    """Scene pre-training: one grid per instance in the scene frame, a 7-channel encoder that train-scene starts from."""
    from moca3d.data.scene import SceneLatentDataset, visible_instances
    from moca3d.training.pretrain_encoder import (
        EncoderPretrainConfig, component_key, load_component_points, load_grid_cache, pretrain_encoder, scene_samples,
        surface_grid,
    )
    from moca3d.training.train_dit import build_scene_models

    root, obj = scenes
    recipe = dict(condition="scene", init_from=str(obj), grid_resolution=8, dilate=1, queries_per_image=64, head_width=32,
                  head_heads=4, steps=3, batch_size=2, warmup_steps=1, val_assets=0, log_every=1, checkpoint_every=2)
    cfg = EncoderPretrainConfig.from_dict(recipe)
    records = []
    folder = pretrain_encoder(cfg, root, tmp_path / "enc", log=records.append)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in records if "loss" in r)

    # pair i: the 7-channel stack of instance j of its scene (its mask in channel 6), keyed by that instance
    data = SceneLatentDataset(root, "train", 32, latents=False)
    samples = scene_samples(data)
    assert not data.latents and len(samples.keys) == sum(len(visible_instances(m)) for m in data.masks)
    assert len(samples.keys) >= 2  # the loop below checks something
    for i, key in enumerate(samples.keys):
        scene_id, j = key.rsplit("#", 1)
        a = data.ids.index(scene_id)
        assert samples.assets[i] == a and component_key(scene_id, int(j)) == key
        torch.testing.assert_close(samples.inputs([i])[0, 6], data.masks[a][int(j)].float() / 255.0, atol=0, rtol=0)

    # the targets: each visible instance's own surface cells, in the shared scene frame (not one grid per scene)
    grids, keys, r = load_grid_cache(tmp_path / "enc" / "grids8.safetensors")
    scene_dir, n = _visible_scene(root)
    points = load_component_points(scene_dir)  # (N, P, 3)
    for j in range(n):
        assert torch.equal(grids[keys.index(component_key(scene_dir.name, j))], surface_grid(points[j], r))
    assert not torch.equal(grids[keys.index(component_key(scene_dir.name, 0))], grids[keys.index(component_key(scene_dir.name, 1))])

    encoder = ImageEncoder.from_pretrained(folder)
    assert input_channels(encoder) == 7  # the object encoder (3 channels) widened, then trained
    widened = widen_input_channels(ImageEncoder.from_pretrained(obj / "image_encoder"), 7, "zero")
    assert not all(torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), widened.state_dict().values()))

    # train-scene: the transformer from the object pipeline, the encoder from pre-training (LoRA on top, zero at start)
    scene_cfg = scene_recipe(obj, image_encoder_from=str(folder))
    model = build_scene_models(scene_cfg, (16, 4))
    merge_encoder_lora(model.image_encoder)
    for name, value in encoder.state_dict().items():
        torch.testing.assert_close(model.image_encoder.state_dict()[name], value, atol=1e-6, rtol=0)
    result = train(root, tmp_path / "run", scene_cfg, device="cpu", progress=False)
    assert result["steps"] == 2 and MoCAPipeline.from_pretrained(tmp_path / "run" / "pipeline").is_scene_model

    # an object recipe still takes its encoder from one place only; an encoder of the wrong width is refused
    with pytest.raises(ConfigError, match="give one"):
        DiTTrainConfig.from_dict(dict(init_from=str(obj), image_encoder_from=str(folder)))
    ImageEncoder(**{**TINY_ENCODER, "width": 48, "in_channels": 7}).save_pretrained(tmp_path / "wide")
    with pytest.raises(ConfigError, match="48-wide tokens"):
        build_scene_models(scene_recipe(obj, image_encoder_from=str(tmp_path / "wide")), (16, 4))
    with pytest.raises(ConfigError, match="not a latent cache"):
        pretrain_encoder(cfg, root, tmp_path / "enc2", cache=tmp_path / "any.safetensors")

    # benchmarks/scene_encoder_eval.py: one row per visible instance, the summary their medians
    from conftest import load_benchmark

    module = load_benchmark("scene_encoder_eval")  # with benchkit importable, whichever tests ran before
    report = module.main([str(root), "--run", str(tmp_path / "enc"), "--split", "train", "--json", str(tmp_path / "eval.json")])
    data = SceneLatentDataset(root, "train", encoder.image_size, latents=False)
    samples = scene_samples(data)  # the pairs pre-training drew from: the benchmark sees the same instances
    assert [component_key(row["scene"], row["instance"]) for row in report["instances"]] == samples.keys
    assert all(0.0 <= row["iou"] <= 1.0 and row["placement_error"] >= 0.0 for row in report["instances"])
    assert report["median"]["iou"] == pytest.approx(float(np.median([row["iou"] for row in report["instances"]])))
    assert json.loads((tmp_path / "eval.json").read_text())["median"] == report["median"]


def test_scene_finetune_with_a_mask_layout_embedding(scenes, tmp_path):
    """`transformer: {layout_features: 8}` adds the mask-layout embedding to a pipeline without one (saved before the
    option existed): the loaded model starts as the original (zero output layer, 1e-5), the embedding trains, and
    generation and diagnosis pass it."""
    import shutil

    from moca3d.training.train_dit import build_scene_models

    root, obj = scenes
    old = tmp_path / "older_pipeline"  # its transformer config.json predates layout_features
    shutil.copytree(obj, old)
    config = json.loads((old / "transformer" / "config.json").read_text())
    del config["layout_features"]
    (old / "transformer" / "config.json").write_text(json.dumps(config))
    obj = old
    recipe = scene_recipe(obj, steps=2, transformer={"layout_features": 8})
    start = build_scene_models(recipe, (16, 4)).transformer.eval()
    plain = MoCAPipeline.from_pretrained(obj).transformer.eval()
    torch.nn.init.normal_(plain.proj_out.weight, std=0.1)  # an untrained pipeline's zero output would hide a difference
    start.proj_out.weight.data.copy_(plain.proj_out.weight)
    g = torch.Generator().manual_seed(0)
    x, t, cond = torch.randn(1, 3, 16, 4, generator=g), torch.rand(1, generator=g), torch.randn(1, 3, 5, plain.config.cond_dim, generator=g)
    ids = plain.sample_ids(1, 3, g)
    with torch.no_grad():
        torch.testing.assert_close(start(x, t, cond, ids=ids, layout=torch.rand(1, 3, 8)), plain(x, t, cond, ids=ids), atol=1e-5, rtol=0)

    result = train(root, tmp_path / "run", recipe, device="cpu", progress=False)
    assert result["steps"] == 2
    pipe = MoCAPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    assert pipe.transformer.config.layout_features == 8 and pipe.transformer.layout_embed.linear_2.weight.abs().sum() > 0
    folder, n = _visible_scene(root)
    cond, layout = pipe.scene_condition(folder / "render.png", folder / "mask.png")
    assert cond.shape[:2] == (1, n) and layout.shape == (1, n, 8) and torch.all(layout[..., 0] == 1)
    out = pipe.generate_scene(folder / "render.png", folder / "mask.png", steps=2, guidance=2.0, seed=1, resolution=16, show_progress=False)
    assert len(out.meshes) == n

    from test_benchmarks import load  # benchmarks/*.py as modules

    report = load("diagnose_model").main([str(root), "--model", str(tmp_path / "run" / "pipeline"), "--count", "1", "--times", "0.9",
                            "--sdedit", "0.5", "--noise", "0", "--steps", "2", "--resolution", "16", "--metric-points", "500"])
    (loss,) = report["condition_use"]
    assert report["scene_model"] and all(np.isfinite(v) for v in loss.values())


def test_scene_finetune_with_zoomed_instance_views(scenes, tmp_path):
    """`transformer: {instance_views: 2}`: training builds each instance's stacks exactly as the pipeline does at
    inference (zoomed views from the full-resolution render), a cache keeps what they need (`--instance-views 2`),
    and the trained pipeline conditions every instance on both views."""
    from moca3d.cli import app
    from moca3d.data.scene import SceneLatentDataset

    root, obj = scenes
    size = TINY_ENCODER["image_size"]
    data = SceneLatentDataset(root, "train", size, views=2)
    folder, n = _visible_scene(root)
    index = data.ids.index(folder.name)
    masks = component_masks(folder / "mask.png", n)
    expected = scene_conditions(folder / "render.png", masks, size, views=2)  # (N, 14, S, S): what inference builds
    got = data.conditions(index)
    torch.testing.assert_close(got[:, 7:], expected[:, 7:], atol=0, rtol=0)  # zoomed views: the same pixels
    torch.testing.assert_close(got[:, :7], expected[:, :7], atol=0.5 / 255 + 1e-6, rtol=0)  # scene crop: stored in 8 bits

    cache = tmp_path / "zoom.safetensors"
    res = CliRunner().invoke(app, ["cache-latents", str(root), "-o", str(cache), "--image-size", str(size), "--instance-views", "2"])
    assert res.exit_code == 0, res.output
    back = SceneLatentDataset.from_cache(cache, views=2)
    assert torch.equal(back.batch([0, 1])["images"], data.batch([0, 1])["images"])  # (B, N, 14, S, S)
    plain = tmp_path / "plain.safetensors"
    SceneLatentDataset(root, "train", size).save_cache(plain)
    with pytest.raises(InputError, match="no full-resolution renders"):
        SceneLatentDataset.from_cache(plain, views=2)

    result = train(cache, tmp_path / "run", scene_recipe(obj, steps=2, transformer={"instance_views": 2}), device="cpu", progress=False)
    pipe = MoCAPipeline.from_pretrained(result["pipeline"])
    assert pipe.transformer.config.instance_views == 2
    cond = pipe.encode_scene(folder / "render.png", folder / "mask.png")
    assert cond.shape[:3] == (1, n, 2 * pipe.image_encoder(torch.rand(1, 7, size, size)).shape[1])
    out = pipe.generate_scene(folder / "render.png", folder / "mask.png", steps=2, guidance=2.0, seed=1, resolution=16, show_progress=False)
    assert len(out.meshes) == n


def test_masks_as_pil_images_or_file_lists_load_like_their_files(tmp_path):
    """A PIL label map raised a raw TypeError; a list of mask files said 'must be a list of arrays'."""
    labels = np.zeros((20, 30), np.uint8)
    labels[2:9, 3:12], labels[10:18, 14:28] = 1, 2
    Image.fromarray(labels).save(tmp_path / "labels.png")
    for k in (1, 2):
        Image.fromarray(((labels == k) * 255).astype(np.uint8)).save(tmp_path / f"m{k}.png")
    expected = load_masks(tmp_path / "labels.png")
    assert np.array_equal(load_masks(Image.open(tmp_path / "labels.png")), expected)
    assert np.array_equal(load_masks([tmp_path / "m1.png", str(tmp_path / "m2.png")]), expected)
    assert np.array_equal(load_masks([Image.open(tmp_path / "m1.png"), Image.open(tmp_path / "m2.png")]), expected)
    with pytest.raises(InputError, match="mask not found: .*m3.png"):
        load_masks([tmp_path / "m1.png", tmp_path / "m3.png"])


def test_binary_masks_of_0_1_saved_as_jpeg_and_low_contrast_ones_load(tmp_path):
    """JPEG noise lifted a 0/1 mask's maximum to 2, which switched the threshold to 127: 'mask is empty'; a 0/100 mask
    was empty too."""
    labels = np.zeros((32, 48), np.uint8)
    labels[4:14, 4:20], labels[16:30, 24:44] = 1, 2
    for folder, scale, ext in (("jpeg01", 1, ".jpg"), ("low", 100, ".png")):
        (tmp_path / folder).mkdir()
        for k in (1, 2):
            Image.fromarray(((labels == k) * scale).astype(np.uint8)).save(tmp_path / folder / f"m{k}{ext}", quality=75)
        masks = load_masks(tmp_path / folder)
        agree = (masks == np.stack([labels == 1, labels == 2])).mean()
        assert masks.shape == (2, 32, 48) and agree > (0.9 if ext == ".jpg" else 0.999), (folder, agree)  # JPEG: lossy at 0/1


def test_masks_mostly_hidden_by_later_ones_warn_and_swapped_sides_are_explained():
    """A cup mask 80% covered by a later table mask passed silently; an EXIF-rotated photo gave a bare size error."""
    from moca3d.errors import InputWarning

    cup, table = np.zeros((20, 30), bool), np.zeros((20, 30), bool)
    cup[2:12, 2:12], table[4:20, 0:30] = True, True  # the table covers 80 of the cup's 100 pixels
    with pytest.warns(InputWarning, match="mask 0 keeps 20% of its pixels: later masks cover the rest"):
        masks = load_masks([cup, table])
    assert masks[0].sum() == 20
    with pytest.raises(InputError, match=r"the masks are 30x20 but the image is 20x30 \(sides swapped: .*EXIF orientation"):
        load_masks([cup, table], image_size=(20, 30))
