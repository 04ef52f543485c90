"""`moca3d demo`: a gradio web page over MoCAPipeline (image -> N coloured part meshes, viewed and downloaded as a GLB).

The pipeline is loaded once; a queue runs one generation at a time. Generated GLBs go to a
temporary folder. gradio is an optional dependency (`pip install 'moca3d[demo]'`).
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no telemetry, no version check

import tempfile
import time
import uuid
from pathlib import Path
from typing import Optional, Union

import gradio as gr
from PIL import Image, UnidentifiedImageError

from moca3d.commands.common import check_resolution, resolve_device
from moca3d.commands.demo import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_RESOLUTION
from moca3d.defaults import GUIDANCE, STEPS
from moca3d.errors import ConfigError, InputError, MoCA3DError
from moca3d.pipeline import DEFAULT_MODEL_DIR, MoCAPipeline

MAX_UPLOAD_MB = 10
MAX_UPLOAD_BYTES = MAX_UPLOAD_MB * 1024 * 1024
MAX_PIXELS = 4096 * 4096  # larger images are refused before they are decoded
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")  # PIL format names
DEFAULT_PARTS = 4
MAX_STEPS = 200
MAX_GUIDANCE = 15.0
GUIDANCE_STEP = 0.5
DEFAULT_SEED = 0
MAX_SEED = 2**31 - 1
QUEUE_SIZE = 16  # waiting requests beyond this are turned away
TITLE = "moca3d: one image -> N part meshes"


def resolve_model(model_path: Union[str, Path, None]) -> Path:
    """The pipeline folder to load: the given one, or the built-in model if it is installed."""
    if model_path is not None:
        return Path(model_path)
    if not (DEFAULT_MODEL_DIR / "model_index.json").is_file():
        raise ConfigError(
            "the built-in model is not installed yet: pass --model PATH (a pipeline folder, e.g. runs/dit/pipeline) "
            "or train and install it with `moca3d train-default --install`"
        )
    return DEFAULT_MODEL_DIR


def check_upload(image_path: Union[str, Path, None]) -> Path:
    """The uploaded file if it is a PNG, JPEG or WebP image within the size limits; InputError otherwise."""
    if image_path is None:
        raise InputError("upload an image first (PNG, JPEG or WebP)")
    path = Path(image_path)
    if not path.is_file():
        raise InputError(f"image not found: {path.name}")
    size = path.stat().st_size
    if size > MAX_UPLOAD_BYTES:
        raise InputError(f"{path.name} is {size / 2**20:.1f} MB; the limit is {MAX_UPLOAD_MB} MB")
    try:
        with Image.open(path) as im:  # reads the header only
            image_format, (width, height) = im.format, im.size
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError):
        image_format, width, height = None, 0, 0
    if image_format not in ALLOWED_FORMATS:
        raise InputError(f"{path.name} is not a PNG, JPEG or WebP image")
    if width * height > MAX_PIXELS:
        raise InputError(f"{path.name} is {width}x{height} pixels; the limit is {MAX_PIXELS / 1e6:.0f} megapixels")
    return path


class DemoGenerator:
    """The demo's event handler: one loaded pipeline, GLBs written to a temporary folder."""

    def __init__(self, pipeline: MoCAPipeline, resolution: int = DEFAULT_RESOLUTION, output_dir: Optional[Path] = None):
        check_resolution(resolution, "resolution")
        self.pipeline = pipeline
        self.resolution = resolution
        self.output_dir = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="moca3d-demo-"))
        self.output_dir.mkdir(parents=True, exist_ok=True)

    @property
    def max_parts(self) -> int:
        """The model's part limit (its ID codebook size), the slider's maximum."""
        return self.pipeline.transformer.max_components

    def generate(self, image_path, num_parts, seed=DEFAULT_SEED, steps=STEPS, guidance=GUIDANCE):
        """Uploaded image -> (GLB for the viewer, GLB for download, one-line summary); gr.Error on bad input."""
        started = time.time()
        try:
            path = check_upload(image_path)
            result = self.pipeline(
                path, num_parts=int(num_parts), steps=int(steps), guidance=float(guidance), seed=int(seed),
                resolution=self.resolution, show_progress=False,
            )
            glb = result.save(self.output_dir / f"parts-{uuid.uuid4().hex[:12]}.glb")
        except MoCA3DError as err:
            raise gr.Error(str(err), print_exception=False) from None
        empty = sum(1 for mesh in result.meshes if len(mesh.faces) == 0)
        note = f" ({empty} empty)" if empty else ""
        summary = f"{len(result.meshes)} parts{note} in {time.time() - started:.1f} s: {', '.join(result.names)}"
        return str(glb), str(glb), summary


def build_app(
    model_path: Union[str, Path, None] = None, device: str = "auto", resolution: int = DEFAULT_RESOLUTION,
    default_steps: int = STEPS, output_dir: Optional[Path] = None,
) -> gr.Blocks:
    """Load the pipeline once and lay out the page: upload, part count, advanced settings, 3D viewer, download."""
    pipeline = MoCAPipeline.from_pretrained(resolve_model(model_path), device=resolve_device(device))
    handler = DemoGenerator(pipeline, resolution, output_dir)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(
            f"## {TITLE}\nUpload an object image (PNG, JPEG or WebP, at most {MAX_UPLOAD_MB} MB, on a white or transparent "
            "background), choose how many parts to generate, and press **Generate**. Each part is a separate mesh in its own colour."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Input image", type="filepath", image_mode=None, sources=["upload", "clipboard"], elem_id="input-image")
                parts = gr.Slider(
                    1, handler.max_parts, value=min(DEFAULT_PARTS, handler.max_parts), step=1,
                    label=f"Number of parts (this model: at most {handler.max_parts})", elem_id="num-parts",
                )
                with gr.Accordion("Advanced", open=False):
                    seed = gr.Number(DEFAULT_SEED, label="Seed (the same seed gives the same result)", precision=0, minimum=0, maximum=MAX_SEED)
                    steps = gr.Slider(1, MAX_STEPS, value=default_steps, step=1, label="Sampling steps")
                    guidance = gr.Slider(1.0, MAX_GUIDANCE, value=GUIDANCE, step=GUIDANCE_STEP, label="Guidance scale (1 = off)")
                button = gr.Button("Generate", variant="primary", elem_id="generate-button")
            with gr.Column():
                viewer = gr.Model3D(label="Generated parts", elem_id="viewer")
                download = gr.File(label="Download GLB (one named node per part)", interactive=False, elem_id="glb-file")
                summary = gr.Markdown(elem_id="summary")
        button.click(handler.generate, inputs=[image, parts, seed, steps, guidance], outputs=[viewer, download, summary])
    return demo.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)


def launch(
    model_path: Union[str, Path, None] = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, share: bool = False,
    device: str = "auto", prevent_thread_lock: bool = False, **app_options,
) -> gr.Blocks:
    """Build the app and serve it on host:port (blocks unless prevent_thread_lock); returns the running app."""
    demo = build_app(model_path, device=device, **app_options)
    demo.launch(
        server_name=host, server_port=port, share=share, prevent_thread_lock=prevent_thread_lock,
        max_file_size=MAX_UPLOAD_BYTES, ssr_mode=False,
    )
    return demo
