"""`moca3d demo`: a gradio web page over MoCAPipeline, viewed and downloaded as GLBs.

Two tabs: an object (image -> N coloured part meshes) and, when a scene model is available, a scene
(image + a label map or binary masks -> one mesh per instance). Each pipeline is loaded once; a queue runs one
generation at a time. Generated GLBs go to a temporary folder that keeps the newest KEPT_OUTPUTS and is removed when
the demo stops; gradio's own copies of uploads and results are deleted CACHE_SECONDS after they were made, and all
of them when the server stops. gradio is an optional dependency (`pip install 'moca3d[demo]'`).
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no telemetry, no version check

import math
import shutil
import tempfile
import time
import uuid
import warnings
import weakref
from pathlib import Path
from typing import Optional, Union

import gradio as gr
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from moca3d.commands.common import resolve_device
from moca3d.commands.demo import (DEFAULT_HOST, DEFAULT_PORT, DEFAULT_RESOLUTION, MAX_PIXELS, MAX_UPLOAD_MB, check_address,
                                  page_url)
from moca3d.data.scene import read_masks as scene_masks, tiny_masks_quiet
from moca3d.defaults import GUIDANCE, INSTANCE_MASKS, SCENE_GUIDANCE, STEPS, check_resolution
from moca3d.errors import ConfigError, InputError, InputWarning, MoCA3DError, out_of_memory
from moca3d.geometry.simplify import MIN_COMPONENT_FACES
from moca3d.pipeline import DEFAULT_MODEL_DIR, DEFAULT_SCENE_MODEL_DIR, MoCAPipeline

MAX_UPLOAD_BYTES = MAX_UPLOAD_MB * 1024 * 1024
ALLOWED_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP"}  # PIL format name -> the name users read
LABEL_MAP_FORMATS = {"PNG": "PNG", "BMP": "BMP", "TIFF": "TIFF"}  # lossless only: a JPEG would smear the instance ids
BINARY_MASK_FORMATS = {**LABEL_MAP_FORMATS, **ALLOWED_FORMATS}  # thresholded, so a lossy one is fine
LABEL_MAP_WHY = (": one mask file is read as a label map, which must be lossless (lossy compression invents ids at "
                 "the edges); save it as PNG, or upload the binary masks as several files, one per instance")
MASK_EXTENSIONS = [".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg", ".webp"]
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"  # in a source checkout; absent from a wheel
OBJECT_EXAMPLES = ("chair.png", "airplane.png", "lamp.png")
SCENE_EXAMPLES = (("scene4.png", "scene4_masks.png"), ("scene32.png", "scene32_masks.png"))  # image, label map
DEFAULT_PARTS = 4
MAX_STEPS = 200
MAX_GUIDANCE = 15.0
GUIDANCE_STEP = 0.5
DEFAULT_SEED = 0
MAX_SEED = 2**31 - 1
KEPT_OUTPUTS = 64  # the demo's newest GLBs kept in its output folder; older ones are deleted
CACHE_SECONDS = 3600  # gradio's copies of uploads and results are deleted this long after they were made
CACHE_CHECK_SECONDS = 600  # how often gradio looks for such files (and it deletes them all when the server stops)
QUEUE_SIZE = 16  # waiting requests beyond this are turned away
QUEUE_ID = "generation"  # object and scene generations share one queue: one at a time in all
TITLE = "moca3d: one image -> N part (or instance) meshes"


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


def resolve_scene_model(scene_model_path: Union[str, Path, None], enabled: bool = True, lora: Union[str, Path, None] = None) -> Optional[Path]:
    """The scene pipeline folder for the scene tab: the given one, the built-in scene model if installed, or None; with a
    scene adapter `lora`, the object pipeline it was fine-tuned from (the given one, or the built-in model)."""
    if not enabled:
        return None
    if lora is not None:
        return resolve_model(scene_model_path)
    if scene_model_path is not None:
        return Path(scene_model_path)
    return DEFAULT_SCENE_MODEL_DIR if (DEFAULT_SCENE_MODEL_DIR / "model_index.json").is_file() else None


def check_upload(image_path: Union[str, Path, None], what: str = "an image", formats: dict[str, str] = ALLOWED_FORMATS,
                 why: str = "") -> Path:
    """The uploaded file if it is an image of one of `formats` within the size limits; InputError otherwise. `why`
    follows the message that refuses an image of another format PIL reads (e.g. a JPEG where only lossless ones do)."""
    *first, last = formats.values()
    kinds = f"{', '.join(first)} or {last}"
    if image_path is None:
        raise InputError(f"upload {what} first ({kinds})")
    path = Path(image_path)
    if not path.is_file():
        raise InputError(f"file not found: {path.name}")
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{path.name} is empty (0 bytes): upload {what} ({kinds})")
    if size > MAX_UPLOAD_BYTES:
        raise InputError(f"{path.name} is {size / 2**20:.1f} MB; the limit is {MAX_UPLOAD_MB} MB")
    try:
        with Image.open(path) as im:  # reads the header
            image_format, (width, height) = im.format, im.size
            if image_format not in formats:
                raise InputError(f"{path.name} is not a {kinds} image{why}")
            if width * height > MAX_PIXELS:
                raise InputError(f"{path.name} is {width}x{height} pixels; the limit is {MAX_PIXELS / 1e6:.1f} megapixels")
            im.load()  # decodes the pixels: a truncated or corrupt file fails here, named without the server's folders
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise InputError(f"{path.name} is too large: the limit is {MAX_PIXELS / 1e6:.1f} megapixels") from None
    except UnidentifiedImageError:
        raise InputError(f"{path.name} is not a {kinds} image") from None
    except (OSError, SyntaxError, ValueError):  # PIL's errors for broken data (SyntaxError: some malformed headers)
        raise InputError(f"{path.name} cannot be read: the file is truncated or corrupt") from None
    return path


def image_upload(**options) -> gr.Image:
    """A gr.Image that hands an upload PIL cannot open (a text file, HEIC, a decompression bomb) to the handler as its
    path, so that check_upload names the problem in one line; a plain gr.Image fails before the handler, with a bare
    "Error" on the page. (Not a gr.Image subclass: gradio writes a .pyi stub beside the module of every subclass.)"""
    image = gr.Image(**options)
    strict = image.preprocess

    def preprocess(payload):
        try:
            return strict(payload)
        except (OSError, ValueError, Image.DecompressionBombError):  # UnidentifiedImageError is an OSError
            return getattr(payload, "path", None)

    image.preprocess = preprocess  # gradio calls the instance's preprocess on every event
    return image


def whole_number(value, name: str, low: int, high: int) -> int:
    """A form value (a number, or None when its box was cleared) as an int in [low, high]; InputError otherwise."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)  # not None (a cleared box), True or False
    if not number or not low <= value <= high or int(value) != value:  # NaN, inf, 2.5
        raise InputError(f"{name} must be a whole number from {low} to {high}, got {value}")
    return int(value)


def guidance_scale(value, low: float = 1.0, high: float = MAX_GUIDANCE) -> float:
    """A form value as a guidance scale in [low, high] (the slider's range); InputError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise InputError(f"the guidance scale must be a number from {low:g} to {high:g}, got {value}")
    return float(value)


def triangle_budget(value, components: int = 1, kind: str = "parts") -> Optional[int]:
    """A form value as a triangle budget for the whole output of `components` parts or instances (`kind`): None for
    an empty box or 0 (marching cubes' full meshes), else a whole number of at least MIN_COMPONENT_FACES per component;
    InputError otherwise."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)  # not True or False, not "60"
    if value is None or (number and value == 0):
        return None
    if not number or not math.isfinite(value) or int(value) != value or value < MIN_COMPONENT_FACES:  # -5, 2.5, NaN
        raise InputError(f"max triangles must be empty or 0 (the full meshes) or a whole number of at least "
                         f"{MIN_COMPONENT_FACES}, got {value}")
    if value < MIN_COMPONENT_FACES * components:
        raise InputError(f"max triangles {int(value)} is too few for {components} {kind}: at least {MIN_COMPONENT_FACES} "
                         f"each ({MIN_COMPONENT_FACES * components} in all)")
    return int(value)


def gather_masks(uploads, folder: Path) -> Path:
    """The uploaded masks as generate_scene takes them: one file is a label map; several are binary masks, one per
    instance in file-name order, linked (copied where links fail, as on Windows) into the new `folder`."""
    files = [uploads] if isinstance(uploads, (str, Path)) else list(uploads or [])
    if not files:
        raise InputError("upload a label map (0 = background, one id per instance) or one binary mask per instance first")
    if len(files) == 1:
        return check_upload(files[0], "a label map", LABEL_MAP_FORMATS, why=LABEL_MAP_WHY)
    paths = [check_upload(file, "binary masks", BINARY_MASK_FORMATS) for file in files]
    folder.mkdir(parents=True)
    for path in paths:
        link = folder / path.name
        if link.exists():
            raise InputError(f"two masks are named {path.name}: name each instance's mask differently (they are read in name order)")
        try:
            link.symlink_to(path.resolve())
        except OSError:  # no symlinks here (Windows without the privilege, some file systems): a copy reads the same
            shutil.copyfile(path, link)
    return folder


def read_masks(mask_input: Path, max_instances: int) -> tuple[np.ndarray, list[str]]:
    """gather_masks' label map or folder read as (N, H, W) bool masks and where each came from (its label id or file
    name); errors name the files without the server's folders."""
    try:
        masks, names = scene_masks(mask_input, max_instances=max_instances)
        return masks, names or [f"mask {i}" for i in range(len(masks))]
    except InputError as err:  # e.g. "label map /tmp/gradio/<hash>/labels.png must be single-channel"
        folder = mask_input if mask_input.is_dir() else mask_input.parent
        raise InputError(str(err).replace(f"{folder}{os.sep}", "")) from None


class DemoGenerator:
    """The demo's event handlers: the loaded pipelines (object, optional scene), GLBs written to a temporary folder."""

    def __init__(
        self, pipeline: MoCAPipeline, resolution: int = DEFAULT_RESOLUTION, output_dir: Optional[Path] = None,
        scene_pipeline: Optional[MoCAPipeline] = None,
    ):
        check_resolution(resolution, "resolution")
        if pipeline.is_scene_model:
            raise ConfigError("the model is a scene model (7-channel image encoder): pass it as --scene-model, and an object model as --model")
        if scene_pipeline is not None and not scene_pipeline.is_scene_model:
            raise ConfigError("the scene model has an object image encoder (3 channels): pass a `train-scene` pipeline")
        self.pipeline = pipeline
        self.scene_pipeline = scene_pipeline
        self.resolution = resolution
        if output_dir is None:  # our own temporary folder: removed when the demo stops
            self.output_dir = Path(tempfile.mkdtemp(prefix="moca3d-demo-"))
            self.remove_output_dir = weakref.finalize(self, shutil.rmtree, self.output_dir, ignore_errors=True)
        else:
            self.output_dir = Path(output_dir)
            self.output_dir.mkdir(parents=True, exist_ok=True)

    @property
    def max_parts(self) -> int:
        """The model's part limit (its ID codebook size), the slider's maximum."""
        return self.pipeline.transformer.max_components

    def generate(self, image_path, num_parts, seed=DEFAULT_SEED, steps=STEPS, guidance=GUIDANCE, faces=None):
        """Uploaded image -> (GLB for the viewer, GLB for download, one-line summary); `faces`: the triangle budget
        (None or 0: the full meshes); gr.Error on bad input."""
        def run():
            path = check_upload(image_path)
            parts = whole_number(num_parts, "the number of parts", 1, self.max_parts)
            return self.pipeline(
                path, num_parts=parts,
                steps=whole_number(steps, "the number of steps", 1, MAX_STEPS), guidance=guidance_scale(guidance),
                seed=whole_number(seed, "the seed", 0, MAX_SEED), faces=triangle_budget(faces, parts, "parts"),
                resolution=self.resolution, show_progress=False,
            )
        return self._respond(run, "parts")

    def generate_scene(self, image_path, masks, seed=DEFAULT_SEED, steps=STEPS, guidance=SCENE_GUIDANCE, faces=None):
        """Uploaded scene image and masks (a label map, or several binary masks) -> (GLB for the viewer, GLB for
        download, summary); `faces`: the triangle budget (None or 0: the full meshes); gr.Error on bad input."""
        folder = self.output_dir / f"masks-{uuid.uuid4().hex[:12]}"

        def run():
            if self.scene_pipeline is None:
                raise InputError("this demo was started without a scene model (moca3d demo --scene-model PATH)")
            image = check_upload(image_path, "a scene image")
            mask_input = gather_masks(masks, folder)
            budget = triangle_budget(faces)
            settings = dict(steps=whole_number(steps, "the number of steps", 1, MAX_STEPS), guidance=guidance_scale(guidance),
                            seed=whole_number(seed, "the seed", 0, MAX_SEED))
            instances, sources = read_masks(mask_input, self.scene_pipeline.transformer.max_components)  # once: the pipeline takes them read
            with tiny_masks_quiet():  # warned of by their ids or file names as they were read
                result = self.scene_pipeline.generate_scene(  # the budget: at least MIN_COMPONENT_FACES per instance
                    image, instances, **settings, faces=triangle_budget(budget, len(instances), "instances"),
                    resolution=self.resolution, show_progress=False,
                )
            if mask_input.is_file():  # recorded as for masks given by their path (a folder of binary masks is a temporary one)
                result.settings["masks"] = mask_input.name
            result.settings[INSTANCE_MASKS] = sources  # label ids or the uploaded files' names, not their places in a stack
            return result
        try:
            return self._respond(run, "instances")
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # the links (or copies) only

    def _respond(self, run, kind: str):
        """Run one generation and save its GLB: (viewer path, download path, summary); our errors become gr.Error."""
        started = time.time()
        try:
            caught: list = []
            try:
                with warnings.catch_warnings(record=True) as caught:  # one generation at a time (the queue): not shared
                    warnings.simplefilter("always", InputWarning)
                    result = run()
            finally:
                for w in caught:  # any other warning on the server's console, as before
                    if not issubclass(w.category, InputWarning):
                        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
            glb = result.save(self.output_dir / f"{kind}-{uuid.uuid4().hex[:12]}.glb")
        except MoCA3DError as err:
            raise gr.Error(str(err), print_exception=False) from None
        except (MemoryError, RuntimeError) as err:
            if not out_of_memory(err):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # so that a smaller request can still run
            raise gr.Error(
                f"out of memory: generate fewer {kind}, or restart the demo with a lower --resolution (now {self.resolution})",
                print_exception=False,
            ) from None
        for old in sorted(self.output_dir.glob("*.glb"), key=lambda p: p.stat().st_mtime)[:-KEPT_OUTPUTS]:
            old.unlink(missing_ok=True)  # gradio serves its own copy of each result
        empty = sum(1 for mesh in result.meshes if len(mesh.faces) == 0)
        note = f" ({empty} empty)" if empty else ""
        count = len(result.meshes)
        triangles = sum(len(mesh.faces) for mesh in result.meshes)
        limit = result.settings.get("faces")
        budget = f" (at most {limit:,})" if limit is not None else ""
        summary = (f"{count} {kind if count != 1 else kind[:-1]}{note} in {time.time() - started:.1f} s, "
                   f"{triangles:,} triangle{'s' if triangles != 1 else ''}{budget}: {', '.join(result.names)}")
        for warning in {str(w.message) for w in caught if issubclass(w.category, InputWarning)}:
            gr.Warning(warning)  # a notice on the page, and in the summary below the viewer
            summary += f"\n\nNote: {warning}"
        return str(glb), str(glb), summary


def _examples(rows) -> list:
    """The rows of example inputs whose files all exist (a source checkout has them; a wheel does not)."""
    found = [[str(EXAMPLES_DIR / name) for name in ((row,) if isinstance(row, str) else row)] for row in rows]
    return [row for row in found if all(Path(p).is_file() for p in row)]


def _settings(default_steps: int, default_guidance: float, prefix: str, node: str) -> tuple:
    """The "Advanced" accordion: seed, steps, guidance and triangle budget (per `node`: part or instance) inputs."""
    with gr.Accordion("Advanced", open=False, elem_id=f"{prefix}advanced"):
        seed = gr.Number(DEFAULT_SEED, label="Seed (the same seed gives the same result)", precision=0, minimum=0, maximum=MAX_SEED,
                         elem_id=f"{prefix}seed")
        steps = gr.Slider(1, MAX_STEPS, value=default_steps, step=1, label="Sampling steps", elem_id=f"{prefix}steps")
        guidance = gr.Slider(1.0, MAX_GUIDANCE, value=default_guidance, step=GUIDANCE_STEP, label="Guidance scale (1 = off)",
                             elem_id=f"{prefix}guidance")
        faces = gr.Number(None, label="Max triangles (the whole output; empty or 0: the full meshes)", precision=None, step=1,
                          placeholder=f"empty: no limit (else at least {MIN_COMPONENT_FACES} per {node})", elem_id=f"{prefix}faces")
    return seed, steps, guidance, faces


def _outputs(label: str, node: str, prefix: str) -> tuple:
    """The result column: 3D viewer, GLB download and a one-line summary."""
    viewer = gr.Model3D(label=label, elem_id=f"{prefix}viewer")
    download = gr.File(label=f"Download GLB (one named node per {node})", interactive=False, elem_id=f"{prefix}glb-file")
    summary = gr.Markdown(elem_id=f"{prefix}summary")
    return viewer, download, summary


def _object_tab(handler: DemoGenerator, default_steps: int) -> None:
    """The Object tab: image, part count, settings, examples -> 3D viewer, GLB download, summary."""
    gr.Markdown(
        f"Upload an object image (PNG, JPEG or WebP, at most {MAX_UPLOAD_MB} MB, on a white or transparent background), "
        "choose how many parts to generate, and press **Generate**. Each part is a separate mesh in its own colour."
    )
    with gr.Row():
        with gr.Column():
            image = image_upload(label="Input image", type="filepath", image_mode=None, sources=["upload", "clipboard"], elem_id="input-image")
            parts = gr.Slider(
                1, handler.max_parts, value=min(DEFAULT_PARTS, handler.max_parts), step=1,
                label=f"Number of parts (this model: at most {handler.max_parts})", elem_id="num-parts",
            )
            settings = _settings(default_steps, GUIDANCE, "", "part")
            button = gr.Button("Generate", variant="primary", elem_id="generate-button")
            if examples := _examples(OBJECT_EXAMPLES):
                gr.Examples(examples, inputs=[image], label="Held-out examples")
        with gr.Column():
            outputs = _outputs("Generated parts", "part", "")
    button.click(handler.generate, inputs=[image, parts, *settings], outputs=list(outputs), concurrency_id=QUEUE_ID)


def _scene_tab(handler: DemoGenerator, default_steps: int) -> None:
    """The Scene tab: scene image, masks, settings, examples -> 3D viewer, GLB download, summary."""
    gr.Markdown(
        "Upload a scene image and its masks, the same size: either one **label map** (a PNG, BMP or TIFF with "
        "0 = background and one integer id per instance) or one **binary mask per instance** (several files, "
        f"read in file-name order; where they overlap the later one wins). At most "
        f"{handler.scene_pipeline.transformer.max_components} instances. Each instance becomes a separate mesh, placed as "
        "in the image. The scene model is weak (procedural scenes only; README)."
    )
    with gr.Row():
        with gr.Column():
            image = image_upload(label="Scene image", type="filepath", image_mode=None, sources=["upload", "clipboard"], elem_id="scene-image")
            masks = gr.File(label="Label map, or one binary mask per instance", file_count="multiple", file_types=MASK_EXTENSIONS,
                            elem_id="scene-masks")
            settings = _settings(default_steps, SCENE_GUIDANCE, "scene-", "instance")
            button = gr.Button("Generate scene", variant="primary", elem_id="scene-generate-button")
            if examples := _examples(SCENE_EXAMPLES):
                rows = [[image_file, [labels]] for image_file, labels in examples]  # the mask input takes a list
                gr.Examples(rows, inputs=[image, masks], label="Held-out examples")
        with gr.Column():
            outputs = _outputs("Generated instances", "instance", "scene-")
    button.click(handler.generate_scene, inputs=[image, masks, *settings], outputs=list(outputs), concurrency_id=QUEUE_ID)


def build_app(
    model_path: Union[str, Path, None] = None, device: str = "auto", resolution: int = DEFAULT_RESOLUTION,
    default_steps: int = STEPS, output_dir: Optional[Path] = None, scene_model_path: Union[str, Path, None] = None,
    scenes: bool = True, lora: Union[str, Path, None] = None, scene_lora: Union[str, Path, None] = None,
    torch_dtype: Union[torch.dtype, str, None] = "auto",
) -> gr.Blocks:
    """Load the pipelines once and lay out the page: an object tab (the model, with `lora` folded in if given) and,
    with a scene model (or an object one with the scene adapter `scene_lora` folded in), a scene tab; both in
    `torch_dtype` (`MoCAPipeline.from_pretrained`'s)."""
    device = resolve_device(device)
    pipeline = MoCAPipeline.from_pretrained(resolve_model(model_path), device=device, lora=lora, torch_dtype=torch_dtype)
    scene_dir = resolve_scene_model(scene_model_path, scenes, scene_lora)
    scene_pipeline = (MoCAPipeline.from_pretrained(scene_dir, device=device, lora=scene_lora, torch_dtype=torch_dtype)
                      if scene_dir is not None else None)
    handler = DemoGenerator(pipeline, resolution, output_dir, scene_pipeline)
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(CACHE_CHECK_SECONDS, CACHE_SECONDS)) as demo:
        gr.Markdown(f"## {TITLE}")
        with gr.Tab("Object", id="object"):
            _object_tab(handler, default_steps)
        if scene_pipeline is not None:
            with gr.Tab("Scene", id="scene", elem_id="scene-tab"):
                _scene_tab(handler, default_steps)
    return demo.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)


def launch(
    model_path: Union[str, Path, None] = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, share: bool = False,
    device: str = "auto", prevent_thread_lock: bool = False, **app_options,
) -> gr.Blocks:
    """Build the app and serve it on host:port: block until Ctrl+C (as `moca3d demo` does) or, with prevent_thread_lock
    (a REPL or notebook), return at once with the server running; returns the app, whose .close() stops the server.
    A port in use or an address not this computer's is a one-line ConfigError before any model loads."""
    check_address(host, port)
    demo = build_app(model_path, device=device, **app_options)
    demo.launch(  # quiet without `share`: gradio would say "set `share=True` in `launch()`", the CLI's switch being --share
        server_name=host, server_port=port, share=share, prevent_thread_lock=True, quiet=not share,
        max_file_size=MAX_UPLOAD_BYTES, ssr_mode=False,
    )
    if not share:
        print(f"* Running on local URL:  {page_url(host, port)}\n* To create a public link, run `moca3d demo --share`.")
    if not prevent_thread_lock:
        demo.block_thread()
    return demo
