"""VecSetVAE: shapes, determinism, save/load, chunked decoding, training loop, resume, latents."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from moca3d.errors import ConfigError, InputError
from moca3d.models.vae import VecSetVAE, convert_triposg_state_dict, farthest_point_indices

TINY = dict(latent_channels=4, num_latents=16, num_attention_heads=2, width_encoder=32, width_decoder=32,
            num_layers_encoder=1, num_layers_decoder=1, embed_frequency=4)


def tiny_vae(seed: int = 0) -> VecSetVAE:
    torch.manual_seed(seed)
    return VecSetVAE(**TINY).eval()


def sphere_surface(n: int, radius: float = 0.5, center=(0.0, 0.0, 0.0), seed: int = 0) -> torch.Tensor:
    """(n, 6) points + outward normals on a sphere."""
    g = torch.Generator().manual_seed(seed)
    normals = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
    return torch.cat([torch.tensor(center) + radius * normals, normals], dim=-1)


# ----------------------------------------------------------------------------------------------
# Synthetic dataset in the prepared layout (spheres and boxes with analytic SDFs)
# ----------------------------------------------------------------------------------------------


def _box_sdf_inside(p: np.ndarray, center: np.ndarray, half: np.ndarray) -> np.ndarray:
    """Signed distance of a box, positive inside."""
    q = np.abs(p - center) - half
    outside = np.linalg.norm(np.maximum(q, 0.0), axis=1) + np.minimum(q.max(axis=1), 0.0)
    return -outside


def make_dataset(root: Path, num_assets: int = 6, points: int = 512, queries: int = 512, seed: int = 0) -> Path:
    """Write manifest.jsonl + assets/<id>/{mesh.glb, samples.npz}: each asset a sphere and a box."""
    from moca3d.geometry.mesh_io import save_glb

    rng = np.random.default_rng(seed)
    (root / "assets").mkdir(parents=True, exist_ok=True)
    lines = []
    for a in range(num_assets):
        asset_id = f"synth_{a:03d}"
        c_s = np.array([-0.4, 0.0, 0.0]) + rng.uniform(-0.1, 0.1, 3)
        r = rng.uniform(0.25, 0.4)
        c_b = np.array([0.45, 0.0, 0.0]) + rng.uniform(-0.1, 0.1, 3)
        half = rng.uniform(0.15, 0.35, 3)
        sphere = trimesh.creation.icosphere(subdivisions=3, radius=r)
        sphere.apply_translation(c_s)
        box = trimesh.creation.box(extents=2 * half)
        box.apply_translation(c_b)
        meshes, names = [sphere, box], ["sphere", "box"]
        surf, qp, qs = [], [], []
        sdfs = [lambda p: r - np.linalg.norm(p - c_s, axis=1), lambda p: _box_sdf_inside(p, c_b, half)]
        for mesh, sdf in zip(meshes, sdfs):
            xyz, face = trimesh.sample.sample_surface(mesh, points, seed=int(rng.integers(1 << 30)))
            surf.append(np.concatenate([xyz, mesh.face_normals[face]], axis=1))
            near = xyz[: queries // 2] + rng.normal(0, 0.02, (queries // 2, 3))
            far = rng.uniform(-1, 1, (queries - queries // 2, 3))
            p = np.concatenate([near, far])
            qp.append(p)
            qs.append(sdf(p))
        d = root / "assets" / asset_id
        d.mkdir(exist_ok=True)
        np.savez(d / "samples.npz", surface=np.stack(surf).astype(np.float32),
                 query_points=np.stack(qp).astype(np.float32), query_sdf=np.stack(qs).astype(np.float32))
        save_glb(d / "mesh.glb", meshes, names)
        split = "val" if a == num_assets - 1 else "train"
        lines.append(json.dumps({"id": asset_id, "split": split, "kind": "object", "category": "synthetic",
                                 "num_components": 2, "names": names}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root
