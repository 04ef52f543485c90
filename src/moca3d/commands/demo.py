"""CLI verb `demo`: the gradio web page (upload an image, generate part meshes, view and download the GLB)."""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import Optional

import typer

from moca3d.commands.common import DEVICE_HELP, DTYPE_HELP, resolve_device, shipped
from moca3d.defaults import resolve_dtype
from moca3d.errors import ConfigError

# the web demo's defaults live here (moca3d.app imports them) so that `--help` does not import gradio
DEFAULT_HOST = "127.0.0.1"  # this computer only, unless the user asks for another interface
DEFAULT_PORT = 7860
DEFAULT_RESOLUTION = 128  # marching-cubes grid per part
MAX_UPLOAD_MB = 10  # the upload limits, named in the help below
MAX_PIXELS = 4096 * 4096  # 16.8 megapixels; larger images are refused before they are decoded


def check_address(host: str, port: int) -> None:
    """Fail in one line, before any model is loaded, if the page cannot be served on host:port (a port in use, an
    address that is not this computer's); gradio's own message would name its Python API and come after the loading."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError):
        raise ConfigError(f"--host {host} is not a known address: use 127.0.0.1 (this computer only) or 0.0.0.0 (your network)") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the web server does: a just-closed port is free
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} is in use (another demo running?): pass another --port") from None
            raise ConfigError(f"cannot listen on {host}:{port} ({err.strerror}): check --host and --port") from None


def page_url(host: str, port: int) -> str:
    """The address to open in a browser: 0.0.0.0 or :: listen on every interface but are no address to browse to."""
    if host in ("0.0.0.0", "::", ""):
        return f"http://127.0.0.1:{port} (from other computers: http://THIS-COMPUTER'S-ADDRESS:{port})"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def register(app: typer.Typer) -> None:
    """Add `demo`."""

    @app.command("demo")
    def demo(
        model: Optional[Path] = typer.Option(
            None, "--model", callback=shipped, help="Pipeline folder to serve (e.g. runs/dit/pipeline). Default: the built-in model."
        ),
        host: str = typer.Option(
            DEFAULT_HOST, "--host", help="Interface to listen on. 127.0.0.1 = this computer only; 0.0.0.0 = your whole network."
        ),
        port: int = typer.Option(DEFAULT_PORT, "--port", help="Port to listen on; open http://HOST:PORT in a browser."),
        share: bool = typer.Option(False, "--share", help="Also publish a temporary public gradio.live link (needs internet; off by default)."),
        device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
        dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
        resolution: int = typer.Option(DEFAULT_RESOLUTION, "--resolution", help="Marching-cubes grid resolution per part (16, 32 or a multiple of 4 from 64 to 1024)."),
        scene_model: Optional[Path] = typer.Option(
            None, "--scene-model", callback=shipped, help="Scene pipeline for the Scene tab (image + label map or binary masks; a `train-scene` pipeline). Default: the built-in scene model. With --scene-lora: the object pipeline that adapter was fine-tuned from (default: the built-in model)."
        ),
        scenes: bool = typer.Option(True, "--scenes/--no-scenes", help="Show the Scene tab (--no-scenes: objects only, one model loaded)."),
        lora: Optional[Path] = typer.Option(None, "--lora", help="A LoRA adapter folder (OUT/lora of `moca3d train --lora-rank`) folded into --model, the pipeline it was trained from, for the Object tab."),
        scene_lora: Optional[Path] = typer.Option(None, "--scene-lora", help="A scene LoRA adapter folder (OUT/lora of `moca3d train-scene --lora-rank`) folded into --scene-model, the object pipeline it was fine-tuned from (default: the built-in model), for the Scene tab."),
    ) -> None:
        """Start a local web page: upload an image, choose the number of parts, and view / download the GLB.

        A second tab generates scenes: a scene image plus a label map (one id per instance) or one binary mask per instance -> one mesh per instance.

        Uploads: PNG, JPEG or WebP images of at most 10 MB and 16.8 megapixels (4096x4096). Needs the optional web dependencies: pip install 'moca3d\\[demo]'. Example:

            moca3d demo --model runs/dit/pipeline

        then open http://127.0.0.1:7860 in a browser. Stop it with Ctrl+C.
        """
        if not 0 < port < 65536:
            raise ConfigError(f"--port must be from 1 to 65535, got {port}")
        if scene_model is not None and not scenes:
            raise ConfigError("--scene-model and --no-scenes contradict each other: drop one (--no-scenes shows objects only)")
        if scene_lora is not None and not scenes:
            raise ConfigError("--scene-lora and --no-scenes contradict each other: drop one (--no-scenes shows objects only)")
        from moca3d.models.lora import read_adapter_config

        for folder, condition in ((lora, "object"), (scene_lora, "scene")):  # an adapter of the wrong tab, before any model loads
            if folder is not None:
                read_adapter_config(folder, condition)
        from moca3d.defaults import check_resolution

        check_resolution(resolution)  # before any model is loaded
        torch_dtype = resolve_dtype(dtype, resolve_device(device))
        check_address(host, port)
        try:
            import gradio  # noqa: F401
        except ImportError:
            raise ConfigError("the web demo needs gradio: pip install 'moca3d[demo]'") from None
        from moca3d.app import launch, resolve_model

        resolve_model(model)  # a missing built-in model fails here, in one line
        typer.echo(f"loading the model; the page will be at {page_url(host, port)}")
        launch(model, host=host, port=port, share=share, device=device, resolution=resolution, scene_model_path=scene_model,
               scenes=scenes, lora=lora, scene_lora=scene_lora, torch_dtype=torch_dtype)
