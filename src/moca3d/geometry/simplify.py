"""Triangle budgets for generated components: quadric decimation of the marching-cubes meshes.

A generation at 128³ gives tens of thousands of triangles per part; `--faces N` caps the whole output at N. The
budget is shared in proportion to each component's triangle count (its size and detail), so small parts are not
starved, with at least MIN_COMPONENT_FACES each; a component already under its share is kept as it is. Decimation is
fast-simplification's quadric error metric (Fast-Quadric-Mesh-Simplification).
"""

from __future__ import annotations

import numbers
from typing import List, Optional, Sequence

import fast_simplification
import numpy as np
import trimesh

from moca3d.errors import ConfigError

MIN_COMPONENT_FACES = 20  # an icosahedron: below this a closed component is no longer its shape
AGGRESSIONS = (7, 5, 3)  # fast-simplification's, tried in turn (7: its default, fastest and coarsest per pass)


def check_faces(faces: Optional[int], components: Optional[int] = None, dash: str = "--") -> None:
    """A triangle budget: None (no limit) or a whole number of at least MIN_COMPONENT_FACES per component (ConfigError)."""
    if faces is None:
        return
    if isinstance(faces, bool) or not isinstance(faces, numbers.Integral) or faces < MIN_COMPONENT_FACES:
        raise ConfigError(f"{dash}faces must be a whole number >= {MIN_COMPONENT_FACES}, got {faces}")
    if components is not None and faces < MIN_COMPONENT_FACES * components:
        raise ConfigError(f"{dash}faces {faces} is too few for {components} components: at least {MIN_COMPONENT_FACES} each "
                          f"({MIN_COMPONENT_FACES * components} in all)")


def face_budgets(counts: Sequence[int], total: int) -> List[int]:
    """Per-component triangle budgets summing to at most `total`: shares in proportion to `counts`, each at least
    MIN_COMPONENT_FACES (or its own count if smaller) and never above its own count."""
    budgets = [int(c) for c in counts]
    if sum(budgets) <= total:
        return budgets
    fixed: dict[int, int] = {}  # components held at their floor or their own count; the others share what is left
    while True:
        free = [i for i in range(len(budgets)) if i not in fixed]
        left = total - sum(fixed.values())
        weight = sum(counts[i] for i in free)
        shares = {i: left * counts[i] / weight for i in free} if weight else {}
        small = {i: min(counts[i], MIN_COMPONENT_FACES) for i, s in shares.items() if s < min(counts[i], MIN_COMPONENT_FACES)}
        if not small:
            break
        fixed.update(small)
    for i, share in shares.items():
        fixed[i] = min(counts[i], int(share))
    return [fixed[i] for i in range(len(budgets))]


def edge_defects(mesh: trimesh.Trimesh) -> int:
    """Edges not shared by exactly two triangles (open or non-manifold); 0 for a closed manifold surface."""
    if not len(mesh.faces):
        return 0
    _, counts = np.unique(mesh.edges_sorted, axis=0, return_counts=True)
    return int((counts != 2).sum())


def simplify_mesh(mesh: trimesh.Trimesh, faces: int) -> trimesh.Trimesh:
    """`mesh` decimated to at most `faces` triangles (unchanged when it has no more), closed and manifold where it can be.

    Quadric decimation collapses edges without checking the surface's topology: where two sheets of a thin part come
    close it can pinch them into an edge shared by four triangles. Gentler aggressions often avoid that; the first
    attempt with no more defects than the input (else the one with the fewest) is kept.
    """
    if len(mesh.faces) <= faces:
        return mesh
    allowed = edge_defects(mesh)
    best, best_defects = None, None
    for aggression in AGGRESSIONS:
        vertices, triangles = fast_simplification.simplify(mesh.vertices, mesh.faces, target_count=faces, agg=aggression)
        attempt = trimesh.Trimesh(vertices, triangles, process=False)
        if len(attempt.faces) > faces:  # gentle aggressions may stop above the target
            continue
        defects = edge_defects(attempt)
        if best is None or defects < best_defects:
            best, best_defects = attempt, defects
        if defects <= allowed:
            break
    best.remove_unreferenced_vertices()
    return best


def simplify_components(meshes: Sequence[trimesh.Trimesh], faces: Optional[int]) -> List[trimesh.Trimesh]:
    """Components decimated to share a budget of `faces` triangles in all (None: unchanged); see `face_budgets`."""
    if faces is None:
        return list(meshes)
    check_faces(faces, sum(1 for m in meshes if len(m.faces)), dash="")
    budgets = face_budgets([len(m.faces) for m in meshes], faces)
    return [simplify_mesh(m, b) for m, b in zip(meshes, budgets)]
