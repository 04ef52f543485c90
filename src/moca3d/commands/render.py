"""CLI verb `render`: a quick PNG preview of a mesh file's components (each in its own colour), optionally beside an image."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Optional

import typer

from moca3d.commands.common import check_output_path, plural
from moca3d.errors import InputError, cannot_write, warn_input

DEFAULT_AZIMUTH_DEG = 30.0
DEFAULT_ELEVATION_DEG = 20.0
DEFAULT_SIZE = 512
MIN_SIZE, MAX_SIZE = 16, 4096  # pixels a side; the supersampled ray grid of a bigger picture does not fit in memory
SUPERSAMPLE = 2  # rays per pixel side (anti-aliasing)


def drawable(mesh, name: str) -> bool:
    """Whether a part draws: finite vertices, some area (`validate_components` on it alone)."""
    from moca3d.geometry.mesh_io import validate_components

    try:
        validate_components([mesh], [name])
    except InputError:
        return False
    return True


def render_components_png(mesh_path: Path, output: Path, azimuth: float = DEFAULT_AZIMUTH_DEG,
                          elevation: float = DEFAULT_ELEVATION_DEG, size: int = DEFAULT_SIZE,
                          beside: Optional[Path] = None) -> tuple[Path, int, int]:
    """Render the non-empty components of `mesh_path` to `output` (PNG); returns (path, components drawn, components in
    the file, empty ones included)."""
    import numpy as np
    from PIL import Image, ImageOps

    from moca3d.data.images import load_image
    from moca3d.geometry.mesh_io import (atomic_write_bytes, main_color, normalize_meshes, palette, read_components,
                                         validate_components)
    from moca3d.geometry.render import RenderConfig, orbit_camera, render

    mesh_path = Path(mesh_path)
    meshes, names = read_components(mesh_path)
    fallback = palette(len(meshes))
    solid = [i for i, m in enumerate(meshes) if len(m.faces)]
    if not solid:
        raise InputError(f"{mesh_path.name}: every component is empty, nothing to render")
    shown = [i for i in solid if drawable(meshes[i], names[i])]
    if not shown:  # NaN/inf vertices or zero-area parts only: a blank picture; the first one's problem is the error
        validate_components([meshes[i] for i in solid], [names[i] for i in solid], label=mesh_path.name)
    left_out = [names[i] for i in solid if i not in shown]
    if left_out:  # e.g. a stray collapsed node of a DCC export: the preview shows the rest
        warn_input(f"{mesh_path.name}: {len(left_out)} component(s) with zero area or non-finite vertices left out of the "
                   f"picture: {', '.join(left_out)}")
    parts = [meshes[i] for i in shown]
    colors = np.stack([c if (c := main_color(meshes[i])) is not None else fallback[i] for i in shown])
    parts, _ = normalize_meshes(parts)  # a preview is the same at any scale; far from the origin float32 rays are not
    config = RenderConfig(size=size, supersample=SUPERSAMPLE)
    rgb, _ = render(parts, orbit_camera(parts, azimuth, elevation, config), colors, config=config)
    picture = Image.fromarray(rgb)
    if beside is not None:
        left = load_image(beside).convert("RGBA")  # a one-line InputError for a missing or unreadable file
        white = Image.new("RGBA", left.size, (255, 255, 255, 255))
        left = ImageOps.contain(Image.alpha_composite(white, left).convert("RGB"), (size, size))  # its aspect kept
        both = Image.new("RGB", (2 * size, size), (255, 255, 255))
        both.paste(left, ((size - left.width) // 2, (size - left.height) // 2))  # centred on white
        both.paste(picture, (size, 0))
        picture = both
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(output, buffer.getvalue())  # a failed write leaves any earlier picture whole
    except OSError as err:
        raise cannot_write(output, err) from None
    return output, len(parts), len(meshes)


def register(app: typer.Typer) -> None:
    """Add `render`."""

    @app.command("render")
    def render_cmd(
        mesh: Path = typer.Argument(..., help="A GLB/OBJ/PLY file, e.g. the output of `moca3d generate`, or a folder of part files."),
        output: Path = typer.Option(..., "--output", "--out", "-o", help="PNG to write."),
        azimuth: float = typer.Option(DEFAULT_AZIMUTH_DEG, help="Camera azimuth in degrees (0 = looking from +z)."),
        elevation: float = typer.Option(DEFAULT_ELEVATION_DEG, help="Camera elevation in degrees above the horizon."),
        size: int = typer.Option(DEFAULT_SIZE, help=f"Image side in pixels ({MIN_SIZE} to {MAX_SIZE})."),
        beside: Optional[Path] = typer.Option(None, "--beside", help="Put this image (e.g. the generation's input) on the left."),
    ) -> None:
        """Render the parts of MESH, each in its own colour, to a PNG (headless CPU ray casting)."""
        for option, degrees in (("--azimuth", azimuth), ("--elevation", elevation)):
            if not math.isfinite(degrees):
                raise InputError(f"{option} must be a finite number of degrees, got {degrees}")
        if not MIN_SIZE <= size <= MAX_SIZE:
            raise InputError(f"--size must be from {MIN_SIZE} to {MAX_SIZE} pixels, got {size}")
        if output.suffix.lower() != ".png":
            raise InputError(f"--output must be a .png file, got {output}")
        check_output_path(output)
        path, drawn, total = render_components_png(mesh, output, azimuth, elevation, size, beside)
        rest = f" of {total} (the others empty or degenerate)" if total > drawn else ""
        typer.echo(f"wrote {path}: {plural(drawn, 'component')} drawn{rest}")
