"""Triangle budgets (`--faces`): shares, decimation quality and topology, and the pipeline / CLI wiring."""

from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from moca3d.errors import ConfigError
from moca3d.geometry.extract import ExtractConfig, mesh_from_grid
from moca3d.geometry.simplify import (MIN_COMPONENT_FACES, check_faces, edge_defects, face_budgets, make_manifold, simplify_components,
                                      simplify_mesh)
from moca3d.metrics import chamfer, fscore
from moca3d.pipeline import MoCAPipeline

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "chair.png"


def marching_cubes_torus(resolution: int = 96) -> trimesh.Trimesh:
    """A closed marching-cubes surface, as the generator makes them: a torus (genus 1) of major 0.5, minor 0.2."""
    axis = np.linspace(-1.0, 1.0, resolution + 1)
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    inside = 0.2 - np.hypot(np.hypot(x, z) - 0.5, y)  # positive inside
    return mesh_from_grid(inside.astype(np.float32), ExtractConfig(resolution=resolution, bounds=1.0))


@pytest.mark.parametrize("seed", range(20))
def test_face_budgets_share_the_total_in_proportion_and_respect_the_floor(seed):
    """Random counts (some empty, some tiny) and totals: the budgets sum to at most the total, none exceeds its own
    count, each is at least min(count, MIN_COMPONENT_FACES), a larger count never gets a smaller budget, and counts
    within the total are kept exactly."""
    rng = np.random.default_rng(seed)
    counts = [int(c) for c in rng.choice([0, 5, 30, 400, 5000, 40000], size=rng.integers(1, 12))]
    nonempty = sum(1 for c in counts if c)
    total = int(rng.integers(MIN_COMPONENT_FACES * max(nonempty, 1), 2 * sum(counts) + MIN_COMPONENT_FACES + 1))
    budgets = face_budgets(counts, total)
    assert sum(budgets) <= total
    assert all(min(c, MIN_COMPONENT_FACES) <= b <= c for b, c in zip(budgets, counts))
    order = np.argsort(counts, kind="stable")
    assert all(budgets[i] <= budgets[j] for i, j in zip(order[:-1], order[1:]))
    if sum(counts) <= total:
        assert budgets == counts


def test_face_budgets_are_proportional_when_no_floor_binds():
    """Equal counts get equal shares; a count twice another gets twice its budget (to rounding)."""
    assert face_budgets([1000, 1000, 2000], 400) == [100, 100, 200]
    assert face_budgets([30, 10_000], 1000) == [MIN_COMPONENT_FACES, 980]  # the small one held at the floor


def test_decimated_torus_keeps_its_shape_and_topology():
    """A marching-cubes torus (tens of thousands of triangles) at 2 000 and 500: at most that many triangles, still
    closed and manifold, the same genus, volume within 2% / 5%, its surface within 0.0025 of the sampling noise floor
    (Chamfer) and F@0.02 above 0.99."""
    torus = marching_cubes_torus()
    assert edge_defects(torus) == 0 and len(torus.faces) > 20_000
    points = torus.sample(20_000, seed=0)
    floor = chamfer(torus.sample(20_000, seed=1), points)  # two samplings of the same surface: 0.014
    for faces, volume_tol in ((2000, 0.02), (500, 0.05)):
        small = simplify_mesh(torus, faces)
        assert len(small.faces) <= faces
        assert edge_defects(small) == 0 and small.is_winding_consistent
        assert small.euler_number == torus.euler_number == 0  # genus 1 kept
        assert abs(small.volume / torus.volume - 1) < volume_tol
        assert chamfer(small.sample(20_000, seed=1), points) < floor + 0.0025  # measured: +0.0003 / +0.0017
        assert fscore(small.sample(20_000, seed=1), points, tau=0.02) > 0.99


def test_simplify_components_under_budget_and_empty_parts_are_kept():
    """Within the budget nothing changes (the very same meshes); an empty component stays empty; over it, the total
    comes under the budget."""
    torus = marching_cubes_torus(48)
    empty = trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64))
    ball = trimesh.creation.icosphere(subdivisions=3)
    meshes = [torus, empty, ball]
    total = sum(len(m.faces) for m in meshes)
    assert simplify_components(meshes, None) == meshes
    assert all(a is b for a, b in zip(simplify_components(meshes, total), meshes))
    out = simplify_components(meshes, 1000)
    assert len(out[1].faces) == 0 and sum(len(m.faces) for m in out) <= 1000
    assert (len(out[0].faces) < len(out[2].faces)) == (len(torus.faces) < len(ball.faces))  # shares follow the sizes
    assert all(len(o.faces) < len(m.faces) for o, m in zip(out, meshes) if len(m.faces))


@pytest.mark.parametrize("faces", [20, 60, 200])
def test_a_part_of_several_islands_comes_under_a_small_budget(faces):
    """Six separate balls (1 920 triangles): one decimation run stops above small targets (each island keeps a few
    triangles), so further runs aim lower and, at the floor, the smallest islands go; never above the budget, every
    island kept closed."""
    balls = [trimesh.creation.icosphere(subdivisions=2, radius=0.1).apply_translation([0.3 * k, 0, 0]) for k in range(6)]
    mesh = trimesh.util.concatenate(balls)
    out = simplify_mesh(mesh, faces)
    assert 0 < len(out.faces) <= faces
    _, counts = np.unique(out.edges_sorted, axis=0, return_counts=True)
    assert (counts % 2 == 0).all()  # closed: no open edge


@pytest.mark.parametrize("faces", [0, 19, -5, 2.5, True, "100"])
def test_check_faces_refuses_what_is_not_a_budget(faces):
    with pytest.raises(ConfigError, match="--faces must be a whole number >= 20"):
        check_faces(faces)


def test_check_faces_needs_the_floor_for_every_component():
    check_faces(None, 50)
    check_faces(160, 8)
    with pytest.raises(ConfigError, match="--faces 100 is too few for 8 components: at least 20 each"):
        check_faces(100, 8)
    with pytest.raises(ConfigError, match="--faces 10 is too few for 4 components: at least 20 each"):
        check_faces(10, 4)  # one message for one rule (it said "a whole number >= 20" under 20, "too few" above)
    check_faces(100, 0)  # no component with faces: no floor to keep


def test_pipeline_and_cli_honour_the_budget_and_record_it(object_dataset, object_pipeline, tmp_path):
    """The same seed with and without a budget: the same latents, the budgeted meshes under it and recorded in the
    output's settings (and its file); the CLI refuses a budget below the floor before loading a model."""
    from typer.testing import CliRunner

    from moca3d.cli import app
    from moca3d.geometry.mesh_io import gltf_document

    root, _ = object_dataset
    image = sorted((root / "assets").iterdir())[0] / "render.png"
    pipe = MoCAPipeline.from_pretrained(object_pipeline, device="cpu")
    settings = dict(num_parts=2, steps=2, resolution=32, seed=0, show_progress=False)
    full = pipe(image, **settings)
    count = sum(len(m.faces) for m in full.meshes)
    assert count > 200, "the tiny model's parts are too small for this test"
    budget = max(2 * MIN_COMPONENT_FACES, count // 4)
    small = pipe(image, faces=budget, **settings)
    assert torch.equal(small.latents, full.latents)
    assert sum(len(m.faces) for m in small.meshes) <= budget < count
    assert small.settings["faces"] == budget and "faces" not in full.settings
    floor = pipe(image, faces=np.int64(2 * MIN_COMPONENT_FACES), **settings)  # the smallest budget: 20 a part
    assert sum(len(m.faces) for m in floor.meshes) <= 2 * MIN_COMPONENT_FACES
    assert all(len(m.faces) for m in floor.meshes)  # none emptied by the budget
    floor.save(tmp_path / "floor.obj")  # a numpy budget is recorded as a plain number (the OBJ's JSON comment)
    with pytest.raises(ConfigError, match="faces 30 is too few for 2 components"):
        pipe(image, faces=30, **settings)

    out = tmp_path / "small.glb"
    args = ["generate", str(image), "--model", object_pipeline, "--parts", "2", "--steps", "2", "--resolution", "32",
            "--device", "cpu", "-o", str(out)]
    result = CliRunner().invoke(app, args + ["--faces", str(budget)])
    assert result.exit_code == 0, result.output
    assert "triangles" in result.output
    scene = trimesh.load(out, force="scene")
    assert sum(len(g.faces) for g in scene.geometry.values()) <= budget
    assert gltf_document(out)["scenes"][0]["extras"]["moca3d"]["faces"] == budget
    refused = CliRunner().invoke(app, args + ["--parts", "4", "--faces", "50"])
    assert isinstance(refused.exception, ConfigError) and "--faces 50 is too few for 4 components" in str(refused.exception)


def two_tetrahedra_sharing_an_edge() -> trimesh.Trimesh:
    """Two closed tetrahedra pinched along the edge (0, 1): that edge is shared by four triangles."""
    vertices = np.array([[0, 0, 0], [1, 0, 0], [0.5, 1, 0.3], [0.5, 0.2, 1], [0.5, -1, 0.3], [0.5, -0.2, -1]], float)
    faces = []
    for tet in ([0, 1, 2, 3], [0, 1, 4, 5]):
        hull = trimesh.Trimesh(vertices[tet]).convex_hull  # outward wound
        index = [tet[int(np.argmin(np.linalg.norm(vertices[tet] - p, axis=1)))] for p in hull.vertices]
        faces.append(np.asarray(index)[hull.faces])
    return trimesh.Trimesh(vertices, np.concatenate(faces), process=False)


def test_make_manifold_splits_a_pinched_edge_and_drops_a_collapsed_fin():
    """A pinched edge becomes two edges at the same place (two more vertices, the same triangles and volume); a
    triangle present twice (a fin of no volume) goes with its twin; a closed manifold mesh comes back as it is."""
    pinched = two_tetrahedra_sharing_an_edge()
    assert edge_defects(pinched) == 1
    split = make_manifold(pinched)
    assert edge_defects(split) == 0 and split.is_winding_consistent
    assert len(split.faces) == 8 and len(split.vertices) == 8 and np.isclose(split.volume, pinched.volume)
    assert len(split.split(only_watertight=True)) == 2
    box = trimesh.creation.box()
    apex = len(box.vertices)
    a, b = box.faces[0][:2]
    fin = trimesh.Trimesh(np.vstack([box.vertices, [[3.0, 3.0, 3.0]]]),
                          np.vstack([box.faces, [[a, b, apex], [b, a, apex]]]), process=False)
    assert edge_defects(fin) == 1  # (a, b) holds four triangles; the fin's own edges two each
    repaired = make_manifold(fin)
    assert edge_defects(repaired) == 0 and len(repaired.faces) == len(box.faces)
    assert np.isclose(repaired.volume, box.volume)
    torus = marching_cubes_torus(32)
    assert make_manifold(torus) is torus


def test_triangles_present_twice_go_with_their_twins_after_decimation():
    """Decimation can fold an island into a triangle and its reversed twin: closed (each edge shared by two), so no
    repair saw it, but with no volume (trimesh divided by it). Twins go, in either winding; the rest stays."""
    from moca3d.geometry.simplify import single_triangles

    faces = np.array([[0, 1, 2], [2, 1, 3], [3, 4, 5], [5, 4, 3], [6, 7, 8], [7, 8, 6]])
    assert single_triangles(faces).tolist() == [[0, 1, 2], [2, 1, 3]]
    pipe = MoCAPipeline.from_pretrained()  # the built-in model at 2 steps folded such twins under these budgets
    for seed, budget in ((2, 400), (0, 200)):
        out = pipe(EXAMPLE, num_parts=8, steps=2, resolution=32, seed=seed, faces=budget, show_progress=False)
        for mesh in out.meshes:
            assert len(np.unique(np.sort(mesh.faces, axis=1), axis=0)) == len(mesh.faces)
            assert all(abs(piece.volume) > 1e-9 for piece in mesh.split(only_watertight=False))
