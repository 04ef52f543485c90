"""CLI verb `demo`: the gradio web page (upload an image, generate part meshes, view and download the GLB)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moca3d.errors import ConfigError

# the web demo's defaults live here (moca3d.app imports them) so that `--help` does not import gradio
DEFAULT_HOST = "127.0.0.1"  # this computer only, unless the user asks for another interface
DEFAULT_PORT = 7860
DEFAULT_RESOLUTION = 128  # marching-cubes grid per part


def register(app: typer.Typer) -> None:
    """Add `demo`."""

    @app.command("demo")
    def demo(
        model: Optional[Path] = typer.Option(
            None, "--model", help="Pipeline folder to serve (e.g. runs/dit/pipeline). Default: the built-in model."
        ),
        host: str = typer.Option(
            DEFAULT_HOST, "--host", help="Interface to listen on. 127.0.0.1 = this computer only; 0.0.0.0 = your whole network."
        ),
        port: int = typer.Option(DEFAULT_PORT, "--port", help="Port to listen on; open http://HOST:PORT in a browser."),
        share: bool = typer.Option(False, "--share", help="Also publish a temporary public gradio.live link (needs internet; off by default)."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
        resolution: int = typer.Option(DEFAULT_RESOLUTION, "--resolution", help="Marching-cubes grid resolution per part (16, 32 or a multiple of 4 from 64 to 1024)."),
        scene_model: Optional[Path] = typer.Option(
            None, "--scene-model", help="Scene pipeline for the Scene tab (image + label map or binary masks; a `train-scene` pipeline). Default: the built-in scene model."
        ),
        scenes: bool = typer.Option(True, "--scenes/--no-scenes", help="Show the Scene tab (--no-scenes: objects only, one model loaded)."),
    ) -> None:
        """Start a local web page: upload an image, choose the number of parts, and view / download the GLB.

        A second tab generates scenes: a scene image plus a label map (one id per instance) or one binary mask per
        instance -> one mesh per instance.

        Needs the optional web dependencies: pip install 'moca3d\\[demo]'. Example:

            moca3d demo --model runs/dit/pipeline      # then open http://127.0.0.1:7860

        Stop it with Ctrl+C.
        """
        if not 0 < port < 65536:
            raise ConfigError(f"--port must be from 1 to 65535, got {port}")
        from moca3d.defaults import check_resolution

        check_resolution(resolution)  # before any model is loaded
        try:
            import gradio  # noqa: F401
        except ImportError:
            raise ConfigError("the web demo needs gradio: pip install 'moca3d[demo]'") from None
        from moca3d.app import launch, resolve_model

        resolve_model(model)  # a missing built-in model fails here, in one line
        typer.echo(f"loading the model; the page will be at http://{host}:{port}")
        launch(model, host=host, port=port, share=share, device=device, resolution=resolution, scene_model_path=scene_model,
               scenes=scenes)
