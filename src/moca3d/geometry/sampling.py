"""Surface sampling with normals (uniform by area + sharp edges) and farthest-point sampling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import trimesh

from moca3d.errors import ConfigError, InputError


@dataclass
class SurfaceSamplingConfig:
    """How many surface points to draw per component and how many of them on sharp edges."""

    num_points: int = 8192
    sharp_fraction: float = 0.25  # share of points on sharp edges (filled with uniform ones if none)
    sharp_angle_deg: float = 30.0  # an edge is sharp when its dihedral angle exceeds this


def _rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    """A numpy Generator from a seed (or pass one through)."""
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _sample_faces(mesh: trimesh.Trimesh, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Points uniform by area and their face normals, both (count, 3) float64."""
    areas = np.asarray(mesh.area_faces, dtype=np.float64)  # (F,)
    total = areas.sum()
    if not np.isfinite(total) or total <= 0:
        raise InputError("cannot sample a surface with zero area")
    face = rng.choice(len(areas), size=count, p=areas / total)  # (count,)
    tri = np.asarray(mesh.triangles, dtype=np.float64)[face]  # (count, 3, 3)
    u, v = rng.random(count), rng.random(count)
    flip = u + v > 1.0  # fold the unit square onto the triangle
    u[flip], v[flip] = 1.0 - u[flip], 1.0 - v[flip]
    xyz = tri[:, 0] + u[:, None] * (tri[:, 1] - tri[:, 0]) + v[:, None] * (tri[:, 2] - tri[:, 0])  # (count, 3)
    return xyz, np.asarray(mesh.face_normals, dtype=np.float64)[face]


def sample_uniform(mesh: trimesh.Trimesh, count: int, seed: int | np.random.Generator | None = 0) -> np.ndarray:
    """`count` points uniform by area with their face normals: (count, 6) float32 xyz+normal."""
    if count == 0:
        return np.zeros((0, 6), dtype=np.float32)
    xyz, normals = _sample_faces(mesh, count, _rng(seed))
    return np.concatenate([xyz, normals], axis=1).astype(np.float32)


def sharp_edges(mesh: trimesh.Trimesh, angle_deg: float = 30.0) -> tuple[np.ndarray, np.ndarray]:
    """Edges whose dihedral angle exceeds `angle_deg`: endpoints (E, 2, 3) and mean normals (E, 3)."""
    if len(mesh.faces) < 2:
        return np.zeros((0, 2, 3)), np.zeros((0, 3))
    # Merge coincident vertices so that the adjacency of faces is found across split seams.
    merged = trimesh.Trimesh(np.asarray(mesh.vertices), np.asarray(mesh.faces), process=True)
    angles = merged.face_adjacency_angles  # (A,) radians, 0 = coplanar
    keep = angles > np.radians(angle_deg)
    edges = merged.face_adjacency_edges[keep]  # (E, 2) vertex indices
    pairs = merged.face_adjacency[keep]  # (E, 2) face indices
    normals = merged.face_normals[pairs].sum(axis=1)  # (E, 3)
    normals /= np.linalg.norm(normals, axis=1, keepdims=True).clip(min=1e-12)
    return merged.vertices[edges], normals


def sample_sharp(
    mesh: trimesh.Trimesh, count: int, seed: int | np.random.Generator | None = 0, angle_deg: float = 30.0
) -> np.ndarray:
    """Up to `count` points on sharp edges, uniform by length: (M, 6) float32 (M = 0 if no sharp edge)."""
    rng = _rng(seed)
    ends, normals = sharp_edges(mesh, angle_deg)  # (E, 2, 3), (E, 3)
    lengths = np.linalg.norm(ends[:, 1] - ends[:, 0], axis=1)  # (E,)
    if count == 0 or len(lengths) == 0 or lengths.sum() <= 0:
        return np.zeros((0, 6), dtype=np.float32)
    edge = rng.choice(len(lengths), size=count, p=lengths / lengths.sum())  # (count,)
    t = rng.random(count)[:, None]
    xyz = ends[edge, 0] + t * (ends[edge, 1] - ends[edge, 0])  # (count, 3)
    return np.concatenate([xyz, normals[edge]], axis=1).astype(np.float32)


def sample_surface(
    mesh: trimesh.Trimesh, config: SurfaceSamplingConfig | None = None, seed: int | np.random.Generator | None = 0
) -> np.ndarray:
    """Uniform samples then sharp-edge samples: (P, 6) float32 xyz+normal, P = config.num_points."""
    config = config or SurfaceSamplingConfig()
    rng = _rng(seed)
    num_sharp = int(round(config.num_points * config.sharp_fraction))
    sharp = sample_sharp(mesh, num_sharp, rng, config.sharp_angle_deg)  # (S, 6), S in {0, num_sharp}
    uniform = sample_uniform(mesh, config.num_points - len(sharp), rng)  # (P - S, 6)
    return np.concatenate([uniform, sharp], axis=0)


def sample_points(
    meshes: list[trimesh.Trimesh], count: int, seed: int | np.random.Generator | None = 0
) -> np.ndarray:
    """`count` points uniform by area over the union of the components' surfaces: (count, 3) float64."""
    rng = _rng(seed)
    tris = np.concatenate([np.asarray(m.triangles, dtype=np.float64) for m in meshes], axis=0)  # (F, 3, 3)
    fused = trimesh.Trimesh(tris.reshape(-1, 3), np.arange(len(tris) * 3).reshape(-1, 3), process=False)
    return _sample_faces(fused, count, rng)[0]


def farthest_point_indices(xyz: torch.Tensor, num_samples: int, random_start: bool = False,
                           generator: Optional[torch.Generator] = None, backend: str = "auto") -> torch.Tensor:
    """Farthest-point sample per batch element: xyz (B, P, 3) -> indices (B, num_samples) long.

    Deterministic (starting from point 0) unless `random_start`. backend "auto" uses `fpsample`'s
    exact FPS on CPU and an iterative torch loop ("torch") elsewhere; both give the same indices.
    """
    B, P, _ = xyz.shape
    if num_samples > P:
        raise InputError(f"cannot take {num_samples} farthest points from {P} points")
    if num_samples == P:
        return torch.arange(P, device=xyz.device).expand(B, P).clone()
    if random_start:
        starts = torch.randint(0, P, (B,), generator=generator).tolist()
    else:
        starts = [0] * B
    if backend not in ("auto", "fpsample", "torch"):
        raise ConfigError(f"unknown FPS backend '{backend}'")
    if backend == "fpsample" or (backend == "auto" and xyz.device.type == "cpu"):
        import fpsample

        pts = xyz.detach().float().cpu().numpy()
        idx = [fpsample.fps_sampling(pts[b], num_samples, start_idx=int(starts[b])) for b in range(B)]
        return torch.from_numpy(np.stack(idx).astype(np.int64)).to(xyz.device)
    pts = xyz.detach().float()
    out = torch.empty(B, num_samples, dtype=torch.long, device=xyz.device)
    cur = torch.tensor(starts, device=xyz.device)
    dist = torch.full((B, P), float("inf"), device=xyz.device)
    batch = torch.arange(B, device=xyz.device)
    for i in range(num_samples):
        out[:, i] = cur
        d = (pts - pts[batch, cur][:, None]).pow(2).sum(-1)  # (B, P)
        dist = torch.minimum(dist, d)
        cur = dist.argmax(dim=1)
    return out
