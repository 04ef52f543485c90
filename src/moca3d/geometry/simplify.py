"""Triangle budgets for generated components: quadric decimation of the marching-cubes meshes.

A generation at 128³ gives tens of thousands of triangles per part; `--faces N` caps the whole output at N. The
budget is shared in proportion to each component's triangle count (its size and detail), so small parts are not
starved, with at least MIN_COMPONENT_FACES each; a component already under its share is kept as it is. Decimation is
fast-simplification's quadric error metric (Fast-Quadric-Mesh-Simplification), which does not check topology: what it
pinches or folds is repaired where that closes the surface (`make_manifold`), and no component ends above its share.
"""

from __future__ import annotations

import numbers
from typing import List, Optional, Sequence

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
import trimesh

from moca3d.errors import ConfigError

MIN_COMPONENT_FACES = 20  # an icosahedron: below this a closed component is no longer its shape
MAX_PASSES = 12  # further runs, each aiming 20% lower, when one stops above a small budget
AGGRESSIONS = (7, 5, 3)  # fast-simplification's, tried in turn (7: its default, fastest and coarsest per pass)


def check_faces(faces: Optional[int], components: Optional[int] = None, dash: str = "--") -> None:
    """A triangle budget: None (no limit) or a whole number of at least MIN_COMPONENT_FACES per component (ConfigError)."""
    if faces is None:
        return
    whole = not isinstance(faces, bool) and isinstance(faces, numbers.Integral)
    if not whole or (not components and faces < MIN_COMPONENT_FACES):
        raise ConfigError(f"{dash}faces must be a whole number >= {MIN_COMPONENT_FACES}, got {faces}")
    if components and faces < MIN_COMPONENT_FACES * components:  # one rule, one message (no component: no floor)
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


def pinch_pairs(vertices: np.ndarray, faces: np.ndarray, halves: np.ndarray) -> list[tuple[int, int]]:
    """Pair the triangles around one edge shared by 2k of them: each with its angular neighbour across the wedge
    behind its normal (inside its solid), so every pair is one sheet; [] when the triangles do not alternate so."""
    F3 = faces.reshape(-1)
    a, b = F3[halves[0]], F3[(halves[0] // 3) * 3 + (halves[0] % 3 + 1) % 3]
    d = vertices[b] - vertices[a]
    tri = faces[halves // 3]  # (2k, 3)
    third = vertices[tri.sum(axis=1) - a - b]  # each triangle's vertex off the edge
    if np.linalg.norm(d) == 0:
        return []  # a collapsed edge: no direction to turn around
    d = d / np.linalg.norm(d)
    wing = (third - vertices[a]) - ((third - vertices[a]) @ d)[:, None] * d  # (2k, 3): towards it, across the edge
    if (np.linalg.norm(wing, axis=1) == 0).any():
        return []  # a flat triangle: no angle
    u = wing[0] / np.linalg.norm(wing[0])
    angle = np.arctan2(wing @ np.cross(d, u), wing @ u)
    corners = vertices[tri]
    normal = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    inside_ahead = np.einsum("ij,ij->i", -normal, np.cross(d, wing)) > 0  # its solid lies counter-clockwise of it
    order = np.argsort(angle)
    pairs = []
    for i, k in enumerate(order):
        ahead = order[(i + 1) % len(order)]
        if inside_ahead[k]:
            if inside_ahead[ahead]:
                return []  # two triangles in a row face the same way: not two touching sheets
            pairs.append((int(halves[k]), int(halves[ahead])))
    return pairs if 2 * len(pairs) == len(halves) else []


def single_triangles(faces: np.ndarray) -> np.ndarray:
    """(F, 3) triangles -> those over vertices no other triangle has: a triangle present twice (with either winding: a
    fin folded flat, or a two-triangle sliver enclosing nothing) goes with its twin, which leaves the surface closed."""
    if not len(faces):
        return faces
    _, twin_of, copies = np.unique(np.sort(faces, axis=1), axis=0, return_inverse=True, return_counts=True)
    return faces[copies[twin_of.reshape(-1)] == 1]


def make_manifold(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """`mesh` repaired where decimation folded it: a triangle present twice (a collapsed fin, no volume) is removed with
    its twin, and at an edge shared by four or more triangles (sheets pinched together) the triangles are paired into
    sheets (`pinch_pairs`); each vertex is then split into one copy per fan of triangles joined through an edge, so
    the pinched edge becomes one edge per sheet at the same place, each shared by two triangles.

    The surface keeps its shape; only where sheets touch do vertices appear twice (as MeshLab's "split non-manifold
    vertices"). A mesh without such places is returned as it is.
    """
    vertices = np.asarray(mesh.vertices)
    faces = single_triangles(np.asarray(mesh.faces))  # (F', 3)
    F = len(faces)
    corner_edges = np.stack([faces, np.roll(faces, -1, axis=1)], axis=-1).reshape(-1, 2)  # (3F, 2): corner k -> k+1
    _, edge_of, counts = np.unique(np.sort(corner_edges, axis=1), axis=0, return_inverse=True, return_counts=True)
    edge_of = edge_of.reshape(-1)
    # The half-edges (indices into corner_edges) joined in pairs: both of a manifold edge, the sheets of a pinched one.
    manifold = np.flatnonzero(counts[edge_of] == 2)
    order = manifold[np.argsort(edge_of[manifold], kind="stable")]
    first, second = list(order[0::2]), list(order[1::2])
    pinched = np.flatnonzero(counts[edge_of] > 2)
    pinched = pinched[np.argsort(edge_of[pinched], kind="stable")]
    for halves in np.split(pinched, np.flatnonzero(np.diff(edge_of[pinched])) + 1) if len(pinched) else []:
        for one, other in pinch_pairs(vertices, faces, halves):
            first.append(one)
            second.append(other)
    first, second = np.asarray(first, dtype=np.int64), np.asarray(second, dtype=np.int64)

    def corner(half: np.ndarray, end: int) -> np.ndarray:
        """The corner (3 * face + position) where half-edges start (end 0) or finish (end 1)."""
        return (half // 3) * 3 + (half % 3 + end) % 3

    a_first, b_first = corner(first, 0), corner(first, 1)
    same = faces.reshape(-1)[a_first] == faces.reshape(-1)[corner(second, 0)]  # the other triangle's half-edge runs a->b
    a_second = np.where(same, corner(second, 0), corner(second, 1))
    b_second = np.where(same, corner(second, 1), corner(second, 0))
    rows, cols = np.concatenate([a_first, b_first]), np.concatenate([a_second, b_second])
    graph = scipy.sparse.coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(3 * F, 3 * F))
    groups, label = scipy.sparse.csgraph.connected_components(graph, directed=False)  # (3F,): a fan per label
    vertex_of_group = np.zeros(groups, dtype=np.int64)
    vertex_of_group[label] = faces.reshape(-1)
    if groups == len(np.unique(faces)) and F == len(mesh.faces):
        return mesh  # one fan per vertex, no twins: already manifold
    return trimesh.Trimesh(vertices[vertex_of_group], label.reshape(F, 3), process=False)


def decimate(mesh: trimesh.Trimesh, faces: int, aggression: int) -> trimesh.Trimesh:
    """One fast-simplification run towards `faces` triangles (it may stop above them)."""
    import fast_simplification  # here, not at import: training (e.g. on a GPU image without it) never needs it

    vertices, triangles = fast_simplification.simplify(mesh.vertices, mesh.faces, target_count=faces, agg=aggression)
    return trimesh.Trimesh(vertices, triangles, process=False)


def coarse_hull(mesh: trimesh.Trimesh, faces: int) -> trimesh.Trimesh:
    """The convex hull of faces / 2 + 2 of the mesh's vertices, picked farthest-first: at most `faces` triangles (a
    hull of k points has at most 2k - 4), the last resort for a budget decimation cannot reach."""
    vertices = np.asarray(mesh.vertices)
    picked = [int(np.argmax(np.linalg.norm(vertices - vertices.mean(0), axis=1)))]
    distance = np.linalg.norm(vertices - vertices[picked[0]], axis=1)
    while len(picked) < min(faces // 2 + 2, len(vertices)):
        picked.append(int(np.argmax(distance)))
        distance = np.minimum(distance, np.linalg.norm(vertices - vertices[picked[-1]], axis=1))
    return trimesh.convex.convex_hull(vertices[picked])


def repaired(mesh: trimesh.Trimesh, allowed: int) -> trimesh.Trimesh:
    """`mesh`, or `make_manifold`'s repair of it when that leaves at most `allowed` defective edges (a pinch keeps
    a closed surface; a repair that opened a hole would not)."""
    if edge_defects(mesh) <= allowed:
        return mesh
    fixed = make_manifold(mesh)
    return fixed if edge_defects(fixed) <= allowed else mesh


def simplify_mesh(mesh: trimesh.Trimesh, faces: int) -> trimesh.Trimesh:
    """`mesh` decimated to at most `faces` triangles (unchanged when it has no more), closed and manifold where it can be.

    Quadric decimation collapses edges without checking the surface's topology: where two sheets of a thin part come
    close it can pinch them into an edge shared by four triangles, or fold a fin into a triangle and its twin. Each
    attempt (aggressions 7, 5, 3) is repaired where that closes it (`make_manifold`); the first within the budget with
    no more defects than the input is kept, else the best one: a few pinched edges may remain, the surface still
    closed and consistently wound. A run that stops above a small budget is run again, aiming lower each time; where
    it stalls, the smallest islands are dropped, and a single island over the budget becomes a coarse convex hull.
    """
    if len(mesh.faces) <= faces:
        return mesh
    allowed = edge_defects(mesh)
    best, best_key = None, None
    for aggression in AGGRESSIONS:
        attempt = repaired(decimate(mesh, faces, aggression), allowed)
        key = (len(attempt.faces) > faces, edge_defects(attempt))  # within the budget first, then the fewest defects
        if best is None or key < best_key:
            best, best_key = attempt, key
        if key <= (False, allowed):
            break
    target = faces
    for _ in range(MAX_PASSES):
        if len(best.faces) <= faces:
            break
        target = max(4, int(target * 0.8))
        best = decimate(best, target, AGGRESSIONS[0])
    if len(best.faces) > faces:  # stalled (each further collapse would fold it): the largest islands that fit
        pieces = sorted(best.split(only_watertight=False), key=lambda p: -len(p.faces))
        kept, total = [], 0
        for piece in pieces:
            if total + len(piece.faces) <= faces:
                kept.append(piece)
                total += len(piece.faces)
        best = trimesh.util.concatenate(kept) if kept else coarse_hull(pieces[0], faces)
    single = single_triangles(np.asarray(best.faces))  # a fold that closed on its own: no edge defect to repair
    if 0 < len(single) < len(best.faces):
        best = trimesh.Trimesh(best.vertices, single, process=False)
    best.remove_unreferenced_vertices()
    return repaired(best, allowed)


def simplify_components(meshes: Sequence[trimesh.Trimesh], faces: Optional[int]) -> List[trimesh.Trimesh]:
    """Components decimated to share a budget of `faces` triangles in all (None: unchanged); see `face_budgets`."""
    if faces is None:
        return list(meshes)
    check_faces(faces, sum(1 for m in meshes if len(m.faces)), dash="")
    budgets = face_budgets([len(m.faces) for m in meshes], faces)
    return [simplify_mesh(m, b) for m, b in zip(meshes, budgets)]
