"""Geometry toolkit: GLB round trip, normalisation, sampling, FPS, inside/SDF, rendering."""

import numpy as np
import pytest
import torch
import trimesh

from moca3d.errors import InputError
from moca3d.geometry.inside import QueryConfig, inside_mask, sample_queries, signed_distance, unsigned_distance, winding_number
from moca3d.geometry.mesh_io import Normalization, load_components, normalize_meshes, save_glb, save_separate
from moca3d.geometry.render import RenderConfig, object_camera, render, scene_camera
from moca3d.geometry.sampling import (
    SurfaceSamplingConfig,
    farthest_point_indices,
    sample_points,
    sample_sharp,
    sample_surface,
    sharp_edges,
)


def _parts():
    """Three named components in one frame."""
    return [
        trimesh.creation.box(extents=[2, 0.2, 1]),
        trimesh.creation.cylinder(radius=0.1, height=1.0, sections=16).apply_translation([0.5, -0.6, 0]),
        trimesh.creation.icosphere(2, radius=0.3).apply_translation([0, 0.5, 0]),
    ], ["seat", "leg", "ball"]


def test_glb_round_trip_keeps_named_nodes_and_geometry(tmp_path):
    meshes, names = _parts()
    save_glb(tmp_path / "a.glb", meshes, names)
    loaded, loaded_names = load_components(tmp_path / "a.glb")
    assert loaded_names == names
    for a, b in zip(meshes, loaded):
        assert np.allclose(a.bounds, b.bounds, atol=1e-5)
        assert abs(a.volume - b.volume) < 1e-4


def test_folder_of_files_and_connected_components(tmp_path):
    meshes, names = _parts()
    save_separate(tmp_path / "parts", meshes, names, ext="obj")
    loaded, loaded_names = load_components(tmp_path / "parts")
    assert sorted(loaded_names) == sorted(names)
    fused = trimesh.util.concatenate(meshes)
    fused.export(tmp_path / "fused.ply")
    assert len(load_components(tmp_path / "fused.ply")[0]) == 1
    assert len(load_components(tmp_path / "fused.ply", connected=True)[0]) == 3


def _write_glb(path, nodes):
    """A minimal GLB: nodes = [(name or None, [box centres: one primitive each], translation)]."""
    import json
    import struct

    blob, views, accessors, meshes, gltf_nodes = b"", [], [], [], []
    for name, centres, translation in nodes:
        primitives = []
        for centre in centres:
            box = trimesh.creation.box(extents=(1, 1, 1))
            for array, target, kind in ((box.vertices.astype(np.float32) + np.float32(centre), 34962, "VEC3"),
                                        (box.faces.astype(np.uint32).ravel(), 34963, "SCALAR")):
                views.append({"buffer": 0, "byteOffset": len(blob), "byteLength": array.nbytes, "target": target})
                accessor = {"bufferView": len(views) - 1, "count": len(array), "type": kind,
                            "componentType": 5126 if kind == "VEC3" else 5125}
                if kind == "VEC3":
                    accessor.update(min=array.min(0).tolist(), max=array.max(0).tolist())
                accessors.append(accessor)
                blob += array.tobytes()
            primitives.append({"attributes": {"POSITION": len(accessors) - 2}, "indices": len(accessors) - 1})
        meshes.append({"primitives": primitives})
        node = {"mesh": len(meshes) - 1, "translation": list(translation)}
        if name is not None:
            node["name"] = name
        gltf_nodes.append(node)
    doc = {"asset": {"version": "2.0"}, "scene": 0, "scenes": [{"nodes": list(range(len(gltf_nodes)))}],
           "nodes": gltf_nodes, "meshes": meshes, "accessors": accessors, "bufferViews": views,
           "buffers": [{"byteLength": len(blob)}]}
    text = json.dumps(doc).encode()
    text += b" " * (-len(text) % 4)
    body = struct.pack("<II", len(text), 0x4E4F534A) + text + struct.pack("<II", len(blob), 0x004E4942) + blob
    path.write_bytes(struct.pack("<III", 0x46546C67, 2, 12 + len(body)) + body)


def test_components_keep_the_file_order_whatever_their_names(tmp_path):
    """Unnamed and repeated glTF nodes keep file order; a mesh's primitives stay one part; OBJ objects split."""
    _write_glb(tmp_path / "unnamed.glb", [(None, [(0, 0, 0)], (2.0 * i, 0, 0)) for i in range(4)])
    _write_glb(tmp_path / "repeated.glb", [("leg", [(0, 0, 0)], (2.0 * i, 0, 0)) for i in range(3)])
    _write_glb(tmp_path / "primitives.glb", [("seat", [(0, 0, 0), (0, 0, 1)], (0, 0, 0)), ("leg", [(0, 0, 0)], (3, 0, 0))])
    for name, count, names in (("unnamed", 4, ["0", "1", "2", "3"]), ("repeated", 3, ["leg", "leg_1", "leg_2"]),
                               ("primitives", 2, ["seat", "leg"])):
        meshes, got = load_components(tmp_path / f"{name}.glb")
        assert got == names, name
        centres = [m.bounds.mean(axis=0)[0] for m in meshes]
        assert centres == sorted(centres), name  # file order = left to right
    seat = load_components(tmp_path / "primitives.glb")[0][0]
    assert len(seat.faces) == 24 and np.allclose(seat.bounds, [[-0.5, -0.5, -0.5], [0.5, 0.5, 1.5]])
    box = trimesh.creation.box(extents=(1, 1, 1))
    for tag in ("o", "g"):
        lines = []
        for k, name in enumerate(("partB", "partA")):  # file order, not alphabetical
            lines.append(f"{tag} {name}")
            lines += [f"v {x + 3 * k} {y} {z}" for x, y, z in box.vertices]
            lines += [f"f {a + 1 + 8 * k} {b + 1 + 8 * k} {c + 1 + 8 * k}" for a, b, c in box.faces]
        (tmp_path / f"{tag}.obj").write_text("\n".join(lines) + "\n")
        meshes, names = load_components(tmp_path / f"{tag}.obj")
        assert names == ["partB", "partA"] and [len(m.faces) for m in meshes] == [12, 12], tag
        assert meshes[0].bounds.mean(axis=0)[0] < meshes[1].bounds.mean(axis=0)[0], tag
    box.export(tmp_path / "single.ply")
    assert load_components(tmp_path / "single.ply")[1] == ["single"]


def test_bad_meshes_raise_one_line_input_errors(tmp_path):
    (tmp_path / "junk.glb").write_bytes(b"not a mesh at all")
    with pytest.raises(InputError):
        load_components(tmp_path / "junk.glb")
    nan = trimesh.creation.box()
    nan.vertices[0] = [np.nan, 0, 0]
    nan.export(tmp_path / "nan.obj")
    with pytest.raises(InputError, match="non-finite|unreadable"):
        load_components(tmp_path / "nan.obj")
    meshes, names = _parts()
    save_glb(tmp_path / "many.glb", meshes, names)
    with pytest.raises(InputError, match="exceed"):
        load_components(tmp_path / "many.glb", max_components=2)
    with pytest.raises(InputError):
        load_components(tmp_path / "missing.glb")
    with pytest.raises(InputError, match="no components to write"):
        save_glb(tmp_path / "none.glb", [])
    assert not (tmp_path / "none.glb").exists()


def test_normalisation_fits_unit_cube_and_inverts():
    meshes, _ = _parts()
    moved = [m.copy().apply_scale(7.0).apply_translation([3, -2, 10]) for m in meshes]
    normed, norm = normalize_meshes(moved)
    verts = np.concatenate([m.vertices for m in normed])
    assert np.isclose(np.ptp(verts, axis=0).max(), 2.0)
    assert np.allclose((verts.min(0) + verts.max(0)) / 2, 0, atol=1e-9)
    assert np.allclose(norm.invert(normed[1].vertices), moved[1].vertices)
    assert np.allclose(Normalization.from_dict(norm.to_dict()).apply(moved[0].vertices), normed[0].vertices)


def test_surface_samples_lie_on_the_surface_with_outward_normals():
    mesh = trimesh.creation.icosphere(3, radius=0.7)
    samples = sample_surface(mesh, SurfaceSamplingConfig(num_points=2000), seed=0)
    assert samples.shape == (2000, 6) and samples.dtype == np.float32
    assert unsigned_distance(mesh, samples[:, :3]).max() < 1e-5
    radial = samples[:, :3] / np.linalg.norm(samples[:, :3], axis=1, keepdims=True)
    assert (np.sum(radial * samples[:, 3:], axis=1) > 0.95).all()
    assert np.array_equal(samples, sample_surface(mesh, SurfaceSamplingConfig(num_points=2000), seed=0))


def test_points_are_shared_over_components_by_area():
    """sample_points spreads its count over all components by area: a 1:3 area split takes 1/4 and 3/4 (5 sigma)."""
    small = trimesh.creation.box(extents=[1, 1, 1])  # area 6
    big = trimesh.creation.box(extents=[1, 1, 1]).apply_scale(np.sqrt(3)).apply_translation([5, 0, 0])  # area 18
    n = 20000
    points = sample_points([small, big], n, seed=3)
    share = float((points[:, 0] < 2.5).mean())
    assert abs(share - 0.25) < 5 * np.sqrt(0.25 * 0.75 / n)
    np.testing.assert_array_equal(points, sample_points([small, big], n, seed=3))  # seeded: the same points


def test_sharp_samples_lie_on_box_edges_and_smooth_shapes_have_none():
    box = trimesh.creation.box(extents=[1, 1, 1])
    assert len(sharp_edges(box)[0]) == 12  # the 12 cube edges; face diagonals are flat
    pts = sample_sharp(box, 500, seed=0)[:, :3]
    # On a cube edge two coordinates are at +-0.5.
    on_faces = (np.abs(np.abs(pts) - 0.5) < 1e-6).sum(axis=1)
    assert (on_faces >= 2).all()
    sphere = trimesh.creation.icosphere(3)
    assert len(sample_sharp(sphere, 100, seed=0)) == 0
    full = sample_surface(box, SurfaceSamplingConfig(num_points=400, sharp_fraction=0.25), seed=1)
    edge_rows = (np.abs(np.abs(full[:, :3]) - 0.5) < 1e-6).sum(axis=1) >= 2
    assert edge_rows[300:].all()  # uniform first, then sharp


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_farthest_point_sampling_count_and_spread(backend):
    rng = np.random.default_rng(0)
    # A dense cluster and a few far points: FPS must pick the far ones, random picks would not.
    pts = torch.from_numpy(np.concatenate([rng.normal(0, 0.01, (2000, 3)), np.eye(3) * 5, -np.eye(3) * 5])).float()
    idx = farthest_point_indices(pts[None], 16, backend=backend)[0]
    assert idx.shape == (16,) and len(set(idx.tolist())) == 16 and idx[0] == 0  # from point 0 unless random_start
    assert set(range(2000, 2006)) <= set(idx.tolist())
    with pytest.raises(InputError):
        farthest_point_indices(pts[None], 10_000)


def test_inside_and_sdf_on_primitives():
    box = trimesh.creation.box(extents=[1, 1, 1])
    pts = np.array([[0, 0, 0], [0.4, 0.4, 0.4], [0.6, 0, 0], [2, 2, 2], [0, 0.3, 0]])
    sdf = signed_distance(box, pts)
    assert np.allclose(sdf, [0.5, 0.1, -0.1, -np.sqrt(3 * 1.5**2), 0.2], atol=1e-9)
    sphere = trimesh.creation.icosphere(4, radius=0.5)
    rng = np.random.default_rng(0)
    q = rng.uniform(-1, 1, (3000, 3))
    r = np.linalg.norm(q, axis=1)
    keep = np.abs(r - 0.5) > 0.01  # away from the faceted surface
    assert np.array_equal(inside_mask(sphere, q[keep]), r[keep] < 0.5)
    assert np.allclose(signed_distance(sphere, q[keep]), 0.5 - r[keep], atol=2e-3)
    assert np.allclose(winding_number(sphere, q[keep]), (r[keep] < 0.5).astype(float), atol=1e-6)


def test_inside_is_robust_to_a_hole():
    box = trimesh.creation.box(extents=[1, 1, 1])
    top = np.where(box.face_normals[:, 1] > 0.9)[0]
    open_box = trimesh.Trimesh(box.vertices, np.delete(box.faces, top, axis=0), process=False)
    assert not open_box.is_watertight
    inside = np.array([[0, 0, 0], [0.3, -0.3, 0.2], [-0.4, -0.4, -0.4]])
    outside = np.array([[0, -0.8, 0], [1.2, 0, 0], [0, 0, -0.9], [0.8, 0.8, 0.8]])
    assert inside_mask(open_box, inside).all()
    assert not inside_mask(open_box, outside).any()
    assert (signed_distance(open_box, inside) > 0).all()


def test_queries_mix_near_and_uniform_points():
    box = trimesh.creation.box(extents=[1, 1, 1])
    points, sdf = sample_queries(box, QueryConfig(num_queries=1000), seed=0)
    assert points.shape == (1000, 3) and sdf.shape == (1000,)
    assert np.abs(sdf[:500]).mean() < 0.05  # jittered around the surface
    assert np.abs(points[500:]).max() <= 1.05
    assert (sdf > 0).any() and (sdf < 0).any()
    # Every value, row by row, is the unit box's exact signed distance (positive inside).
    q = np.abs(points) - 0.5
    exact = -(np.linalg.norm(np.maximum(q, 0), axis=1) + np.minimum(q.max(axis=1), 0))
    np.testing.assert_allclose(sdf, exact, atol=1e-5)
    _, clamped = sample_queries(box, QueryConfig(num_queries=1000, truncation=0.05), seed=0)
    np.testing.assert_allclose(clamped, exact.clip(-0.05, 0.05), atol=1e-5)


def test_render_is_non_empty_and_masks_match_silhouettes():
    meshes, _ = _parts()
    meshes, _ = normalize_meshes(meshes)
    config = RenderConfig(size=96, supersample=1)
    camera = object_camera(meshes, np.random.default_rng(0), config)
    rgb, mask = render(meshes, camera, config=config)
    assert rgb.shape == (96, 96, 3) and mask.shape == (96, 96)
    assert set(np.unique(mask)) <= {0, 1, 2, 3} and (mask == 1).sum() > 0
    assert ((rgb < 250).any(axis=2) == (mask > 0)).mean() > 0.99  # white exactly where no component
    for i, mesh in enumerate(meshes):
        _, alone = render([mesh], camera, config=config)
        visible = mask == i + 1
        # What component i shows in the composite lies inside its own silhouette.
        assert (alone[visible] == 1).all()
        assert visible.sum() > 0 or i == 1
    scene_rgb, _ = render(meshes, scene_camera(meshes, config), config=config)
    assert (scene_rgb < 250).any()
    assert camera.to_dict()["width"] == 96


def test_inside_is_right_where_closed_parts_overlap():
    # Two overlapping closed boxes fused into one component: ray parity alone would call the
    # overlap outside (two crossings); the union must be inside, matching the winding number.
    fused = trimesh.util.concatenate([trimesh.creation.box(), trimesh.creation.box().apply_translation([0.5, 0, 0])])
    assert fused.is_watertight
    pts = np.array([[0.25, 0, 0], [-0.4, 0, 0], [0.9, 0, 0], [1.2, 0, 0]])
    assert inside_mask(fused, pts).tolist() == [True, True, True, False]
    assert (winding_number(fused, pts[:1]) > 1.5).all()
    assert signed_distance(fused, pts[:1])[0] > 0


def test_inside_mask_counts_a_cavity_as_outside_and_an_inverted_piece_as_solid():
    """A hollow ball (outer sphere outward, inner sphere inward: one closed part) is solid only in its shell; a
    closed piece turned inside out that sits in no other still counts as solid; overlapping boxes are solid where
    either is."""
    from moca3d.geometry.inside import inside_mask

    outer = trimesh.creation.icosphere(subdivisions=3, radius=1.0)
    inner = trimesh.creation.icosphere(subdivisions=3, radius=0.7)
    inner.invert()
    hollow = trimesh.util.concatenate([outer, inner])
    assert hollow.is_watertight and hollow.is_winding_consistent
    points = np.array([[0.0, 0.0, 0.0], [0.3, 0.2, 0.1], [0.85, 0.0, 0.0], [0.0, -0.8, 0.3], [1.2, 0.0, 0.0]])
    assert inside_mask(hollow, points).tolist() == [False, False, True, True, False]
    flipped = trimesh.creation.box()
    flipped.invert()
    assert inside_mask(flipped, np.array([[0.0, 0.0, 0.0], [0.8, 0.0, 0.0]])).tolist() == [True, False]
    boxes = trimesh.util.concatenate([trimesh.creation.box(), trimesh.creation.box().apply_translation([0.5, 0, 0])])
    assert inside_mask(boxes, np.array([[-0.4, 0, 0], [0.25, 0, 0], [0.9, 0, 0], [1.1, 0, 0]])).tolist() == [True, True, True, False]


def test_loaded_parts_are_welded_without_stray_vertices_and_points_are_named(tmp_path):
    """An STL (a triangle soup on disk) loads watertight; a vertex no face uses does not widen the bounds; a point
    cloud node is left out with a warning naming it."""
    import warnings

    from moca3d.errors import InputWarning
    from moca3d.geometry.mesh_io import bounds_of, load_file

    box = trimesh.creation.box()
    box.export(tmp_path / "cube.stl")
    (stl,), _ = load_file(tmp_path / "cube.stl")
    assert stl.is_watertight and len(stl.vertices) == 8
    stray = trimesh.Trimesh(np.vstack([box.vertices, [[3.0, 0.0, 0.0]]]), box.faces, process=False)
    stray.export(tmp_path / "stray.ply")
    meshes, _ = load_file(tmp_path / "stray.ply")
    assert np.allclose(bounds_of(meshes), box.bounds)
    scene = trimesh.Scene()
    scene.add_geometry(box, node_name="body")
    scene.add_geometry(trimesh.PointCloud(np.random.default_rng(0).normal(size=(20, 3))), node_name="cloud")
    scene.export(tmp_path / "with_cloud.glb")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        meshes, names = load_file(tmp_path / "with_cloud.glb")
    assert names == ["body"]
    assert any(issubclass(w.category, InputWarning) and "'cloud'" in str(w.message) for w in caught)


def test_every_resolution_meshes_from_a_first_grid_that_doubles_to_it():
    """One rule for generation and reconstruction (the pipeline's first grid at 64 was 16 cells, the CLI's 32)."""
    from moca3d.defaults import MAX_RESOLUTION, MIN_RESOLUTION, check_resolution
    from moca3d.errors import ConfigError
    from moca3d.geometry.extract import vae_extract_config
    from moca3d.pipeline import MoCAPipeline

    valid = []
    for resolution in range(MIN_RESOLUTION, MAX_RESOLUTION + 1):
        try:
            check_resolution(resolution)
        except ConfigError:
            continue
        valid.append(resolution)
        coarse = vae_extract_config(resolution).coarse_resolution
        assert coarse >= 16 and resolution % coarse == 0 and (resolution // coarse) in (1, 2, 4), resolution
    assert {16, 32, 64, 68, 100, 128, 256, 1024} <= set(valid)
    assert [vae_extract_config(r).coarse_resolution for r in (32, 64, 128, 256)] == [32, 32, 32, 64]
    assert MoCAPipeline.extract_config(64) == vae_extract_config(64)
