"""VAE supervision: query points near the surface and in the volume, with signed distances.

Sign convention: POSITIVE INSIDE, zero on the surface, negative outside. The magnitude is the
exact distance to the nearest triangle; the sign comes from the generalised winding number
(Jacobson et al. 2013), which is an integer (0 or 1) for watertight meshes and degrades gracefully
on meshes with holes or cracks: a point is inside when its winding number exceeds 1/2.
For closed (watertight, consistently wound) meshes the winding number equals ray parity, so the
faster Embree ray test is used there, body by body so that overlapping closed parts stay inside. Distances are brute force over triangles in bounded chunks
(cost O(Q * F)): a float32 pass picks the few nearest triangles, float64 re-measures them; meshes
with more than `max_brute_faces` triangles use trimesh's tree-based closest point instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import trimesh

from moca3d.geometry.sampling import _rng, sample_uniform

CHUNK_PAIRS = 1 << 21  # point-triangle pairs evaluated at once (bounds memory to ~0.2 GB peak)
REFINE_CANDIDATES = 8  # nearest triangles (by the float32 pass) re-measured exactly in float64


@dataclass
class QueryConfig:
    """How supervision queries are drawn for one component."""

    num_queries: int = 8192
    near_fraction: float = 0.5  # share of queries jittered around the surface, the rest uniform
    near_sigmas: tuple[float, ...] = (0.005, 0.02, 0.05)  # jitter scales, cycled over near queries
    bound: float = 1.05  # uniform queries in [-bound, bound]^3 (canonical frame)
    truncation: float | None = None  # clamp |sdf| to this, or None to keep exact distances
    max_brute_faces: int = 50_000  # above this, use tree/ray based queries instead of brute force


def _chunk_size(num_faces: int) -> int:
    """Points per chunk so that a chunk holds about CHUNK_PAIRS point-triangle pairs."""
    return max(1, CHUNK_PAIRS // max(num_faces, 1))


def _dots(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """All dot products of points (Q, 3) with per-triangle vectors (F, 3): (Q, F)."""
    return p @ v.T


def _point_triangle_distance(p: torch.Tensor, tri: torch.Tensor, reduce: bool = True) -> torch.Tensor:
    """Distance from points (Q, 3) to their nearest triangle of (F, 3, 3): (Q,); squared (Q, F) if not reduce.

    Every term is a dot product of the point with a per-triangle vector, so the work is a few
    (Q, 3) x (3, F) matmuls plus elementwise (Q, F) arithmetic: no (Q, F, 3) intermediates.
    """
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]  # (F, 3) each
    n = torch.linalg.cross(b - a, c - a)  # (F, 3)
    n_len = n.norm(dim=1)  # (F,)
    unit_n = n / n_len.clamp(min=1e-30)[:, None]
    p_sq = (p * p).sum(1, keepdim=True)  # (Q, 1)
    # The point projects inside the triangle when it is on the inner side of all three edges.
    inside = (n_len > 1e-20)[None].expand(len(p), -1).clone()  # (Q, F)
    edge_dist_sq = None
    for u, v in ((a, b), (b, c), (c, a)):
        edge_normal = torch.linalg.cross(v - u, n)  # (F, 3), pointing out of the triangle
        inside &= _dots(p, edge_normal) <= (u * edge_normal).sum(1)[None]
        # Nearest point on the segment u + t (v - u), t clamped to [0, 1].
        uv = v - u
        uv_sq = (uv * uv).sum(1).clamp(min=1e-30)[None]  # (1, F)
        s = _dots(p, uv) - (u * uv).sum(1)[None]  # (Q, F) = (p - u) . uv
        t = (s / uv_sq).clamp(0, 1)
        pu_sq = p_sq - 2 * _dots(p, u) + (u * u).sum(1)[None]  # (Q, F) = |p - u|^2
        d_sq = pu_sq - 2 * t * s + t * t * uv_sq
        edge_dist_sq = d_sq if edge_dist_sq is None else torch.minimum(edge_dist_sq, d_sq)
    plane_sq = (_dots(p, unit_n) - (a * unit_n).sum(1)[None]) ** 2  # (Q, F)
    dist_sq = torch.where(inside, plane_sq, edge_dist_sq)  # (Q, F)
    return dist_sq if not reduce else dist_sq.min(dim=1).values.clamp(min=0).sqrt()


def _candidate_distance(p: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """Distance from each point (Q, 3) to the nearest of its own candidate triangles (Q, K, 3, 3): (Q,)."""
    a, b, c = tri[:, :, 0], tri[:, :, 1], tri[:, :, 2]  # (Q, K, 3) each
    q = p[:, None, :]  # (Q, 1, 3)
    n = torch.linalg.cross(b - a, c - a)  # (Q, K, 3)
    n_len = n.norm(dim=-1)
    inside = n_len > 1e-20
    edge_sq = None
    for u, v in ((a, b), (b, c), (c, a)):
        inside &= ((q - u) * torch.linalg.cross(v - u, n)).sum(-1) <= 0
        uv, uq = v - u, q - u
        t = ((uq * uv).sum(-1) / (uv * uv).sum(-1).clamp(min=1e-30)).clamp(0, 1)  # (Q, K)
        d_sq = ((uq - t[..., None] * uv) ** 2).sum(-1)
        edge_sq = d_sq if edge_sq is None else torch.minimum(edge_sq, d_sq)
    plane_sq = ((q - a) * n).sum(-1) ** 2 / (n_len**2).clamp(min=1e-30)
    return torch.where(inside, plane_sq, edge_sq).min(dim=1).values.sqrt()


def _winding_number(p: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """Generalised winding number of points (Q, 3) w.r.t. triangles (F, 3, 3): (Q,).

    Van Oosterom-Strackee solid angles with corners a = A - p, b = B - p, c = C - p, expanded so
    that each term is a matmul of the points with a per-triangle vector.
    """
    A, B, C = tri[:, 0], tri[:, 1], tri[:, 2]  # (F, 3) each
    p_sq = (p * p).sum(1, keepdim=True)  # (Q, 1)

    def length(v: torch.Tensor) -> torch.Tensor:  # |v - p|, (Q, F)
        return (p_sq - 2 * _dots(p, v) + (v * v).sum(1)[None]).clamp(min=0).sqrt()

    def dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # (u - p).(v - p), (Q, F)
        return (u * v).sum(1)[None] - _dots(p, u + v) + p_sq

    la, lb, lc = length(A), length(B), length(C)
    cross_sum = torch.linalg.cross(A, B) + torch.linalg.cross(B, C) + torch.linalg.cross(C, A)  # (F, 3)
    det = (A * torch.linalg.cross(B, C)).sum(1)[None] - _dots(p, cross_sum)  # (Q, F)
    denom = la * lb * lc + dot(A, B) * lc + dot(B, C) * la + dot(C, A) * lb
    return torch.atan2(det, denom).sum(dim=1) / (2.0 * math.pi)


def _triangles(mesh: trimesh.Trimesh) -> torch.Tensor:
    """The mesh's triangles as a float64 tensor (F, 3, 3)."""
    return torch.from_numpy(np.array(mesh.triangles, dtype=np.float64))


def winding_number(mesh: trimesh.Trimesh, points: np.ndarray) -> np.ndarray:
    """Generalised winding numbers (Q,) of points (Q, 3); ~1 inside, ~0 outside a closed mesh."""
    tri = _triangles(mesh)
    pts = torch.from_numpy(np.asarray(points, dtype=np.float64))
    out = torch.empty(len(pts), dtype=torch.float64)
    step = _chunk_size(len(tri))
    for s in range(0, len(pts), step):
        out[s : s + step] = _winding_number(pts[s : s + step], tri)
    return out.numpy()


def unsigned_distance(mesh: trimesh.Trimesh, points: np.ndarray, max_brute_faces: int = 50_000) -> np.ndarray:
    """Exact distance (Q,) from points (Q, 3) to the mesh surface."""
    points = np.asarray(points, dtype=np.float64)
    if len(mesh.faces) > max_brute_faces:
        _, dist, _ = trimesh.proximity.closest_point(mesh, points)
        return np.asarray(dist, dtype=np.float64)
    tri = _triangles(mesh)
    pts = torch.from_numpy(points)
    # Centre the coordinates so that the float32 pass loses as little precision as possible.
    origin = tri.reshape(-1, 3).mean(0)
    tri, pts = tri - origin, pts - origin
    tri32 = tri.float()
    k = min(REFINE_CANDIDATES, len(tri))
    out = torch.empty(len(pts), dtype=torch.float64)
    step = _chunk_size(len(tri))
    for s in range(0, len(pts), step):
        chunk = pts[s : s + step]
        # float32 over all triangles picks candidates; float64 on the k best gives the exact value.
        _, cand = torch.topk(_point_triangle_distance(chunk.float(), tri32, reduce=False), k, dim=1, largest=False)
        out[s : s + step] = _candidate_distance(chunk, tri[cand])  # tri[cand]: (q, k, 3, 3)
    return out.numpy()


def inside_mask(mesh: trimesh.Trimesh, points: np.ndarray) -> np.ndarray:
    """Boolean (Q,): points inside the mesh (ray parity if it is closed, else winding number > 1/2)."""
    points = np.asarray(points, dtype=np.float64)
    if mesh.is_watertight and mesh.is_winding_consistent:
        # Ray parity is wrong where closed bodies overlap (a point inside two of them has even parity), so each
        # connected body is tested on its own and counted with its orientation: an inward-facing body inside an
        # outward one is a cavity (a hollow part); one inside no other is a piece turned inside out, counted as solid.
        bodies = mesh.split(only_watertight=False)
        if all(b.is_watertight for b in bodies):
            solid = [b.volume > 0 for b in bodies]
            for i, body in enumerate(bodies):
                if not solid[i]:
                    probe = np.asarray(body.vertices[:1])
                    solid[i] = not any(s and other.contains(probe)[0] for s, other in zip(solid, bodies) if other is not body)
            count = np.zeros(len(points), dtype=np.int64)
            for body, is_solid in zip(bodies, solid):
                lo, hi = body.bounds
                near = np.all((points >= lo) & (points <= hi), axis=1)
                count[near] += np.where(body.contains(points[near]), 1 if is_solid else -1, 0)
            return count > 0
    return winding_number(mesh, points) > 0.5


def signed_distance(mesh: trimesh.Trimesh, points: np.ndarray, max_brute_faces: int = 50_000) -> np.ndarray:
    """Signed distance (Q,) float64, positive inside, zero on the surface, negative outside."""
    dist = unsigned_distance(mesh, points, max_brute_faces)
    return np.where(inside_mask(mesh, points), dist, -dist)


def sample_queries(
    mesh: trimesh.Trimesh, config: QueryConfig | None = None, seed: int | np.random.Generator | None = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Near-surface then uniform queries (Q, 3) float32 and their signed distances (Q,) float32."""
    config = config or QueryConfig()
    rng = _rng(seed)
    num_near = int(round(config.num_queries * config.near_fraction))
    base = sample_uniform(mesh, num_near, rng)[:, :3].astype(np.float64)  # (num_near, 3)
    sigmas = np.resize(np.asarray(config.near_sigmas, dtype=np.float64), num_near)  # (num_near,)
    near = base + rng.standard_normal((num_near, 3)) * sigmas[:, None]
    far = rng.uniform(-config.bound, config.bound, size=(config.num_queries - num_near, 3))
    points = np.concatenate([near, far], axis=0)  # (Q, 3)
    sdf = signed_distance(mesh, points, config.max_brute_faces)
    if config.truncation is not None:
        sdf = sdf.clip(-config.truncation, config.truncation)
    return points.astype(np.float32), sdf.astype(np.float32)
