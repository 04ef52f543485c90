"""Review at 32+ components: options named in messages, distinct part colours, node names that sort, a quiet exit."""

import gc
import io
import json
import warnings

import numpy as np
import pytest
import trimesh
from conftest import TINY_PREPARE, load_benchmark
from typer.testing import CliRunner

from moca3d.cli import app
from moca3d.errors import InputError, InputWarning


def _cache_latents(root, out, max_parts: int):
    """`moca3d cache-latents root -o out --max-parts max_parts`: its result and the InputWarnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(app, ["cache-latents", str(root), "-o", str(out), "--image-size", "32",
                                          "--max-parts", str(max_parts)])
    return result, [str(w.message) for w in caught if issubclass(w.category, InputWarning)]


def test_cache_latents_names_max_parts_for_assets_of_too_many_parts(object_dataset, tmp_path):
    """cache-latents said 'raise the recipe's max_components to train on them': its option is --max-parts."""
    root, _ = object_dataset
    result, notes = _cache_latents(root, tmp_path / "some.safetensors", 8)
    assert result.exit_code == 0, result.output
    said = " ".join(notes) + result.output
    assert "2 'train' assets have more than --max-parts 8 parts" in said and "raise --max-parts to cache them" in said
    assert "max_components" not in said
    result, _ = _cache_latents(root, tmp_path / "none.safetensors", 2)  # none kept: the error names it too
    assert isinstance(result.exception, InputError) and "raise --max-parts to cache them" in str(result.exception)
    assert "max_components" not in str(result.exception)


def test_training_still_names_the_recipes_max_components(object_dataset):
    """Outside cache-latents (and after it) the option named is the recipe's max_components."""
    from moca3d.data.dataset import report_too_many_parts

    with pytest.warns(InputWarning, match="more than --max-parts 4 parts .*raise --max-parts to cache them"):
        report_too_many_parts(["a"], 1, "data", "'train' assets", 4, ("--max-parts", "raise --max-parts to cache them"))
    with pytest.warns(InputWarning, match="more than max_components 4 parts .*raise the recipe's max_components to train"):
        report_too_many_parts(["a"], 1, "data", "'train' assets", 4)


def test_prepare_says_which_option_prepares_an_asset_of_too_many_components(tmp_path):
    """'grid_40.glb: 40 components exceed the maximum of 32' did not say how to prepare it (--max-components)."""
    from moca3d.data import prepare as prep
    from moca3d.geometry.mesh_io import save_glb

    src = tmp_path / "src"
    src.mkdir()
    save_glb(src / "grid_4.glb", [trimesh.creation.box().apply_translation([3 * i, 0, 0]) for i in range(4)], list("abcd"))
    summary = prep.prepare(prep.folder_jobs(src), tmp_path / "ds", TINY_PREPARE, progress=False)  # max_components 3
    assert summary.skipped == 1
    reason = json.loads((tmp_path / "ds" / "report.jsonl").read_text().splitlines()[0])["reason"]
    assert reason == "grid_4.glb: 4 components exceed the maximum of 3: --max-components 4 prepares it"


def test_palette_colours_stay_apart_up_to_64_parts():
    """Golden-ratio hues with brightness cycled every 3 gave part i and i + 21 nearly one colour (10 pairs within
    20/255 at 32 parts); the first 8 colours are those of before; the palette is deterministic."""
    import colorsys

    from moca3d.geometry.mesh_io import palette

    for seed in range(4):
        rgb = palette(64, seed)[:, :3].astype(float)  # (64, 3)
        dist = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)
        np.fill_diagonal(dist, np.inf)
        assert dist.min() > 40, (seed, dist.min())
        assert np.array_equal(palette(64, seed), palette(64, seed)) and np.array_equal(palette(20, seed), palette(64, seed)[:20])
    golden = 0.618033988749895
    before = [colorsys.hsv_to_rgb((golden * i) % 1.0, 0.65, 0.9 - 0.25 * (i % 3) / 2) for i in range(8)]
    assert np.array_equal(palette(8)[:, :3], (np.asarray(before) * 255).round().astype(np.uint8))
    assert (palette(8)[:, 3] == 255).all() and palette(0).shape == (0, 4) and palette(300).shape == (300, 4)


@pytest.mark.parametrize("n, first, last", [(9, "part_00", "part_08"), (10, "part_00", "part_09"),
                                            (100, "part_00", "part_99"), (110, "part_000", "part_109")])
def test_component_names_sort_in_order(n, first, last):
    """f'part_{i:02d}' sorted part_100 before part_11; under 100 components the names are as before."""
    from moca3d import pipeline
    from moca3d.geometry.mesh_io import component_names

    names = component_names("part", n)
    assert (names[0], names[-1], len(names)) == (first, last, n) and sorted(names) == names
    if n <= 100:
        assert names == [f"part_{i:02d}" for i in range(n)]
    assert pipeline.component_names is component_names  # the pipeline names its outputs with it


def test_saved_predictions_of_100_plus_parts_have_names_that_sort(tmp_path):
    """evaluation's saved generations are named as the pipeline names them (instance_000 .. instance_100)."""
    from moca3d.evaluation import save_prediction
    from moca3d.geometry.mesh_io import component_names, load_components

    meshes = [trimesh.creation.box().apply_translation([2 * i, 0, 0]) for i in range(101)]
    save_prediction(tmp_path, "big", meshes, "instance")
    assert load_components(tmp_path / "big.glb")[1] == component_names("instance", 101)


def test_memory_benchmark_server_unfreezes_at_exit(monkeypatch):
    """serve() left the heap frozen (gc.freeze): at exit ~30 lines of 'nanobind: leaked ... triton._C...'."""
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    try:
        load_benchmark("memory").serve()
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
