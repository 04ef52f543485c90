"""Mesh I/O on trimesh: components in, one named GLB node per component out, normalisation.

An asset is a list of components (the parts of an object or the instances of a scene), each a
`trimesh.Trimesh` in one shared frame, plus one name per component. Components come from the
nodes of a scene file, from the files of a folder, or from connected components on request.
"""

from __future__ import annotations

import colorsys
import functools
import io
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trimesh

from moca3d.defaults import EXPORT_HINT, MESH_EXTENSIONS, OTHER_3D_FORMATS, TRIMESH_GENERATOR  # noqa: F401  (the formats read here; defaults: without trimesh's import)
from moca3d.errors import ConfigError, InputError, cannot_write, one_line, warn_input

CANONICAL_EXTENT = 2.0  # largest bounding-box side after normalisation: the asset fits [-1, 1]^3
MIN_COMPONENT_AREA = 1e-12  # relative to the squared asset extent; below this a component is empty
NAMED_FILES = 3  # files a warning about a folder names, before "..."


@dataclass
class Normalization:
    """Similarity transform into the canonical frame: x_canonical = (x - center) * scale."""

    center: np.ndarray  # (3,)
    scale: float

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Map points from the source frame into the canonical frame."""
        return (np.asarray(points, dtype=np.float64) - self.center) * self.scale

    def invert(self, points: np.ndarray) -> np.ndarray:
        """Map points from the canonical frame back into the source frame."""
        return np.asarray(points, dtype=np.float64) / self.scale + self.center

    def matrix(self) -> np.ndarray:
        """The 4x4 homogeneous matrix of `apply`."""
        m = np.eye(4)
        m[:3, :3] *= self.scale
        m[:3, 3] = -self.center * self.scale
        return m

    def to_dict(self) -> dict:
        """JSON-ready form, as stored in normalization.json."""
        return {"center": [float(c) for c in self.center], "scale": float(self.scale)}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalization":
        """Inverse of `to_dict`."""
        return cls(center=np.asarray(d["center"], dtype=np.float64), scale=float(d["scale"]))

    @classmethod
    def load(cls, path: str | Path) -> "Normalization":
        """Read a normalization.json file."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def fuse(meshes: list[trimesh.Trimesh]) -> trimesh.Trimesh:
    """All components concatenated into one mesh (no merging of vertices)."""
    if len(meshes) == 1:
        return meshes[0]
    return trimesh.util.concatenate(meshes)


# a file's up axis -> the rotation that stands it up in moca3d's frame (Y up, as glTF; renders look down on -Y's plane)
UP_ROTATIONS = {
    "y": np.eye(3),
    "z": np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]]),  # (x, y, z) -> (x, z, -y): Z up (CAD, STL, 3ds Max) becomes Y up
    "-z": np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]]),  # (x, y, z) -> (x, -z, y)
    "x": np.array([[0, -1.0, 0], [1, 0, 0], [0, 0, 1]]),  # (x, y, z) -> (-y, x, z)
    "-y": np.diag([1.0, -1, -1]),  # upside down: (x, y, z) -> (x, -y, -z)
}


def check_up_axis(up_axis: str, option: str = "--up-axis") -> None:
    """A one-line ConfigError, naming `option`, for an up axis UP_ROTATIONS does not have."""
    if up_axis not in UP_ROTATIONS:
        raise ConfigError(f"{option} must be one of {', '.join(UP_ROTATIONS)}, got '{up_axis}'")


def stand_up(meshes: list[trimesh.Trimesh], up_axis: str) -> list[trimesh.Trimesh]:
    """Copies of `meshes` turned so that their `up_axis` (UP_ROTATIONS) points up (+Y); "y": the meshes themselves."""
    check_up_axis(up_axis)
    if up_axis == "y":
        return meshes
    turn = np.eye(4)
    turn[:3, :3] = UP_ROTATIONS[up_axis]
    return [m.copy().apply_transform(turn) for m in meshes]


def bounds_of(meshes: list[trimesh.Trimesh]) -> np.ndarray:
    """Axis-aligned bounds (2, 3) of all components together."""
    verts = np.concatenate([np.asarray(m.vertices) for m in meshes], axis=0)  # (V, 3)
    return np.stack([verts.min(axis=0), verts.max(axis=0)])


def fit_normalization(meshes: list[trimesh.Trimesh], extent: float = CANONICAL_EXTENT) -> Normalization:
    """Centre the joint bounding box and scale its largest side to `extent`."""
    lo, hi = bounds_of(meshes)
    size = float((hi - lo).max())
    if not np.isfinite(size) or size <= 0:
        raise InputError("asset has a degenerate bounding box (all vertices coincide)")
    return Normalization(center=(lo + hi) / 2.0, scale=extent / size)


def transform_meshes(meshes: list[trimesh.Trimesh], norm: Normalization) -> list[trimesh.Trimesh]:
    """Copies of the components mapped by `norm` (visuals kept)."""
    out = []
    for m in meshes:
        m = m.copy()
        m.apply_transform(norm.matrix())
        out.append(m)
    return out


def normalize_meshes(
    meshes: list[trimesh.Trimesh], extent: float = CANONICAL_EXTENT
) -> tuple[list[trimesh.Trimesh], Normalization]:
    """Normalise all components together; returns the moved copies and the transform."""
    norm = fit_normalization(meshes, extent)
    return transform_meshes(meshes, norm), norm


def _cielab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB colours in [0, 1]: (K, 3) -> (K, 3), L in 0..100 (a perceptual distance: 1 is barely seen)."""
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = linear @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])  # relative to the white point
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz * 841 / 108 + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)


PALETTE_GOLDEN = 8  # palette's first colours, golden-ratio spaced in hue (as they always were); the next farthest-point
PALETTE_SIZE = 256  # the colours palette makes: component i >= PALETTE_SIZE takes colour i % PALETTE_SIZE


@functools.lru_cache(maxsize=8)
def _palette_rgb(seed: int) -> np.ndarray:
    """palette's PALETTE_SIZE colours (float RGB in [0, 1], (PALETTE_SIZE, 3)) for `seed`: PALETTE_GOLDEN golden-ratio
    spaced hues, then each the candidate (48 hues x 4 saturations x 5 values) farthest from those chosen, by the smaller
    of its CIELAB distance and 0.4 x its RGB distance (0..255): apart to the eye and in RGB (any two of the first 64
    over 45/255 apart; golden-ratio hues alone come back to a near colour every 21 and 34)."""
    start, golden = seed * 0.137, 0.618033988749895
    i = np.arange(PALETTE_GOLDEN)
    first = np.stack([(start + golden * i) % 1.0, np.full(PALETTE_GOLDEN, 0.65), 0.9 - 0.25 * (i % 3) / 2], axis=1)
    hue, sat, val = np.meshgrid((start + np.arange(48) / 48) % 1.0, [0.3, 0.5, 0.7, 0.9], [0.5, 0.625, 0.75, 0.875, 1.0],
                                indexing="ij")
    hsv = np.concatenate([first, np.stack([hue.ravel(), sat.ravel(), val.ravel()], axis=1)])  # (K, 3)
    rgb = np.array([colorsys.hsv_to_rgb(*c) for c in hsv])  # (K, 3)
    lab = _cielab(rgb)

    def apart(k: int) -> np.ndarray:  # (K,) every candidate's distance to candidate k
        return np.minimum(np.linalg.norm(lab - lab[k], axis=1), 0.4 * 255 * np.linalg.norm(rgb - rgb[k], axis=1))

    chosen = list(range(PALETTE_GOLDEN))
    nearest = np.min([apart(k) for k in chosen], axis=0)  # (K,) distance to the closest chosen colour
    while len(chosen) < PALETTE_SIZE:
        k = int(np.argmax(nearest))
        chosen.append(k)
        nearest = np.minimum(nearest, apart(k))
    return rgb[chosen]


def palette(n: int, seed: int = 0) -> np.ndarray:
    """`n` distinct, saturated RGBA colours (uint8, (n, 4)): golden-ratio hues, then farthest-point (`_palette_rgb`)."""
    rgb = _palette_rgb(int(seed))[np.arange(n) % PALETTE_SIZE]  # (n, 3)
    rgba = np.concatenate([rgb, np.ones((n, 1))], axis=1)
    return (rgba * 255).round().astype(np.uint8)


def linear_rgba(rgba: np.ndarray) -> np.ndarray:
    """RGBA display (sRGB) colours (uint8, (..., 4)) as linear floats in [0, 1] (alpha scaled only), as glTF's
    baseColorFactor holds them."""
    c = np.asarray(rgba, dtype=np.uint8) / 255.0
    rgb = np.where(c[..., :3] <= 0.04045, c[..., :3] / 12.92, ((c[..., :3] + 0.055) / 1.055) ** 2.4)
    return np.concatenate([rgb, c[..., 3:]], axis=-1)


def srgb_to_linear(rgba: np.ndarray) -> np.ndarray:
    """RGBA colours (uint8, (..., 4)) from display (sRGB) values to linear ones (`linear_rgba`, 8-bit, as trimesh
    keeps a material's colour), alpha unchanged."""
    return (linear_rgba(rgba) * 255).round().astype(np.uint8)


def linear_to_srgb(rgba: np.ndarray) -> np.ndarray:
    """RGBA colours (uint8, (..., 4)) from linear values (glTF's baseColorFactor) to display (sRGB) ones, alpha
    unchanged; `srgb_to_linear` then this gives a colour back within 1/255 from 60/255 up, 6/255 below."""
    rgba = np.asarray(rgba, dtype=np.uint8)
    c = rgba[..., :3] / 255.0
    srgb = np.where(c <= 0.0031308, c * 12.92, 1.055 * c ** (1 / 2.4) - 0.055)
    return np.concatenate([(srgb * 255).round().astype(np.uint8), rgba[..., 3:]], axis=-1)


DISPLAY_FACTORS = "moca3d_display_colors"  # mesh.metadata key: its file stored display (sRGB) base colours (`load_file`)
LINEAR_MARK = "moca3d_linear_colors"  # glTF scene extras of the files moca3d writes: base colours stored linear


def main_color(mesh: trimesh.Trimesh) -> np.ndarray | None:
    """The dominant RGBA display colour (uint8, (4,)) of a mesh's visual, or None if it has none: a PBR (glTF)
    material's base colour, linear in the file, comes back as sRGB like the rest."""
    visual = mesh.visual
    try:
        if isinstance(visual, trimesh.visual.ColorVisuals):
            if visual.defined:
                return np.asarray(visual.main_color, dtype=np.uint8)
            return None
        material = getattr(visual, "material", None)
        if isinstance(material, trimesh.visual.material.PBRMaterial):
            if material.baseColorFactor is None:  # a texture's colours, not one: the caller's own (trimesh said grey)
                return None
            if mesh.metadata.get(DISPLAY_FACTORS):  # written by moca3d before it stored them linear
                return np.asarray(material.baseColorFactor, dtype=np.uint8)
            return linear_to_srgb(material.baseColorFactor)
        if material is not None:
            return np.asarray(material.main_color, dtype=np.uint8)
    except (AttributeError, ValueError, IndexError):
        return None
    return None


def component_names(prefix: str, n: int) -> list[str]:
    """The node names of `n` generated components, `prefix`_00 on, zero-padded so they sort in order (part_000 at 100+)."""
    width = max(2, len(str(n - 1)))
    return [f"{prefix}_{i:0{width}d}" for i in range(n)]


def clean_name(name: str) -> str:
    """A component name on one line: control characters and runs of whitespace (line breaks included) become one
    space, none at either end (an OBJ `o` line ends at a line break: a name holding one would inject lines)."""
    return " ".join(re.sub(r"[\x00-\x1f\x7f-\x9f]", " ", str(name)).split())


def obj_name(name: str) -> str:
    """A component name as an OBJ `o` / `usemtl` line and a .mtl `newmtl` line hold it: `clean_name`'s, with "usemtl "
    in it as "usemtl_" (trimesh starts a material at every "usemtl ", not only at a line's start) and a last backslash
    as "_" (it would continue the line onto the next)."""
    return re.sub(r"\\$", "_", clean_name(name).replace("usemtl ", "usemtl_"))


def _unique_names(names: list[str]) -> list[str]:
    """Names made unique (and non-empty) by suffixing repeats with _1, _2, ..."""
    seen: dict[str, int] = {}
    out = []
    for i, name in enumerate(names):
        name = str(name).strip() or f"component_{i}"
        if name in seen:
            seen[name] += 1
            name = f"{name}_{seen[name]}"
        seen.setdefault(name, 0)
        out.append(name)
    return out


def _scene_components(scene: trimesh.Scene, source: str = "the file") -> tuple[list[trimesh.Trimesh], list[str]]:
    """One component per scene node holding a triangle mesh, in the scene frame, welded (one vertex per position:
    an STL's or a flat-shaded OBJ's closed surfaces are watertight), without unused vertices (they would widen the
    bounds) and, when closed but wound inside out (negative volume) or inconsistently, wound outward per closed body (its
    normals feed the VAE). Nodes of points or lines are left out, with an InputWarning naming them."""
    meshes, names, left_out = [], [], []
    for node in scene.graph.nodes_geometry:
        transform, geom_name = scene.graph[node]
        geom = scene.geometry[geom_name]
        if not isinstance(geom, trimesh.Trimesh):
            left_out.append(str(node))  # points, paths: not surfaces
            continue
        mesh = geom.copy()
        mesh.apply_transform(transform)
        if np.isfinite(mesh.vertices).all():  # (NaN / inf parts are refused later, by name)
            mesh.merge_vertices(merge_tex=True, merge_norm=True)
            mesh.remove_unreferenced_vertices()
            if mesh.is_watertight and (mesh.volume < 0 or not mesh.is_winding_consistent):  # inside out, or partly
                trimesh.repair.fix_normals(mesh, multibody=True)  # consistent, and outward per closed body
        meshes.append(mesh)
        names.append(str(node))
    if left_out and meshes:
        warn_input(f"{source}: {len(left_out)} part(s) are points or lines, not surfaces, and are left out "
                   f"(first: '{left_out[0]}')")
    return meshes, names


def load_file(path: str | Path) -> tuple[list[trimesh.Trimesh], list[str]]:
    """Components of one mesh file, in the file's order: one per scene node (a glTF mesh's
    primitives, e.g. one per material, stay one component), an OBJ's `o` objects (or, with fewer
    than two of those, its `g` groups; faces before the first of those lines are one more, named after
    the file, first); a single mesh gives one component named by the file's stem."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MESH_EXTENSIONS:
        raise InputError(f"{path.name}: unsupported mesh format (expected one of {', '.join(MESH_EXTENSIONS)})")
    if not path.is_file():
        raise InputError(f"mesh file not found: {path}")
    if path.stat().st_size == 0:
        raise InputError(f"{path.name}: the file is empty")
    order, renamed = _obj_order(path) if suffix == ".obj" else (node_order(path), None)  # the OBJ scanned once
    options = {}
    if suffix == ".obj":  # one component per `o` object (or `g` group), or one for the whole file, whatever
        # `usemtl` materials its faces use: trimesh would otherwise split each object by material (Blender's export)
        options = {f"split_{order[0]}" if order else "split_objects": True, "group_material": False}
    source = {"file_obj": str(path)}
    if renamed:  # two `o` objects of one name
        source = {"file_obj": _obj_with_unique_objects(path, renamed), "file_type": "obj",
                  "resolver": trimesh.resolvers.FilePathResolver(str(path))}  # its mtllib, beside it
    try:
        loaded = trimesh.load(**source, force="scene", process=False, **options)
    except Exception as err:  # trimesh raises many types on corrupt files
        raise InputError(f"{path.name}: unreadable mesh ({one_line(err, 120)})") from None
    meshes, names = _scene_components(loaded, path.name)
    if not meshes:
        raise InputError(f"{path.name}: contains no triangle mesh")
    if order and order[0] == "nodes":  # trimesh gives each primitive of a multi-primitive mesh a child node
        known, parents = set(order[1]), loaded.graph.transforms.parents
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(name if name in known else parents.get(name, name), []).append(i)
        meshes = [fuse([meshes[i] for i in g]) for g in groups.values()]
        names = list(groups)
    if order:  # keep the file's order: component i must stay component i
        rank = {name: i for i, name in enumerate(order[1])}
        perm = sorted(range(len(names)), key=lambda i: (rank.get(names[i], len(rank)), i))
        meshes, names = [meshes[i] for i in perm], [names[i] for i in perm]
    if len(names) == 1 and names[0] == path.name:  # trimesh names a lone mesh after its file
        names = [path.stem]
    if order and order[0] == "nodes" and _display_colors(path):
        for mesh in meshes:
            mesh.metadata[DISPLAY_FACTORS] = True
    return meshes, names


def _display_colors(path: Path) -> bool:
    """Whether a glTF file is one moca3d wrote before it stored base colours linear: its record and trimesh's generator,
    without the mark of linear colours (LINEAR_MARK: a re-save by trimesh keeps it, and trimesh's generator)."""
    try:
        doc = gltf_document(path) or {}
    except (OSError, ValueError):
        return False
    extras = ((doc.get("scenes") or [{}])[0] or {}).get("extras") or {}
    return (doc.get("asset") or {}).get("generator") == TRIMESH_GENERATOR and METADATA_KEY in extras and LINEAR_MARK not in extras


def gltf_document(path: Path) -> dict | None:
    """The JSON document of a .gltf or .glb file (a .glb's first chunk), None for other formats; OSError or
    ValueError when it cannot be read."""
    suffix = path.suffix.lower()
    if suffix == ".gltf":
        return json.loads(path.read_text())
    if suffix != ".glb":
        return None
    with open(path, "rb") as f:
        header = f.read(20)  # magic, version, length, then the JSON chunk's length and type
        if header[:4] != b"glTF":
            raise ValueError("not a binary glTF file")
        return json.loads(f.read(int.from_bytes(header[12:16], "little")))


def _obj_names(path: Path) -> tuple[dict[str, list[str]], set[str], list[str] | None]:
    """An OBJ's objects and its groups, each in file order and named as trimesh names them: first the faces before the
    first `o` (`g`) line, if any, after the file (the group's after the object it is in, if one is open); then one `o`
    name per `o` line, a repeated one made unique (leg, leg_1: each `o` line starts an object), and each `g` name once
    (exporters repeat a group's `g` line). Also the objects with at least one face, and, when an `o` name repeats, the
    unique names of the `o` lines (None otherwise)."""
    seen: dict[str, list[str]] = {"o": [], "g": []}
    renamed, objects, counts, filled, current, group, repeated = [], set(), {}, set(), None, None, False
    with open(path, "rb") as f:
        for line in f:
            if line[:2] in (b"o ", b"g "):
                tag, name = line[:1].decode(), _obj_line_name(line)
                if tag == "o" and name:
                    repeated |= name in objects
                    name = trimesh.util.unique_name(name, objects, counts=counts)
                    objects.add(name)
                    renamed.append(name)
                    seen["o"].append(name)
                elif name and name not in seen[tag]:
                    seen[tag].append(name)
                current, group = (name, group) if tag == "o" else (current, name)
            elif line[:2] == b"f ":
                if current is None:  # faces outside any object: trimesh names them after the file
                    current = path.name
                    seen["o"].append(current)
                if group is None:  # outside any group: after their object
                    group = current
                    seen["g"].append(group)
                filled.add(current)
    return seen, filled, renamed if repeated else None


def _obj_with_unique_objects(path: Path, names: list[str]) -> io.BytesIO:
    """The OBJ's text with its `o` lines renamed to `names` (`_obj_names`' unique ones, one per line): trimesh would
    merge two objects of one name into one component."""
    renamed = iter(names)
    with open(path, "rb") as f:
        lines = [f"o {next(renamed)}\n".encode() if line[:2] == b"o " and _obj_line_name(line) else line for line in f]
    return io.BytesIO(b"".join(lines))


def _obj_line_name(line: bytes) -> str:
    """The name an OBJ `o` or `g` line gives ("" for none)."""
    return line[2:].decode("utf-8", "replace").strip()


def _obj_order(path: Path) -> tuple[tuple[str, list[str]] | None, list[str] | None]:
    """An OBJ's `node_order` and, when two of its `o` objects share a name, the unique names its `o` lines are renamed
    to (`_obj_names`; None otherwise)."""
    try:
        seen, _, renamed = _obj_names(path)
    except OSError:
        return None, None
    for tag, kind in (("o", "objects"), ("g", "groups")):
        if len(seen[tag]) >= 2:
            return (kind, seen[tag]), renamed if tag == "o" else None
    return None, None


def _gltf_node_names(doc: dict) -> list[str]:
    """A glTF document's node names in file order, as trimesh names them: the name (or index), made unique."""
    names: list[str] = []
    counts: dict = {}
    for i, node in enumerate(doc.get("nodes", [])):
        names.append(trimesh.util.unique_name(str(node.get("name", i)), names, counts=counts))
    return names


def node_order(path: Path) -> tuple[str, list[str]] | None:
    """How a file's components are named, in file order: ("nodes", glTF node names as trimesh makes
    them unique), ("objects" | "groups", an OBJ's names when it has two or more), or None."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".obj":
            return _obj_order(path)[0]
        doc = gltf_document(path)
    except (OSError, ValueError):
        return None
    return None if doc is None else ("nodes", _gltf_node_names(doc))


def empty_components(path: Path) -> tuple[list[str], set[str]]:
    """A file's component names in file order (glTF nodes, or an OBJ's two or more `o` objects, named as `load_file`
    names them) and those of its empty components, which `load_file` leaves out: a glTF leaf node without a mesh, an
    `o` object without faces (how `save_components` keeps an empty component in its place); nothing for other formats,
    nor for files without moca3d's record (another tool's Empty node or line object is no component)."""
    try:
        if path.suffix.lower() == ".obj":
            with open(path, "rb") as f:
                if not f.readline().startswith(f"# {METADATA_KEY}:".encode()):
                    return [], set()
            seen, filled, _ = _obj_names(path)
            objects = seen["o"] if len(seen["o"]) >= 2 else []
            return objects, set(objects) - filled
        doc = gltf_document(path)
    except (OSError, ValueError):
        return [], set()
    if doc is None or METADATA_KEY not in ((doc.get("scenes") or [{}])[0].get("extras") or {}):
        return [], set()
    names = _gltf_node_names(doc)
    return names, {name for name, node in zip(names, doc.get("nodes", []))
                   if not any(key in node for key in ("mesh", "children", "camera", "extensions"))}


def keep_empty_components(path: Path, meshes: list[trimesh.Trimesh],
                          names: list[str]) -> tuple[list[trimesh.Trimesh], list[str]]:
    """The components `load_file` read from file `path` (its names, before any renaming) with its empty ones
    (`empty_components`) put back in file order, as empty meshes: component i stays component i."""
    order, empty = empty_components(path)
    empty -= set(names)
    if not empty:
        return meshes, names
    rank = {name: i for i, name in enumerate(order)}
    rows = sorted([*zip(names, meshes), *((name, trimesh.Trimesh()) for name in empty)],
                  key=lambda row: rank.get(row[0], len(rank)))
    return [mesh for _, mesh in rows], [name for name, _ in rows]


def unread_models(folder: Path, keep_own: bool = False) -> list[str]:
    """The names of `folder`'s files in 3D formats moca3d does not read (OTHER_3D_FORMATS: FBX, .blend, ...), sorted;
    one named as the folder (chair/chair.blend, the project its parts came from) only with `keep_own`."""
    return sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in OTHER_3D_FORMATS and (keep_own or p.stem != folder.name))


def part_files(folder: Path) -> list[Path]:
    """The mesh files directly in `folder`, sorted by name: a folder asset's parts (hidden files, such as macOS's
    `._name.obj`, are none, as `prepare` lists a folder)."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in MESH_EXTENSIONS)


def nested_mesh_files(folder: str | Path) -> list[str]:
    """The mesh files in `folder`'s (non-hidden) sub-folders, as paths relative to it, sorted: no part of a folder asset,
    which reads only the files directly in it."""
    folder = Path(folder)
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if Path(parent) != folder:
            found += [(Path(parent) / f).relative_to(folder).as_posix() for f in files
                      if not f.startswith(".") and Path(f).suffix.lower() in MESH_EXTENSIONS]
    return sorted(found)


def load_folder(folder: str | Path) -> tuple[list[trimesh.Trimesh], list[str]]:
    """Components from the mesh files of a folder, one per file (sorted by name, named by stem)."""
    folder = Path(folder)
    files = part_files(folder)
    if not files:
        nested = nested_mesh_files(folder)
        where = f" (only its sub-folders do, e.g. {nested[0]}: a part is a file directly in it)" if nested else ""
        unread = unread_models(folder, keep_own=True)
        if unread:
            where += f"; its {', '.join(unread[:NAMED_FILES])} are in formats moca3d does not read: {EXPORT_HINT}"
        raise InputError(f"{folder.name}: folder holds no mesh files{where}")
    meshes, names, several = [], [], []
    for f in files:
        parts, _ = load_file(f)
        meshes.append(fuse(parts))
        names.append(f.stem)
        if len(parts) > 1:
            several.append(f"{f.name}: {len(parts)}")
    if len(files) > 1 and len(several) == len(files):  # e.g. a category's folder of multi-part objects
        raise InputError(f"{folder.name}: each of its {len(files)} files holds several parts ({', '.join(several[:2])}): "
                         "a folder of whole objects, not one object's parts (one per file); prepare that folder itself")
    return meshes, names


def read_components(path: str | Path) -> tuple[list[trimesh.Trimesh], list[str]]:
    """Every component of a mesh file or folder, in its order and uniquely named, as `evaluate` (both sides), `info`
    and `reconstruct` read one: a file's (`load_file`) with its empty ones in place (`keep_empty_components`), a
    folder's one per mesh file (`load_folder`) or, when it holds a single mesh file, that file's. Not validated."""
    path = component_source(path)
    meshes, names = load_folder(path) if path.is_dir() else keep_empty_components(path, *load_file(path))
    return meshes, _unique_names(names)


def as_components(meshes: list[trimesh.Trimesh] | trimesh.Trimesh | trimesh.Scene | str | Path) -> list[trimesh.Trimesh]:
    """A component list from a list, one mesh (one component), a mesh file or folder (`read_components`: in its order,
    empty parts in place) or a trimesh.Scene (its meshes, placed; in no reliable order, its empty nodes dropped)."""
    if isinstance(meshes, (str, Path)):
        return read_components(meshes)[0]
    if isinstance(meshes, trimesh.Trimesh):
        return [meshes]
    if isinstance(meshes, trimesh.Scene):
        return [g for g in meshes.dump() if isinstance(g, trimesh.Trimesh)]
    expected = "trimesh meshes (a list, one mesh, a trimesh.Scene, a mesh file or folder)"
    try:
        meshes = list(meshes)
    except TypeError:
        raise InputError(f"expected {expected}, got {type(meshes).__name__}") from None
    wrong = next((type(m).__name__ for m in meshes if not isinstance(m, trimesh.Trimesh)), None)
    if wrong is not None:
        raise InputError(f"expected {expected}, got a list holding a {wrong}")
    return meshes


def component_source(path: str | Path) -> Path:
    """Where an asset's components are read from: `path` (checked to exist), or the one mesh file of a folder that holds
    a single one (its components: a lone part file gives the same one part). A folder's mesh files in sub-folders are
    not read: an InputWarning names them."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        files = part_files(path)
        unread = unread_models(path)
        if unread and files:  # a part in a format not read vanished from its asset (without files: load_folder's error)
            warn_input(f"{path.name}: {', '.join(unread[:NAMED_FILES])} not read (a format moca3d does not read): if "
                       f"parts, {EXPORT_HINT}")
        nested = nested_mesh_files(path) if files else []  # (without files, load_folder's error names them)
        if nested:
            files_are = "1 mesh file in its sub-folders is" if len(nested) == 1 else \
                f"{len(nested)} mesh files in its sub-folders are"
            warn_input(f"{path.name}: {files_are} not read, the parts are the files directly in it (move them up to "
                       f"keep them): {', '.join(nested[:NAMED_FILES])}{', ...' if len(nested) > NAMED_FILES else ''}")
        if len(files) == 1:
            return files[0]
    return path


def open_components(meshes: list[trimesh.Trimesh], names: list[str]) -> list[str]:
    """The names of the parts with faces that are not closed (watertight): prepare names them, reconstruct warns."""
    return [name for mesh, name in zip(meshes, names) if len(mesh.faces) and not mesh.is_watertight]


def split_connected(meshes: list[trimesh.Trimesh], names: list[str]) -> tuple[list[trimesh.Trimesh], list[str]]:
    """Re-split components into connected components (vertices merged first), named name_k."""
    out_meshes, out_names = [], []
    for mesh, name in zip(meshes, names):
        merged = trimesh.Trimesh(mesh.vertices, mesh.faces, process=True)
        pieces = merged.split(only_watertight=False)
        pieces = sorted(pieces, key=lambda p: -p.area)
        for k, piece in enumerate(pieces):
            out_meshes.append(piece)
            out_names.append(name if len(pieces) == 1 else f"{name}_{k}")
    return out_meshes, out_names


class TooManyComponentsError(InputError):
    """An asset of more components (`count`) than the maximum its caller allows (`validate_components`): the caller
    names the option that raises it."""

    def __init__(self, message: str, count: int):
        super().__init__(message)
        self.count = count

    def __reduce__(self):
        """Pickled with its count (a prepare worker's error)."""
        return type(self), (str(self), self.count)


def validate_components(
    meshes: list[trimesh.Trimesh], names: list[str], max_components: int | None = None, label: str = "asset"
) -> None:
    """Raise InputError (one line) for an empty asset, NaN vertices, zero-area parts, too many parts (TooManyComponentsError)."""
    if not meshes:
        raise InputError(f"{label}: no components")
    if max_components is not None and len(meshes) > max_components:
        raise TooManyComponentsError(f"{label}: {len(meshes)} components exceed the maximum of {max_components}", len(meshes))
    for mesh, name in zip(meshes, names):
        if len(mesh.faces) == 0 or len(mesh.vertices) == 0:
            raise InputError(f"{label}: component '{name}' is empty (no faces)")
        if not np.isfinite(np.asarray(mesh.vertices)).all():
            raise InputError(f"{label}: component '{name}' has non-finite (NaN/inf) vertices")
    lo, hi = bounds_of(meshes)
    size = float((hi - lo).max())
    if size <= 0:
        raise InputError(f"{label}: all vertices coincide")
    for mesh, name in zip(meshes, names):
        if not has_surface(mesh, size):
            raise InputError(f"{label}: component '{name}' has zero surface area")


def has_surface(mesh: trimesh.Trimesh, extent: float | None = None) -> bool:
    """Faces with some area: over MIN_COMPONENT_AREA of `extent` squared (the asset's size), or over 0 without one."""
    return len(mesh.faces) > 0 and mesh.area > (MIN_COMPONENT_AREA * extent * extent if extent is not None else 0.0)


def load_components(
    path: str | Path, connected: bool = False, max_components: int | None = None
) -> tuple[list[trimesh.Trimesh], list[str]]:
    """Read an asset (a mesh file, or a folder with one file per component: `component_source`) and validate it."""
    return load_asset(path, connected, max_components)[:2]


def degenerate_components(meshes: list[trimesh.Trimesh]) -> list[int]:
    """Indices of the components with no surface: no faces, or zero area (as `validate_components` measures it, against
    the extent of the asset). Non-finite vertices are not among them: a corrupt file is refused, not trimmed."""
    if not all(np.isfinite(np.asarray(m.vertices)).all() for m in meshes):
        return []
    faced = [m for m in meshes if len(m.faces)]
    if not faced:
        return list(range(len(meshes)))
    lo, hi = bounds_of(faced)
    size = float((hi - lo).max())
    return [i for i, m in enumerate(meshes) if not has_surface(m, size)]


def load_asset(path: str | Path, connected: bool = False, max_components: int | None = None,
               drop_degenerate: bool = False) -> tuple[list[trimesh.Trimesh], list[str], list[str]]:
    """`load_components`, and with `drop_degenerate` the components without a surface (`degenerate_components`, e.g. a
    stray node collapsed to a line) left out instead of refusing the asset; returns the kept ones, their names and the names left
    out."""
    source = component_source(path)
    meshes, names = load_folder(source) if source.is_dir() else load_file(source)
    if len(meshes) == 1 and not connected and source.is_file() and (materials := material_count(source)) > 1:
        warn_input(f"{source.name}: read as one part though its faces use {materials} materials: if they are its parts, "
                   "separate it by material (Blender: Edit > Separate > By Material) and export again; --connected "
                   "splits it into its pieces")
    if connected:  # the pieces first: a piece without surface is left out as a part would be
        meshes, names = split_connected(meshes, names)
    dropped = []
    if drop_degenerate:
        bad = degenerate_components(meshes)
        if len(bad) < len(meshes):  # all of them: the asset is refused as before, naming the first
            dropped = [names[i] for i in bad]
            meshes, names = [m for i, m in enumerate(meshes) if i not in bad], [n for i, n in enumerate(names) if i not in bad]
    return (*finish_components(meshes, names, False, max_components, label=Path(path).name), dropped)


def material_count(path: Path) -> int:
    """How many materials a file's faces use: an OBJ's distinct `usemtl` names, a glTF file's materials over its
    meshes' primitives; 0 for other formats or an unreadable file."""
    try:
        if path.suffix.lower() == ".obj":
            with open(path, "rb") as f:
                return len({line.split(maxsplit=1)[1].strip() for line in f if line.startswith(b"usemtl ") and len(line.split()) > 1})
        doc = gltf_document(path)
    except (OSError, ValueError):
        return 0
    if doc is None:
        return 0
    return len({p.get("material") for mesh in doc.get("meshes", []) for p in mesh.get("primitives", [])} - {None})


def finish_components(meshes: list[trimesh.Trimesh], names: list[str], connected: bool = False, max_components: int | None = None,
                      label: str = "asset") -> tuple[list[trimesh.Trimesh], list[str]]:
    """An asset's loaded components, split into connected pieces if asked, uniquely named and validated."""
    if connected:
        meshes, names = split_connected(meshes, names)
    names = _unique_names(names)
    validate_components(meshes, names, max_components, label=label)
    return meshes, names


def _named_colors(meshes: list[trimesh.Trimesh], names: list[str] | None, colors: np.ndarray | None,
                  clean: Callable[[str], str] = clean_name) -> tuple[list[str], np.ndarray]:
    """Unique names, each made one line by `clean` (`clean_name`; an OBJ's `obj_name`; default component_i) and RGBA
    uint8 colours (N, 4) (default `palette`), one per component: what both writers write, and what every reader reads
    back."""
    names = _unique_names([clean(n) for n in names] if names is not None else [f"component_{i}" for i in range(len(meshes))])
    colors = palette(len(meshes)) if colors is None else np.asarray(colors, dtype=np.uint8)
    if len(names) != len(meshes) or len(colors) != len(meshes):
        raise InputError(f"{len(meshes)} components need as many names and colours, got {len(names)} and {len(colors)}")
    return names, colors


def _unit_vertex_normals(mesh: trimesh.Trimesh) -> np.ndarray:
    """A mesh's vertex normals (V, 3), each of unit length: glTF wants them so (viewers shade a zero one black), and a
    vertex whose faces' normals cancel (a two-sided fin) takes one of its faces' normals (or +z if it has none)."""
    normals = np.array(mesh.vertex_normals, dtype=np.float64)  # (V, 3); zero where a two-sided fin's faces cancel
    flat = np.linalg.norm(normals, axis=1) < 0.5
    if flat.any():
        first = np.full(len(normals), -1)
        first[mesh.faces[::-1].ravel()] = np.repeat(np.arange(len(mesh.faces))[::-1], 3)  # a face of each vertex
        normals[flat] = np.where(first[flat, None] >= 0, mesh.face_normals[np.maximum(first[flat], 0)], [0.0, 0.0, 1.0])
    return normals


def _colored_copy(mesh: trimesh.Trimesh, color: np.ndarray, name: str, origin: np.ndarray | None = None) -> trimesh.Trimesh:
    """A geometry-only copy coloured by a named PBR material (dielectric, base colour `color`, an sRGB display colour,
    stored linear as glTF defines it: Blender and three.js show `color`): viewers and DCC tools show a material's
    colour by default, not vertex colours (and glTF would multiply the two). Its vertices are about `origin` (3,)."""
    out = trimesh.Trimesh(np.asarray(mesh.vertices) - (0.0 if origin is None else origin), np.asarray(mesh.faces), process=False)
    out.vertex_normals = _unit_vertex_normals(out)  # (V, 3)
    material = trimesh.visual.material.PBRMaterial(name=name, baseColorFactor=srgb_to_linear(color), metallicFactor=0.0,
                                                   roughnessFactor=0.7)
    out.visual = trimesh.visual.TextureVisuals(material=material)
    return out


def components_scene(
    meshes: list[trimesh.Trimesh], names: list[str] | None = None, colors: np.ndarray | None = None
) -> trimesh.Scene:
    """A scene with one named node per component, each with its own coloured material and its pivot (the node's
    origin) at the centre of the component's box: a part turns about itself in a DCC tool, and sits where it was."""
    names, colors = _named_colors(meshes, names, colors)
    scene = trimesh.Scene()
    for mesh, name, color in zip(meshes, names, colors):
        if len(mesh.faces) == 0:  # an empty component keeps its named node, without geometry
            scene.graph.update(frame_to=name, frame_from=scene.graph.base_frame, matrix=np.eye(4))
            continue
        pivot = np.eye(4)
        pivot[:3, 3] = bounds_of([mesh]).mean(axis=0)  # (3,) the box's centre; the node's transform puts the part back
        scene.add_geometry(_colored_copy(mesh, color, name, pivot[:3, 3]), node_name=name, geom_name=name, transform=pivot)
    return scene


def _obj_text(meshes: list[trimesh.Trimesh], names: list[str] | None = None, colors: np.ndarray | None = None,
              mtllib: str | None = None) -> str:
    """Wavefront OBJ text with one `o NAME` object per component, in order (an empty component: its `o` line alone;
    NAME on one line, `obj_name`): `usemtl NAME` (its material in `mtllib`, `_mtl_text`), its vertices each followed
    by the component's RGB colour (0-1, for readers without the .mtl), its unit vertex normals (`vn`, as the GLB's), and
    faces `f v//vn`."""
    names, colors = _named_colors(meshes, names, colors, obj_name)
    lines, offset = [f"mtllib {mtllib}"] if mtllib else [], 1  # OBJ indices count from 1 over the whole file
    for mesh, name, color in zip(meshes, names, colors):
        lines.append(f"o {name}")
        if len(mesh.faces) == 0:
            continue
        mesh = trimesh.Trimesh(np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces), process=False)
        vertices = np.asarray(mesh.vertices)  # (V, 3)
        rgb = np.broadcast_to(color[:3] / 255.0, vertices.shape)  # (V, 3)
        corners = np.repeat(np.asarray(mesh.faces, dtype=np.int64) + offset, 2, axis=1)  # (F, 6): v, vn of each corner
        lines.append(f"usemtl {name}")
        lines.append("v " + trimesh.util.array_to_string(np.hstack([vertices, rgb]), col_delim=" ", row_delim="\nv ", digits=8))
        lines.append("vn " + trimesh.util.array_to_string(_unit_vertex_normals(mesh), col_delim=" ", row_delim="\nvn ", digits=6))
        lines.append(("f %d//%d %d//%d %d//%d\n" * len(corners) % tuple(corners.ravel().tolist())).rstrip("\n"))
        offset += len(vertices)
    return "\n".join(lines) + "\n"


def _mtl_text(names: list[str], colors: np.ndarray) -> str:
    """Wavefront MTL text, first `MTL_HEADER` (`mtl_target` knows the file by it), then one material per component,
    named as it (`_named_colors`): `Kd` its colour, otherwise as the GLB's material (no ambient: metallic 0; Blender's
    default white specular 0.5; `Ns` 90: Blender's roughness 1 - sqrt(Ns / 1000) = 0.7), opaque."""
    blocks = [f"newmtl {name}\nKa 0 0 0\nKd {r / 255:.6f} {g / 255:.6f} {b / 255:.6f}\nKs 0.5 0.5 0.5\nNs 90\nd 1\nillum 2\n"
              for name, (r, g, b) in zip(names, np.asarray(colors, dtype=np.int64)[:, :3].tolist())]
    return "\n".join([MTL_HEADER + "\n", *blocks])


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, then rename over the target."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:  # a failed write leaves neither a partial target nor the temporary file
        tmp.unlink(missing_ok=True)


def save_glb(
    path: str | Path,
    meshes: list[trimesh.Trimesh],
    names: list[str] | None = None,
    colors: np.ndarray | None = None,
    metadata: dict | None = None,
) -> Path:
    """Write a GLB scene, one named node per component (an empty one without a mesh), each with its own named colour
    material and vertex normals (atomic; InputError naming `path` if it fails).

    `metadata` (JSON values, e.g. how a generation was made) goes into the scene's glTF extras under "moca3d"."""
    path = Path(path)
    if not meshes:
        raise InputError(f"{path}: no components to write")
    if all(len(mesh.faces) == 0 for mesh in meshes):
        raise InputError(f"{path}: all {len(meshes)} components are empty: nothing to write")
    scene = components_scene(meshes, names, colors)
    if metadata:
        scene.metadata[METADATA_KEY] = metadata
    from moca3d import __version__

    named = dict(zip(*_named_colors(meshes, names, colors)))  # material name -> its display colour

    def stamp(tree: dict) -> None:
        """The writer's name in the file (trimesh puts its own); each part's base colour as exact linear floats
        (trimesh writes its 8-bit copy: up to 6/255 off in dark channels)."""
        tree["asset"]["generator"] = f"moca3d {__version__} (trimesh {trimesh.__version__})"
        for scene in tree.get("scenes", []):  # kept by a trimesh re-save, which puts back trimesh's generator
            scene.setdefault("extras", {})[LINEAR_MARK] = True
        for material in tree.get("materials", []):
            if material.get("name") in named:
                material.setdefault("pbrMetallicRoughness", {})["baseColorFactor"] = linear_rgba(named[material["name"]]).tolist()

    # vertex normals: smooth shading in every viewer
    data = scene.export(file_type="glb", include_normals=True, tree_postprocessor=stamp)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
    except OSError as err:
        raise cannot_write(path, err) from None
    return path


METADATA_KEY = "moca3d"  # a written file's record of how it was made (glTF scene extras, OBJ first comment)
MTL_HEADER = f"# {METADATA_KEY} materials, one per component"  # the first line of a .mtl moca3d wrote
# a .mtl moca3d wrote before the header (its blocks alone, as `_mtl_text` writes them), read up to MTL_SNIFF_BYTES
OLD_MTL = re.compile(rb"(newmtl [^\n]*\nKa 0 0 0\nKd [0-9. ]+\nKs 0.5 0.5 0.5\nNs 90\nd 1\nillum 2\n\n?)+")
MTL_SNIFF_BYTES = 1 << 20
MESH_FORMATS = (".glb", ".obj")  # what the CLI writes a generation as: one named node / one `o` object per component


def mtl_path(obj: Path) -> Path:
    """Where an OBJ's materials go: beside it, its name's spaces as underscores (`mtllib` takes a list of names)."""
    return obj.with_name(re.sub(r"\s+", "_", obj.stem) + ".mtl")


def mtl_target(path: Path) -> Path:
    """Where an OBJ at `path` writes its materials (`mtl_path`), checked free: InputError when a file there is not one
    moca3d wrote (its first line not `MTL_HEADER`, nor an earlier version's blocks alone, OLD_MTL: e.g. the user's own
    material library, or unreadable), which the write would replace. Anything else there (a folder) is left to the write to refuse."""
    mtl = mtl_path(path)
    if mtl.is_file():
        try:
            with open(mtl, "rb") as f:
                head = f.read(MTL_SNIFF_BYTES)
            ours = head.split(b"\n", 1)[0].rstrip(b"\r") == MTL_HEADER.encode() or OLD_MTL.fullmatch(head) is not None
        except OSError:
            ours = False
        if not ours:
            raise InputError(f"{mtl} is not a material file moca3d wrote: {path.name}'s materials would replace it "
                             "(move it, or choose another name for the .obj)")
    return mtl


def check_mesh_format(path: str | Path) -> Path:
    """`path` as a Path, if its suffix is one components are written as (MESH_FORMATS); InputError otherwise."""
    path = Path(path)
    if path.suffix.lower() not in MESH_FORMATS:
        raise InputError(f"{path}: components are written as .glb (one named node each) or .obj (one object each), "
                         f"not '{path.suffix or 'no suffix'}'")
    return path


def save_components(path: str | Path, meshes: list[trimesh.Trimesh], names: list[str] | None = None,
                    metadata: dict | None = None, colors: np.ndarray | None = None) -> Path:
    """Write the components as OBJ when `path` ends in .obj (`_obj_text`: one `o` object per component, an empty one
    without faces, each other with its material, vertex normals and colours; `metadata` as a first comment line; their
    materials in a sidecar <stem>.mtl, `_mtl_text`, replacing only one moca3d wrote, `mtl_target`; `load_file` reads
    the parts back, `keep_empty_components` the empty ones), as GLB when it ends in .glb (`save_glb`: named nodes, an
    empty one without a mesh, distinct colours, `metadata` in the glTF extras); atomic, InputError naming the path that
    fails, or `path` if it has another suffix. `colors`: RGBA uint8 (N, 4), default `palette`'s."""
    path = check_mesh_format(path)
    if path.suffix.lower() == ".glb":
        return save_glb(path, meshes, names, colors, metadata=metadata)
    if not any(len(mesh.faces) for mesh in meshes):
        raise InputError(f"{path}: all {len(meshes)} components are empty: nothing to write")
    mtl = mtl_target(path)
    names, colors = _named_colors(meshes, names, colors, obj_name)
    text = _obj_text(meshes, names, colors, mtllib=mtl.name)
    if metadata:  # "mtllib" escaped in its JSON strings: trimesh reads the material file's name after the first "mtllib"
        record = json.dumps(metadata).replace("mtllib", "mtl\\u006cib")
        text = f"# {METADATA_KEY}: {record}\n{text}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise cannot_write(path, err) from None
    _write_obj_and_mtl(path, text.encode(), mtl, _mtl_text(names, colors).encode())
    return path


def _write_obj_and_mtl(path: Path, obj: bytes, mtl: Path, materials: bytes) -> None:
    """Write an OBJ and its .mtl, each atomically: both into temporary siblings first (a failure there, e.g. a full disk,
    changes neither target), then the .obj renamed over its target, then the .mtl (a failed .obj, e.g. a folder in its
    place, leaves no new .mtl behind, nor takes an older .obj's .mtl away); InputError naming the path that failed."""
    staged = []  # (target, temporary sibling)
    try:
        for target, data in ((path, obj), (mtl, materials)):
            staged.append((target, target.with_name(f".{target.name}.tmp{os.getpid()}")))
            try:
                staged[-1][1].write_bytes(data)
            except OSError as err:
                raise cannot_write(target, err) from None
        for target, tmp in staged:
            try:
                os.replace(tmp, target)
            except OSError as err:
                raise cannot_write(target, err) from None
    finally:  # no temporary file is left behind
        for _, tmp in staged:
            tmp.unlink(missing_ok=True)


def save_separate(
    folder: str | Path, meshes: list[trimesh.Trimesh], names: list[str] | None = None, ext: str = "obj",
    metadata: dict | None = None,
) -> list[Path]:
    """One file per non-empty component into `folder`, named after it and in its colour in the whole (`palette`, by
    index), each atomic: glb as `save_glb` and obj as `save_components` (a named node / `o` object and material, vertex
    normals, `metadata`; an OBJ's .mtl beside it), ply with vertex colours and normals, stl the geometry alone."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise cannot_write(folder, err) from None
    names, colors = _named_colors(meshes, names, None)
    paths = []
    for mesh, name, color in zip(meshes, names, colors):
        if len(mesh.faces) == 0:
            continue
        path = folder / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.{ext}"
        if ext == "glb":
            save_glb(path, [mesh], [name], colors=color[None], metadata=metadata)
        elif ext == "obj":
            save_components(path, [mesh], [name], metadata=metadata, colors=color[None])
        else:
            part = trimesh.Trimesh(np.asarray(mesh.vertices), np.asarray(mesh.faces), process=False)
            if ext == "ply":
                part.vertex_normals = _unit_vertex_normals(part)  # (V, 3)
                part.visual.vertex_colors = np.broadcast_to(color, (len(part.vertices), 4))
                data = trimesh.exchange.ply.export_ply(part, vertex_normal=True)
            else:
                data = part.export(file_type=ext)
            try:
                atomic_write_bytes(path, data.encode() if isinstance(data, str) else data)
            except OSError as err:
                raise cannot_write(path, err) from None
        paths.append(path)
    return paths
