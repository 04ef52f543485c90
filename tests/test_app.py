"""The web demo (`moca3d demo`): upload checks, the part limit, and one generation clicked through in headless Chromium."""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no network calls

import socket
from pathlib import Path
from urllib.parse import urlparse

import gradio as gr
import pytest
import torch
import trimesh
from PIL import Image
from typer.testing import CliRunner

from moca3d import app as demo_app
from moca3d.errors import ConfigError
from moca3d.models.vae import VecSetVAE
from moca3d.pipeline import MoCAPipeline
from moca3d.training.train_dit import DiTTrainConfig, build_models, export_pipeline

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package, installed by scripts/setup.sh
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # the browser's own services resolve no host either
]
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "chair.png"
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
MAX_PARTS = 8  # the tiny model's ID codebook: its part limit
PARTS = 3
STEPS = 2
RESOLUTION = 16
PAGE_TIMEOUT_MS = 30_000
GENERATION_TIMEOUT_MS = 60_000
TINY_VAE = dict(num_latents=16, latent_channels=4, width_encoder=32, width_decoder=32, num_attention_heads=4, num_layers_encoder=1, num_layers_decoder=1, embed_frequency=4)
TINY_RECIPE = dict(
    transformer=dict(width=32, num_layers=2, num_heads=4, compression=4, id_codebook_size=MAX_PARTS),
    image_encoder=dict(image_size=32, patch_size=8, width=32, num_layers=1, num_heads=4),
)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A real pipeline folder of tiny untrained models, written by the export step of `moca3d train`."""
    root = tmp_path_factory.mktemp("tiny_model")
    torch.manual_seed(0)
    VecSetVAE(**TINY_VAE).save_pretrained(root / "vae")
    model = build_models(DiTTrainConfig.from_dict(TINY_RECIPE), (TINY_VAE["num_latents"], TINY_VAE["latent_channels"]))
    return export_pipeline(root / "pipeline", model, root / "vae")


@pytest.fixture(scope="module")
def generator(pipeline_dir, tmp_path_factory):
    """The demo's event handler over the tiny pipeline."""
    pipe = MoCAPipeline.from_pretrained(pipeline_dir)
    return demo_app.DemoGenerator(pipe, resolution=RESOLUTION, output_dir=tmp_path_factory.mktemp("demo_out"))


def _error_of(generator, image, parts=PARTS) -> str:
    """The one-line gr.Error message the handler raises for this upload."""
    with pytest.raises(gr.Error) as info:
        generator.generate(image, parts, steps=1)
    message = info.value.message
    assert "\n" not in message and message
    return message


def test_bad_uploads_get_one_line_errors(generator, tmp_path, monkeypatch):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert "not a PNG, JPEG or WebP image" in _error_of(generator, text)
    gif = tmp_path / "anim.gif"
    Image.new("RGB", (8, 8), (200, 0, 0)).save(gif)
    assert "not a PNG, JPEG or WebP image" in _error_of(generator, gif)
    big = tmp_path / "big.png"
    big.write_bytes(EXAMPLE.read_bytes())
    with big.open("r+b") as fh:
        fh.truncate(demo_app.MAX_UPLOAD_BYTES + 1)  # a PNG with trailing bytes past the limit
    assert f"the limit is {demo_app.MAX_UPLOAD_MB} MB" in _error_of(generator, big)
    monkeypatch.setattr(demo_app, "MAX_PIXELS", 100)
    assert "megapixels" in _error_of(generator, EXAMPLE)
    monkeypatch.undo()
    blank = tmp_path / "blank.png"
    Image.new("RGB", (32, 32), (255, 255, 255)).save(blank)
    assert "no foreground" in _error_of(generator, blank)  # the pipeline's own image error, passed through
    assert "upload an image first" in _error_of(generator, None)
    assert "exceed the model's limit" in _error_of(generator, EXAMPLE, parts=MAX_PARTS + 1)


def test_handler_writes_a_glb_with_named_parts(generator):
    viewer, download, summary = generator.generate(EXAMPLE, PARTS, seed=1, steps=STEPS)
    assert viewer == download and Path(download).parent == generator.output_dir
    assert _part_nodes(download) == {f"part_{i:02d}" for i in range(PARTS)}
    assert summary.startswith(f"{PARTS} parts")


def test_parts_slider_matches_the_model_limit(pipeline_dir, tmp_path):
    demo = demo_app.build_app(pipeline_dir, device="cpu", resolution=RESOLUTION, output_dir=tmp_path)
    slider = next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "num-parts")
    assert slider.maximum == MAX_PARTS == MoCAPipeline.from_pretrained(pipeline_dir).transformer.max_components
    assert slider.minimum == 1 and slider.value == demo_app.DEFAULT_PARTS


def test_missing_builtin_model_names_the_fix(tmp_path, monkeypatch):
    from moca3d.cli import app

    monkeypatch.setattr(demo_app, "DEFAULT_MODEL_DIR", tmp_path / "default")
    with pytest.raises(ConfigError, match="--model PATH .*moca3d train-default --install"):
        demo_app.resolve_model(None)
    help_text = CliRunner().invoke(app, ["demo", "--help"]).output
    assert "--model" in help_text and "--port" in help_text and "127.0.0.1" in help_text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _part_nodes(glb: Path) -> set:
    scene = trimesh.load(glb, file_type="glb")
    return {name for name in scene.graph.nodes if name.startswith("part_")}


@pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # gradio's own pandas deprecations
@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing: install Debian's chromium (scripts/setup.sh does)")
def test_browser_generates_and_downloads_parts(pipeline_dir, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    port = _free_port()
    demo = demo_app.launch(
        pipeline_dir, port=port, device="cpu", prevent_thread_lock=True, resolution=RESOLUTION, default_steps=STEPS,
        output_dir=tmp_path / "outputs",
    )
    outside = []  # requests to anything but the local server: there must be none

    def local_only(route):
        if urlparse(route.request.url).hostname in LOCAL_HOSTS or route.request.url.startswith(("data:", "blob:")):
            return route.continue_()
        outside.append(route.request.url)
        return route.abort()

    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(accept_downloads=True)
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            page.route("**/*", local_only)
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            page.locator("#input-image input[type='file']").set_input_files(EXAMPLE)
            expect(page.locator("#input-image img").first).to_be_visible()
            parts = page.locator("#num-parts input[type='number']")
            parts.fill(str(PARTS))
            parts.press("Enter")
            expect(page.locator("#num-parts input[type='range']")).to_have_value(str(PARTS))
            page.locator("#generate-button").click()
            link = page.locator("#glb-file a").first
            expect(link).to_be_visible(timeout=GENERATION_TIMEOUT_MS)
            expect(page.locator("#summary")).to_contain_text(f"{PARTS} parts")
            expect(page.locator("#viewer canvas").first).to_be_attached()
            with page.expect_download() as download:
                link.click()
            saved = tmp_path / "downloaded.glb"
            download.value.save_as(saved)
            browser.close()
    finally:
        demo.close()
    assert _part_nodes(saved) == {f"part_{i:02d}" for i in range(PARTS)}
    assert not outside, f"the page tried to reach the network: {outside}"
