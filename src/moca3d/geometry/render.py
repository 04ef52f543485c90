"""Headless CPU rendering by ray casting (trimesh + Embree): RGB on white plus instance masks.

One primary ray per (sub)pixel through a pinhole camera; the first hit gives the triangle, hence
the component (mask label i + 1, 0 = background) and a Lambert-shaded colour. No display, no
OpenGL: works anywhere trimesh's Embree backend (embreex) or its pure-numpy fallback runs.
Frame: y is up (glTF convention); the canonical asset lies in [-1, 1]^3.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import trimesh

from moca3d.errors import InputError
from moca3d.geometry.mesh_io import palette

ISOMETRIC_ELEVATION_DEG = math.degrees(math.atan(1.0 / math.sqrt(2.0)))  # 35.26: the cube diagonal
BACKGROUND = np.array([255, 255, 255], dtype=np.float64)


@dataclass
class RenderConfig:
    """Image size, anti-aliasing and lighting of the conditioning renders."""

    size: int = 256  # square images
    supersample: int = 2  # rays per pixel side; RGB averaged, mask from the centre ray
    fov_deg: float = 40.0
    margin: float = 1.08  # how much room is left around the asset's bounding sphere
    ambient: float = 0.35
    diffuse: float = 0.65
    object_elevation_deg: tuple[float, float] = (5.0, 35.0)  # random views of objects
    floor_color: tuple[int, int, int] = (200, 200, 200)


@dataclass
class Camera:
    """A pinhole camera looking at `target` from `position`, y up; OpenGL axes (looks down -z)."""

    position: tuple[float, float, float]
    target: tuple[float, float, float]
    fov_deg: float
    width: int
    height: int
    up: tuple[float, float, float] = (0.0, 1.0, 0.0)

    def camera_to_world(self) -> np.ndarray:
        """4x4 pose: columns are the camera's right, up and backward axes, then its position."""
        eye, target = np.asarray(self.position, dtype=np.float64), np.asarray(self.target, dtype=np.float64)
        back = eye - target
        back /= np.linalg.norm(back)
        right = np.cross(np.asarray(self.up, dtype=np.float64), back)
        if np.linalg.norm(right) < 1e-9:  # looking straight along `up`: pick any right axis
            right = np.cross(np.array([0.0, 0.0, 1.0]), back)
        right /= np.linalg.norm(right)
        pose = np.eye(4)
        pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, np.cross(back, right), back, eye
        return pose

    def intrinsics(self) -> np.ndarray:
        """3x3 pixel intrinsics (OpenCV style: x right, y down, principal point at the centre)."""
        focal = 0.5 * self.height / math.tan(math.radians(self.fov_deg) / 2)
        return np.array([[focal, 0, self.width / 2], [0, focal, self.height / 2], [0, 0, 1]])

    def rays(self, supersample: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Ray origins and unit directions, (H*s * W*s, 3) each, row-major from the top-left."""
        w, h = self.width * supersample, self.height * supersample
        half = math.tan(math.radians(self.fov_deg) / 2)
        ys = (1 - 2 * (np.arange(h) + 0.5) / h) * half  # (h,) image rows, top first
        xs = (2 * (np.arange(w) + 0.5) / w - 1) * half * w / h  # (w,)
        gx, gy = np.meshgrid(xs, ys)  # (h, w)
        local = np.stack([gx, gy, -np.ones_like(gx)], axis=-1).reshape(-1, 3)  # (h*w, 3)
        pose = self.camera_to_world()
        dirs = local @ pose[:3, :3].T
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        return np.broadcast_to(pose[:3, 3], dirs.shape).copy(), dirs

    def to_dict(self) -> dict:
        """JSON-ready form, with the derived pose and intrinsics for convenience."""
        d = asdict(self)
        d.update(convention="opengl", camera_to_world=self.camera_to_world().tolist(), intrinsics=self.intrinsics().tolist())
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Camera":
        """Inverse of `to_dict` (derived fields ignored)."""
        return cls(tuple(d["position"]), tuple(d["target"]), float(d["fov_deg"]), int(d["width"]), int(d["height"]), tuple(d["up"]))


def _fit_distance(radius: float, config: RenderConfig) -> float:
    """Camera distance at which a sphere of `radius` at the target fills the view with margin."""
    return config.margin * radius / math.sin(math.radians(config.fov_deg) / 2)


def _orbit(azimuth_deg: float, elevation_deg: float, distance: float, target: np.ndarray) -> np.ndarray:
    """Camera position on a sphere around `target` (azimuth 0 = looking from +z, y up)."""
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    return target + distance * np.array([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)])


def _bounding_sphere(meshes: list[trimesh.Trimesh]) -> tuple[np.ndarray, float]:
    """Centre (bounding-box centre) and radius enclosing all components."""
    verts = np.concatenate([np.asarray(m.vertices) for m in meshes], axis=0)  # (V, 3)
    center = (verts.min(0) + verts.max(0)) / 2
    return center, float(np.linalg.norm(verts - center, axis=1).max())


def orbit_camera(
    meshes: list[trimesh.Trimesh], azimuth_deg: float, elevation_deg: float, config: RenderConfig | None = None
) -> Camera:
    """A camera on the sphere around the components' bounding sphere, framing all of them."""
    config = config or RenderConfig()
    center, radius = _bounding_sphere(meshes)
    eye = _orbit(azimuth_deg, elevation_deg, _fit_distance(radius, config), center)
    return Camera(tuple(eye), tuple(center), config.fov_deg, config.size, config.size)


def object_camera(
    meshes: list[trimesh.Trimesh], rng: np.random.Generator, config: RenderConfig | None = None
) -> Camera:
    """A random view of an object: azimuth uniform, elevation in the configured range."""
    config = config or RenderConfig()
    azimuth = float(rng.uniform(0.0, 360.0))
    elevation = float(rng.uniform(*config.object_elevation_deg))
    return orbit_camera(meshes, azimuth, elevation, config)


def scene_camera(
    meshes: list[trimesh.Trimesh], config: RenderConfig | None = None, azimuth_deg: float = 45.0
) -> Camera:
    """An isometric view of a scene: looking down the cube diagonal from azimuth `azimuth_deg`."""
    return orbit_camera(meshes, azimuth_deg, ISOMETRIC_ELEVATION_DEG, config)


def render(
    meshes: list[trimesh.Trimesh],
    camera: Camera,
    colors: np.ndarray | None = None,
    backdrop: list[tuple[trimesh.Trimesh, tuple[int, int, int]]] | None = None,
    config: RenderConfig | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """RGB (H, W, 3) uint8 on white and label mask (H, W) (0 = background, i + 1 = component i): uint8, or uint16 beyond
    254 components (a 16-bit label map, as `load_masks` reads).

    `backdrop` meshes (e.g. a floor) are drawn in their colour but labelled background.
    """
    config = config or RenderConfig()
    if len(meshes) > 65534:
        raise InputError(f"render: {len(meshes)} components exceed the 65 534 labels of a 16-bit mask")
    colors = palette(len(meshes)) if colors is None else np.asarray(colors)
    backdrop = backdrop or []
    parts = list(meshes) + [m for m, _ in backdrop]
    labels = np.concatenate([np.full(len(m.faces), i + 1) for i, m in enumerate(meshes)]
                            + [np.zeros(len(m.faces), dtype=np.int64) for m, _ in backdrop])  # (F,)
    face_rgb = np.concatenate([np.tile(np.asarray(c[:3], dtype=np.float64), (len(m.faces), 1)) for m, c in zip(meshes, colors)]
                              + [np.tile(np.asarray(c, dtype=np.float64), (len(m.faces), 1)) for m, c in backdrop])  # (F, 3)
    scene_mesh = trimesh.util.concatenate([trimesh.Trimesh(m.vertices, m.faces, process=False) for m in parts])

    s = config.supersample
    origins, dirs = camera.rays(s)  # (R, 3), R = H*s * W*s
    hit = scene_mesh.ray.intersects_first(origins, dirs)  # (R,) triangle index or -1
    found = hit >= 0
    normals = scene_mesh.face_normals[hit[found]]  # (R', 3)
    normals *= -np.sign((normals * dirs[found]).sum(1, keepdims=True) + 1e-12)  # face the camera (two-sided)
    # A headlight from the camera plus a key light from above-left of the camera.
    pose = camera.camera_to_world()
    key = pose[:3, :3] @ np.array([-0.4, 0.8, 0.45])
    key /= np.linalg.norm(key)
    headlight = (normals * -dirs[found]).sum(1)  # (R',) >= 0 after the flip
    lambert = 0.5 * headlight + 0.5 * np.clip(normals @ key, 0.0, 1.0)
    shade = config.ambient + config.diffuse * lambert  # (R',)

    rgb = np.tile(BACKGROUND, (len(hit), 1))  # (R, 3)
    rgb[found] = face_rgb[hit[found]] * shade[:, None]
    label = np.zeros(len(hit), dtype=np.uint8 if len(meshes) <= 254 else np.uint16)
    label[found] = labels[hit[found]]

    h, w = camera.height, camera.width
    rgb = rgb.reshape(h, s, w, s, 3).mean(axis=(1, 3))  # (H, W, 3) box-filtered
    mask = label.reshape(h, s, w, s)[:, s // 2, :, s // 2]  # (H, W)
    return np.clip(rgb.round(), 0, 255).astype(np.uint8), mask


def floor_plane(meshes: list[trimesh.Trimesh], pad: float = 0.3, thickness: float = 0.01) -> trimesh.Trimesh:
    """A thin slab just below the lowest point of the components, slightly larger than their footprint."""
    verts = np.concatenate([np.asarray(m.vertices) for m in meshes], axis=0)
    lo, hi = verts.min(0), verts.max(0)
    extents = [hi[0] - lo[0] + 2 * pad, thickness, hi[2] - lo[2] + 2 * pad]
    slab = trimesh.creation.box(extents=extents)
    slab.apply_translation([(lo[0] + hi[0]) / 2, lo[1] - thickness / 2 - 1e-4, (lo[2] + hi[2]) / 2])
    return slab


def save_render(folder: str | Path, rgb: np.ndarray, mask: np.ndarray, camera: Camera) -> None:
    """Write render.png, mask.png (8-bit labels, 16-bit beyond 254 components) and camera.json into `folder`."""
    from PIL import Image

    folder = Path(folder)
    Image.fromarray(rgb).save(folder / "render.png")
    Image.fromarray(mask).save(folder / "mask.png")
    (folder / "camera.json").write_text(json.dumps(camera.to_dict(), indent=1))
