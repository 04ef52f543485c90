"""Procedural objects and scenes: valid parts, watertight, reproducible by seed."""

import numpy as np
import pytest

from moca3d.data.procedural import CATEGORIES, MAX_PARTS, generate, generate_object, generate_scene
from moca3d.errors import ConfigError


@pytest.mark.parametrize("category", sorted(CATEGORIES))
def test_every_category_builds_watertight_named_parts(category):
    for index in range(3):
        asset = generate_object(seed=7, index=index, category=category)
        assert asset.category == category and asset.kind == "object"
        assert 2 <= len(asset.meshes) <= MAX_PARTS
        assert len(asset.names) == len(set(asset.names)) == len(asset.meshes)
        assert asset.colors.shape == (len(asset.meshes), 4)
        for mesh in asset.meshes:
            assert mesh.is_watertight and mesh.volume > 0


def test_objects_are_reproducible_by_seed_and_vary_by_index():
    a, b = generate_object(3, 11), generate_object(3, 11)
    assert a.names == b.names and a.category == b.category
    assert all(np.array_equal(x.vertices, y.vertices) for x, y in zip(a.meshes, b.meshes))
    others = [generate_object(3, i) for i in range(12, 40)]
    assert len({o.category for o in others}) >= 6
    counts = [len(o.meshes) for o in others]
    assert min(counts) <= 5 and max(counts) >= 10  # a spread of part counts


def test_scenes_stand_on_the_floor_without_overlap_and_reproduce():
    scene = generate_scene(seed=1, index=2, num_objects=9)
    assert scene.kind == "scene" and len(scene.meshes) == 9
    assert all(m.is_watertight for m in scene.meshes)
    assert np.allclose([m.bounds[0, 1] for m in scene.meshes], 0.0, atol=1e-9)
    # Footprint discs (around each object's vertical axis) do not intersect.
    centres, radii = [], []
    for m in scene.meshes:
        c = m.bounds.mean(0)[[0, 2]]
        centres.append(c)
        radii.append(np.linalg.norm(m.vertices[:, [0, 2]] - c, axis=1).max())
    for i in range(9):
        for j in range(i + 1, 9):
            assert np.linalg.norm(centres[i] - centres[j]) >= radii[i] + radii[j] - 1e-6
    again = generate("scenes", 1, 2, num_objects=9)
    assert all(np.array_equal(x.vertices, y.vertices) for x, y in zip(scene.meshes, again.meshes))
    counts = [len(generate_scene(0, i).meshes) for i in range(6)]
    assert all(2 <= c <= 16 for c in counts) and len(set(counts)) > 1


def test_bad_procedural_arguments():
    with pytest.raises(ConfigError):
        generate_object(0, 0, category="spaceship")
    with pytest.raises(ConfigError):
        generate("buildings", 0, 0)
    with pytest.raises(ConfigError):
        generate_scene(0, 0, max_objects=64)


def test_scenes_of_17_to_32_objects_through_prepare(tmp_path):
    """The 17-32 instance regime of issue 7: prepare honours the scene object range."""
    from moca3d.data.prepare import PrepareConfig, prepare, procedural_jobs
    from moca3d.data.procedural import generate_scene
    from moca3d.geometry.inside import QueryConfig
    from moca3d.geometry.render import RenderConfig
    from moca3d.geometry.sampling import SurfaceSamplingConfig

    assert 17 <= len(generate_scene(0, 0, min_objects=17, max_objects=32).meshes) <= 32
    assert len(generate_scene(0, 0).meshes) == len(generate_scene(0, 0, min_objects=2).meshes)  # default stream unchanged
    cfg = PrepareConfig(
        surface=SurfaceSamplingConfig(num_points=64), queries=QueryConfig(num_queries=64),
        render=RenderConfig(size=32, supersample=1), scene_objects=(17, 20),
    )
    prepare(procedural_jobs("scenes", 1, seed=0), tmp_path, cfg, workers=1, progress=False)
    import json

    meta = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert len(meta) == 1 and 17 <= meta[0]["num_components"] <= 20
