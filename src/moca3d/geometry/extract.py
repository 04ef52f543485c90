"""Field -> mesh: coarse-to-fine grid evaluation, then marching cubes at level 0 (DESIGN §2).

Works with any callable `points (M, 3) -> values (M,)` whose values are positive inside and zero
on the surface: a VAE decoder (`VecSetVAE.field(z)`) or an analytic SDF.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
import trimesh

from moca3d.errors import ConfigError

Field = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ExtractConfig:
    """Options of `extract_mesh`; values are in field units (SDF units for an SDF)."""

    resolution: int = 256  # cells per axis of the finest grid
    coarse_resolution: int = 64  # cells per axis of the dense first grid
    bounds: float = 1.05  # the grid spans [-bounds, bounds]^3
    band: float = 0.5  # refine cells whose corners have |value| < band (or a sign change)
    band_decay: float = 1.0  # band multiplier per doubling (0.5 follows the cell size for true SDFs)
    chunk_size: int = 65536  # query points per field call (bounds memory)
    min_component_fraction: Optional[float] = 0.02  # drop pieces with fewer faces than this x largest, and specks
    # under one grid cell's face in area when a larger piece is kept; None keeps all
    # > 0: a field with no inside vertex is meshed instead at the level of its `rescue_vertices`-th largest value,
    # if that level is above `rescue_floor`: the region the field comes closest to filling, rather than nothing
    rescue_vertices: int = 0
    rescue_floor: float = -0.5
    close_boundary: bool = True  # force the outer grid layer outside, so meshes are closed
    progress: bool = False  # show a progress bar over field calls


def vae_extract_config(resolution: int = 128, progress: bool = False) -> ExtractConfig:
    """How a VAE field becomes a mesh (generation and reconstruction alike): a dense first grid of 32 cells or more
    where the resolution allows (thin parts), refined by doublings up to `resolution` where |logit| < 0.95 (the
    VAE's logits are SDF / truncation clamped to [-1, 1])."""
    coarse = resolution // 4 if resolution >= 128 else resolution // 2 if resolution >= 64 else resolution
    return ExtractConfig(resolution=resolution, coarse_resolution=coarse, band=0.95, band_decay=0.5, chunk_size=32768,
                         progress=progress)


def _grid_points(index: torch.Tensor, resolution: int, bounds: float) -> torch.Tensor:
    """Integer vertex indices (M, 3) of a resolution^3-cell grid -> coordinates (M, 3)."""
    return index.float() * (2.0 * bounds / resolution) - bounds


def _evaluate(field: Field, points: torch.Tensor, chunk_size: int, device: torch.device, bar) -> torch.Tensor:
    """Evaluate the field on points (M, 3) in chunks; returns float32 values (M,) on CPU."""
    out = torch.empty(points.shape[0], dtype=torch.float32)
    for start in range(0, points.shape[0], chunk_size):
        chunk = points[start:start + chunk_size].to(device)
        with torch.no_grad():
            out[start:start + chunk.shape[0]] = field(chunk).float().reshape(-1).cpu()
        if bar is not None:
            bar.update(chunk.shape[0])
    return out


def _active_cells(values: torch.Tensor, band: float) -> torch.Tensor:
    """Vertex grid (R+1)^3 -> bool (R)^3 cells near the surface, dilated by one cell."""
    corners = torch.stack([values[i:values.shape[0] - 1 + i, j:values.shape[1] - 1 + j, k:values.shape[2] - 1 + k]
                           for i in (0, 1) for j in (0, 1) for k in (0, 1)])  # (8, R, R, R)
    sign_change = (corners.amax(0) > 0) & (corners.amin(0) <= 0)
    near = corners.abs().amin(0) < band
    active = (sign_change | near).float()[None, None]  # (1, 1, R, R, R)
    return F.max_pool3d(active, kernel_size=3, stride=1, padding=1)[0, 0] > 0


def evaluate_grid(field: Field, config: ExtractConfig = ExtractConfig(), device: Optional[torch.device] = None) -> np.ndarray:
    """Values of `field` on the (resolution+1)^3 vertex grid, exact near the surface only.

    A dense coarse grid is evaluated first; each doubling then re-evaluates only the vertices of
    cells that straddle the surface or lie within `band` of it. Elsewhere the values are
    trilinear upsamplings of the coarser grid, whose signs are all marching cubes needs.
    """
    R, R0 = config.resolution, config.coarse_resolution
    if R0 < 2 or R < R0 or R % R0 != 0 or ((R // R0) & (R // R0 - 1)) != 0:
        raise ConfigError(f"resolution {R} must be coarse_resolution {R0} times a power of two")
    device = torch.device("cpu") if device is None else torch.device(device)
    bar = None
    if config.progress:
        from tqdm import tqdm

        bar = tqdm(desc="decode field", unit="pt", unit_scale=True, leave=False)

    axis = torch.arange(R0 + 1)
    index = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)  # ((R0+1)^3, 3)
    values = _evaluate(field, _grid_points(index, R0, config.bounds), config.chunk_size, device, bar)
    values = values.view(R0 + 1, R0 + 1, R0 + 1)
    res, band = R0, config.band
    while res < R:
        active = _active_cells(values, band)  # (res, res, res)
        band *= config.band_decay
        res *= 2
        values = F.interpolate(values[None, None], size=(res + 1,) * 3, mode="trilinear", align_corners=True)[0, 0]
        # Vertices of the children of active cells: every fine vertex within an active coarse cell.
        fine_active = active.repeat_interleave(2, 0).repeat_interleave(2, 1).repeat_interleave(2, 2).float()
        vertex_mask = F.max_pool3d(F.pad(fine_active, (1, 1, 1, 1, 1, 1))[None, None], kernel_size=2, stride=1)[0, 0] > 0
        index = vertex_mask.nonzero()  # (M, 3)
        if index.shape[0]:
            values[index[:, 0], index[:, 1], index[:, 2]] = _evaluate(
                field, _grid_points(index, res, config.bounds), config.chunk_size, device, bar)
    if bar is not None:
        bar.close()
    grid = values.numpy()
    if config.close_boundary:
        outside = np.minimum(grid, -1e-6)
        for axis_ in range(3):
            for side in (0, -1):
                sl = [slice(None)] * 3
                sl[axis_] = side
                grid[tuple(sl)] = outside[tuple(sl)]
    return grid


def rescue_level(grid: np.ndarray, vertices: int, floor: float) -> Optional[float]:
    """The level that puts the `vertices` highest grid values inside, for a field with none above 0; None if below `floor`."""
    if vertices <= 0 or grid.max() > 0:
        return None
    values = grid[1:-1, 1:-1, 1:-1].ravel()  # the closed boundary layer never counts
    level = float(np.partition(values, -vertices)[-vertices]) if vertices <= values.size else float(values.min())
    return level if level > floor else None


def mesh_from_grid(grid: np.ndarray, config: ExtractConfig) -> trimesh.Trimesh:
    """Marching cubes at level 0 of a vertex grid spanning [-bounds, bounds]^3 (positive inside), floaters dropped.

    With `config.rescue_vertices` > 0 a grid with nothing inside is meshed at `rescue_level` instead.
    """
    from skimage.measure import marching_cubes

    bounds, min_component_fraction = config.bounds, config.min_component_fraction
    level = 0.0
    rescue = rescue_level(grid, config.rescue_vertices, config.rescue_floor)
    if rescue is not None:
        level = np.nextafter(np.float32(rescue), np.float32(-np.inf))  # just below: the top values are inside
    if not (grid.max() > level and grid.min() < level):
        return trimesh.Trimesh(vertices=np.zeros((0, 3)), faces=np.zeros((0, 3), dtype=np.int64))
    spacing = 2.0 * bounds / (grid.shape[0] - 1)
    verts, faces, _, _ = marching_cubes(grid, level=float(level), spacing=(spacing,) * 3, gradient_direction="ascent")
    mesh = trimesh.Trimesh(vertices=verts - bounds, faces=faces, process=True)
    if min_component_fraction is not None and len(mesh.faces):
        pieces = mesh.split(only_watertight=False)
        if len(pieces) > 1:
            largest = max(len(p.faces) for p in pieces)
            keep = [p for p in pieces if len(p.faces) >= min_component_fraction * largest]
            # a speck smaller than one cell's face (a corner grazing the level) is below what the grid resolves
            keep = [p for p in keep if p.area >= spacing**2] or keep
            mesh = trimesh.util.concatenate(keep)
    return mesh


def extract_mesh(field: Field, config: ExtractConfig = ExtractConfig(), device: Optional[torch.device] = None) -> trimesh.Trimesh:
    """Mesh of the zero level set of `field` (positive inside); empty mesh when there is none."""
    grid = evaluate_grid(field, config, device)
    return mesh_from_grid(grid, config)
