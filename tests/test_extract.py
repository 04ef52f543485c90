"""Mesh extraction: analytic SDFs, coarse-to-fine equals dense, floaters, chunking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moca3d.errors import ConfigError
from moca3d.geometry.extract import ExtractConfig, evaluate_grid, extract_mesh


def sphere(radius=0.5, center=(0.0, 0.0, 0.0)):
    c = torch.tensor(center)
    return lambda p: radius - (p - c).norm(dim=-1)


def test_sphere_mesh_has_right_radius_and_is_watertight():
    mesh = extract_mesh(sphere(0.5), ExtractConfig(resolution=64, coarse_resolution=16, band=0.1))
    r = np.linalg.norm(mesh.vertices, axis=1)
    cell = 2 * 1.05 / 64
    assert abs(r.mean() - 0.5) < 0.1 * cell
    assert np.abs(r - 0.5).max() < 0.5 * cell
    assert mesh.is_watertight
    assert mesh.volume > 0  # outward normals
    assert abs(mesh.volume - 4 / 3 * np.pi * 0.125) / (4 / 3 * np.pi * 0.125) < 0.02


def test_coarse_to_fine_matches_dense_and_evaluates_fewer_points():
    calls = {"n": 0}
    base = sphere(0.4, (0.1, -0.2, 0.05))

    def counted(p):
        calls["n"] += p.shape[0]
        return base(p)

    fine = evaluate_grid(counted, ExtractConfig(resolution=64, coarse_resolution=16, band=0.1))
    refined_calls = calls["n"]
    dense = evaluate_grid(base, ExtractConfig(resolution=64, coarse_resolution=64, band=0.1))
    near = np.abs(dense) < 0.1
    np.testing.assert_allclose(fine[near], dense[near], atol=1e-6)
    assert (np.sign(fine) == np.sign(dense)).all()
    assert refined_calls < 0.5 * 65**3


def test_chunk_size_does_not_change_the_grid():
    cfg = ExtractConfig(resolution=32, coarse_resolution=16, band=0.2)
    a = evaluate_grid(sphere(), cfg)
    b = evaluate_grid(sphere(), ExtractConfig(**{**cfg.__dict__, "chunk_size": 1000}))
    assert np.array_equal(a, b)


def test_floater_removal_and_empty_fields():
    big, small = sphere(0.5, (-0.3, 0, 0)), sphere(0.06, (0.8, 0.8, 0.8))
    union = lambda p: torch.maximum(big(p), small(p))
    keep = extract_mesh(union, ExtractConfig(resolution=64, coarse_resolution=16, band=0.1, min_component_fraction=None))
    drop = extract_mesh(union, ExtractConfig(resolution=64, coarse_resolution=16, band=0.1, min_component_fraction=0.2))
    assert len(keep.split(only_watertight=False)) == 2
    assert len(drop.split(only_watertight=False)) == 1
    empty = extract_mesh(lambda p: -torch.ones(p.shape[0]), ExtractConfig(resolution=16, coarse_resolution=8))
    assert len(empty.faces) == 0


def test_a_speck_under_one_cell_is_dropped_beside_a_real_piece():
    """A grid vertex barely above the level far from the rest gives an 8-triangle speck (area ~1e-5) that the face
    fraction keeps when the part itself is small; under one cell's face in area it goes, unless it is all there is."""
    from moca3d.geometry.extract import mesh_from_grid

    config = ExtractConfig(resolution=32, coarse_resolution=32, min_component_fraction=0.02)
    axis = np.linspace(-config.bounds, config.bounds, 33)
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    grid = (0.15 - np.sqrt(x**2 + y**2 + z**2)).astype(np.float32)  # a sphere of radius 0.15: about 200 triangles
    grid[28, 28, 28] = 0.05  # one vertex just inside, its neighbours well outside: a speck of radius ~2e-3
    pieces = mesh_from_grid(grid, config).split(only_watertight=False)
    assert len(pieces) == 1 and pieces[0].area > 0.2
    alone = np.full_like(grid, -1.0)
    alone[28, 28, 28] = 0.05
    assert len(mesh_from_grid(alone, config).faces) == 8  # the speck alone is kept: it is all the field has


def test_thin_plate_is_found_by_the_band():
    """A plate thinner than a coarse cell survives: its cells are refined because |sdf| < band."""
    plate = lambda p: 0.01 - p[:, 2].abs()  # slab |z| < 0.01, infinite in x, y: clipped by the grid boundary
    mesh = extract_mesh(plate, ExtractConfig(resolution=128, coarse_resolution=16, band=0.2))
    assert len(mesh.faces) > 0 and mesh.is_watertight
    assert np.abs(mesh.vertices[:, 2]).max() < 0.03


def test_bad_resolution_raises():
    with pytest.raises(ConfigError):
        evaluate_grid(sphere(), ExtractConfig(resolution=48, coarse_resolution=32))


def test_rescue_meshes_an_empty_field_where_it_peaks():
    """A field that never reaches 0 (peak -0.05 at c) is empty by default; rescue meshes the region around its peak."""
    c = (0.3, -0.2, 0.1)
    below = lambda p: sphere(0.5, c)(p) - 0.55  # noqa: E731  (peak -0.05, nothing inside)
    cfg = ExtractConfig(resolution=32, coarse_resolution=16, band=1.0)
    assert len(extract_mesh(below, cfg).faces) == 0  # rescue off (the default)
    mesh = extract_mesh(below, ExtractConfig(**{**cfg.__dict__, "rescue_vertices": 60}))
    cell = 2 * 1.05 / 32
    assert len(mesh.faces) and mesh.is_watertight
    assert np.linalg.norm(mesh.vertices.mean(0) - np.array(c)) < cell  # centred on the peak, within a cell
    assert np.linalg.norm(mesh.vertices - np.array(c), axis=1).max() < 4 * cell  # a small blob (about 60 vertices inside)
    # a peak below the floor stays empty; a field with an inside region is meshed at level 0 as before
    assert len(extract_mesh(below, ExtractConfig(**{**cfg.__dict__, "rescue_vertices": 60, "rescue_floor": -0.01})).faces) == 0
    plain = extract_mesh(sphere(0.5), cfg)
    rescued = extract_mesh(sphere(0.5), ExtractConfig(**{**cfg.__dict__, "rescue_vertices": 60}))
    np.testing.assert_array_equal(plain.vertices, rescued.vertices)
