"""PartNet annotation folders as part assets: `moca3d prepare PartNet/data_v0 -o data/partnet`.

One PartNet asset is a folder (data_v0/<anno_id>/) holding
    result.json   the part hierarchy: a list of root nodes {"name", "text", "id", "children": [...]},
                  a node's meshes in "objs" (names of objs/<name>.obj), at least at its leaves
    result_after_merging.json
                  the same in the same format, its nodes merged into PartNet's per-category label set (the
                  hierarchy of its segmentation benchmark): `--partnet-hierarchy merged`
    objs/         one OBJ per annotated piece of geometry
    meta.json     {"model_cat": "Chair", ...} (optional here)
A part of the asset is a node of the hierarchy at depth `level` below the root (1: the root's children,
e.g. a chair's back, seat, base and arms), with every mesh of its subtree; a branch that ends above that
depth is one part. Depth 0 is the whole object as one part (all its roots, when it has several).

PartNet's meshes come from ShapeNet: many pieces are double-sided (each face twice, once reversed) or wound
inside out, and their generalized winding number (how `prepare` tells inside from outside on an open mesh)
is then 0 or -1 everywhere: every such part would "enclose no volume" and its asset be skipped. Each piece
is therefore welded, its reversed duplicate faces dropped and its winding made consistent and outward
(`orient_piece`) before the pieces of a part are fused. A single open sheet (a one-quad table top) still
encloses nothing and its asset is still skipped, with that reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import trimesh

from moca3d.errors import InputError
from moca3d.geometry.mesh_io import finish_components, fuse, load_file

RESULT, OBJS, META = "result.json", "objs", "meta.json"
HIERARCHIES = {"original": RESULT, "merged": "result_after_merging.json"}  # which file holds the parts' hierarchy
MAX_LEVEL = 16  # PartNet's hierarchies are at most a handful of levels deep


def is_partnet(path: str | Path) -> bool:
    """True for a PartNet annotation folder (result.json beside an objs/ folder)."""
    path = Path(path)
    return path.is_dir() and (path / RESULT).is_file() and (path / OBJS).is_dir()


def read_tree(folder: Path, hierarchy: str = "original") -> list[dict]:
    """The root nodes of the folder's hierarchy file (HIERARCHIES); InputError when it is missing or not a PartNet hierarchy."""
    name = HIERARCHIES[hierarchy]
    try:
        tree = json.loads((folder / name).read_text())
    except FileNotFoundError:
        raise InputError(f"{folder.name}: no {name} (asked for the {hierarchy} hierarchy)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{folder.name}: unreadable {name} ({err})") from None
    tree = [tree] if isinstance(tree, dict) else tree
    if not isinstance(tree, list) or not tree or not all(isinstance(node, dict) for node in tree):
        raise InputError(f"{folder.name}: {name} is not a PartNet hierarchy (a list of part nodes)")
    return tree


def node_objs(node: dict) -> list[str]:
    """The mesh names of a node's whole subtree (its own "objs" and its descendants'), each once, in order."""
    names = list(node.get("objs") or [])
    for child in node.get("children") or []:
        names += node_objs(child)
    return list(dict.fromkeys(names))


def parts_at(tree: list[dict], level: int) -> list[dict]:
    """The nodes `level` steps below the roots, and the leaves of branches that end above that depth (level 0:
    the one root, or one node holding all the roots of a hierarchy with several)."""
    if level == 0 and len(tree) > 1:
        return [{"name": "object", "children": list(tree)}]
    nodes = list(tree)
    for _ in range(level):
        nodes = [child for node in nodes for child in (node.get("children") or [node])]
    return nodes


def orient_piece(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """A copy of one mesh piece welded, without reversed duplicate faces (a double-sided surface is one side),
    wound consistently and outwards (per closed body; an open piece by the sign of its volume)."""
    mesh = mesh.copy()
    mesh.merge_vertices(merge_tex=True, merge_norm=True)
    mesh.update_faces(mesh.unique_faces())  # a face and its reverse have the same vertices: one is kept
    mesh.remove_unreferenced_vertices()
    trimesh.repair.fix_normals(mesh, multibody=True)
    if not mesh.is_watertight and mesh.volume < 0:  # fix_normals leaves an open piece's orientation as it was
        mesh.invert()
    return mesh


def mesh_path(folder: Path, obj: object, source: str = RESULT) -> Path:
    """objs/<obj>.obj of the folder; InputError for a name that is not a plain file name (a path out of objs/)."""
    name = str(obj)
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise InputError(f"{folder.name}: {source} names the mesh {name!r}, not a file of {OBJS}/")
    return folder / OBJS / f"{name}.obj"


def category(folder: str | Path) -> str | None:
    """The object's category from meta.json ("model_cat"), or None."""
    try:
        meta = json.loads((Path(folder) / META).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return str(meta["model_cat"]) if isinstance(meta, dict) and meta.get("model_cat") else None


def load_partnet(folder: str | Path, level: int = 1, connected: bool = False, max_components: int | None = None,
                 hierarchy: str = "original") -> tuple[list[trimesh.Trimesh], list[str]]:
    """Components (one per part at `level` of the `hierarchy`, its meshes fused) and their names, validated as any asset's."""
    folder = Path(folder)
    if not 0 <= level <= MAX_LEVEL:
        raise InputError(f"PartNet level must be between 0 and {MAX_LEVEL}, got {level}")
    if hierarchy not in HIERARCHIES:
        raise InputError(f"PartNet hierarchy must be one of {', '.join(HIERARCHIES)}, got '{hierarchy}'")
    source = HIERARCHIES[hierarchy]
    meshes, names = [], []
    for node in parts_at(read_tree(folder, hierarchy), level):
        objs = node_objs(node)
        if not objs:
            raise InputError(f"{folder.name}: part '{node.get('name', '?')}' (id {node.get('id', '?')}) lists no meshes")
        pieces = []
        for obj in objs:
            path = mesh_path(folder, obj, source)
            if not path.is_file():
                raise InputError(f"{folder.name}: {OBJS}/{obj}.obj, named by {source}, is missing")
            pieces += [orient_piece(piece) for piece in load_file(path)[0]]
        meshes.append(fuse(pieces))
        names.append(str(node.get("name") or node.get("text") or f"part{node.get('id', len(names))}"))
    return finish_components(meshes, names, connected, max_components, label=folder.name)
