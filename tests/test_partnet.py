"""PartNet annotation folders (result.json + objs/): parts at a hierarchy level, end to end through prepare."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import trimesh
from conftest import TINY_PREPARE

from moca3d.data.partnet import is_partnet, load_partnet, parts_at
from moca3d.data.prepare import SETTINGS, PrepareConfig, folder_jobs, prepare
from moca3d.errors import ConfigError, InputError

TINY = dataclasses.replace(TINY_PREPARE, max_components=8)
# a chair as PartNet annotates one: the back a leaf, the seat two pieces a level down, the base a leaf of two meshes
TREE = [{"text": "Chair", "name": "chair", "id": 0, "children": [
    {"text": "Chair Back", "name": "chair_back", "id": 1, "objs": ["original-1"]},
    {"text": "Chair Seat", "name": "chair_seat", "id": 2, "children": [
        {"text": "Seat Surface", "name": "seat_surface", "id": 3, "objs": ["original-2"]},
        {"text": "Seat Frame", "name": "seat_frame", "id": 4, "objs": ["new-3"]}]},
    {"text": "Chair Base", "name": "chair_base", "id": 5, "objs": ["original-4", "original-5"]}]}]
BOXES = {  # name: (extents, centre), y up
    "original-1": ((0.8, 0.8, 0.1), (0.0, 1.0, -0.4)),
    "original-2": ((0.8, 0.08, 0.8), (0.0, 0.55, 0.0)),
    "new-3": ((0.9, 0.05, 0.9), (0.0, 0.48, 0.0)),
    "original-4": ((0.08, 0.45, 0.08), (-0.35, 0.22, -0.35)),
    "original-5": ((0.08, 0.45, 0.08), (0.35, 0.22, 0.35)),
}


def write_annotation(folder, tree=TREE, category="Chair"):
    """A PartNet data_v0/<anno_id>/ folder of boxes."""
    (folder / "objs").mkdir(parents=True)
    for name, (extents, centre) in BOXES.items():
        box = trimesh.creation.box(extents=extents)
        box.apply_translation(centre)
        box.export(folder / "objs" / f"{name}.obj")
    (folder / "result.json").write_text(json.dumps(tree))
    (folder / "meta.json").write_text(json.dumps({"model_cat": category, "anno_id": folder.name}))
    return folder


@pytest.mark.parametrize("level, names, meshes", [
    (0, ["chair"], [5]),
    (1, ["chair_back", "chair_seat", "chair_base"], [1, 2, 2]),
    (2, ["chair_back", "seat_surface", "seat_frame", "chair_base"], [1, 1, 1, 2]),  # leaves above level 2 stay parts
    (5, ["chair_back", "seat_surface", "seat_frame", "chair_base"], [1, 1, 1, 2]),
])
def test_parts_are_the_nodes_of_a_level_with_their_whole_subtree(tmp_path, level, names, meshes):
    folder = write_annotation(tmp_path / "173")
    assert is_partnet(folder) and not is_partnet(folder / "objs")
    assert [node["name"] for node in parts_at(TREE, level)] == names
    parts, got = load_partnet(folder, level)
    assert got == names
    for part, count in zip(parts, meshes):  # every mesh of the subtree, fused: 12 triangles a box
        assert len(part.faces) == 12 * count
    whole = load_partnet(folder, 0)[0][0]
    assert sum(p.area for p in parts) == pytest.approx(whole.area)
    np.testing.assert_allclose(np.vstack([p.bounds for p in parts]).min(0), whole.bounds[0])


def test_a_folder_of_annotations_prepares_one_asset_each_with_its_category(tmp_path):
    root = tmp_path / "data_v0"
    write_annotation(root / "173")
    write_annotation(root / "2040", category="Table")
    out = tmp_path / "ds"
    summary = prepare(folder_jobs(root), out, TINY)
    assert summary.processed == 2 and summary.skipped == 0
    records = {r["id"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert records["173"]["category"] == "Chair" and records["2040"]["category"] == "Table"
    assert records["173"]["names"] == ["chair_back", "chair_seat", "chair_base"] and records["173"]["num_components"] == 3
    samples = np.load(out / "assets" / "173" / "samples.npz")
    assert samples["surface"].shape[0] == 3 and (samples["query_sdf"] > 0).any(axis=1).all()
    # one annotation folder given itself is one asset (not its objs/ as a folder of parts)
    assert [job.id for job in folder_jobs(root / "173")] == ["173"]
    deeper = prepare(folder_jobs(root / "173"), tmp_path / "ds2", dataclasses.replace(TINY, partnet_level=2))
    assert deeper.processed == 1
    assert json.loads((tmp_path / "ds2" / "assets" / "173" / "meta.json").read_text())["num_components"] == 4


def test_broken_annotations_are_skipped_with_a_reason_naming_the_problem(tmp_path):
    root = tmp_path / "data_v0"
    write_annotation(root / "1")
    (root / "1" / "objs" / "new-3.obj").unlink()
    write_annotation(root / "2")
    (root / "2" / "result.json").write_text("{not json")
    write_annotation(root / "3", tree=[{"name": "chair", "id": 0, "children": [{"name": "empty", "id": 1}]}])
    summary = prepare(folder_jobs(root), tmp_path / "ds", TINY)
    assert summary.processed == 0 and summary.skipped == 3
    reasons = " | ".join(summary.reasons)
    assert "objs/new-3.obj, named by result.json, is missing" in reasons
    assert "unreadable result.json" in reasons and "part 'empty' (id 1) lists no meshes" in reasons
    with pytest.raises(InputError, match="4 components exceed the maximum of 2"):
        load_partnet(write_annotation(tmp_path / "whole"), 2, max_components=2)



# PartNet's merged hierarchy of the same chair: seat and back merged into one label, the base's legs split
MERGED = [{"text": "Chair", "name": "chair", "id": 0, "children": [
    {"text": "Chair Body", "name": "chair_body", "id": 1, "objs": ["original-1", "original-2", "new-3"]},
    {"text": "Leg", "name": "leg", "id": 2, "objs": ["original-4"]},
    {"text": "Leg", "name": "leg", "id": 3, "objs": ["original-5"]}]}]


def test_the_merged_hierarchy_is_read_from_result_after_merging(tmp_path):
    root = tmp_path / "data_v0"
    folder = write_annotation(root / "173")
    write_annotation(root / "174")  # no result_after_merging.json: skipped with that reason
    (folder / "result_after_merging.json").write_text(json.dumps(MERGED))
    parts, names = load_partnet(folder, 1, hierarchy="merged")
    assert names == ["chair_body", "leg", "leg_1"] and [len(p.faces) for p in parts] == [36, 12, 12]
    assert load_partnet(folder, 1)[1] == ["chair_back", "chair_seat", "chair_base"]  # the original stays the default
    with pytest.raises(InputError, match="174: no result_after_merging.json"):
        load_partnet(root / "174", 1, hierarchy="merged")
    with pytest.raises(ConfigError, match="--partnet-hierarchy must be one of original, merged, got 'flat'"):
        PrepareConfig(partnet_hierarchy="flat")
    out = tmp_path / "ds"
    summary = prepare(folder_jobs(root), out, dataclasses.replace(TINY, partnet_hierarchy="merged"))
    assert (summary.processed, summary.skipped) == (1, 1)
    (record,) = map(json.loads, (out / "manifest.jsonl").read_text().splitlines())
    assert record["id"] == "173" and record["num_components"] == 3
    with pytest.raises(ConfigError, match="partnet_hierarchy merged -> original"):
        prepare(folder_jobs(root), out, TINY)

def test_the_level_is_a_shared_setting_checked_and_older_datasets_still_resume(tmp_path):
    with pytest.raises(ConfigError, match="--partnet-level must be between 0 and 16"):
        PrepareConfig(partnet_level=-1)
    root = tmp_path / "data_v0"
    write_annotation(root / "1")
    out = tmp_path / "ds"
    prepare(folder_jobs(root), out, TINY)
    with pytest.raises(ConfigError, match="partnet_level 1 -> 2"):
        prepare(folder_jobs(root), out, dataclasses.replace(TINY, partnet_level=2))
    recorded = json.loads((out / SETTINGS).read_text())
    del recorded["partnet_level"]  # a dataset prepared before the setting existed
    (out / SETTINGS).write_text(json.dumps(recorded))
    write_annotation(root / "2")
    assert prepare(folder_jobs(root), out, TINY).processed == 1


def test_double_sided_and_inside_out_shapenet_pieces_still_enclose_their_volume(tmp_path):
    """ShapeNet's pieces are often double-sided (each face twice, reversed) or wound inside out, as unwelded
    triangle soups: their winding number is 0 or -1 everywhere, so without orienting them every part would
    "enclose no volume" and the asset be skipped."""
    folder = write_annotation(tmp_path / "data_v0" / "173")
    for k, name in enumerate(BOXES):
        box = trimesh.load(folder / "objs" / f"{name}.obj", force="mesh", process=False)
        faces = np.vstack([box.faces, box.faces[:, ::-1]]) if k % 2 == 0 else box.faces[:, ::-1]  # double-sided / inverted
        corners = box.vertices[faces].reshape(-1, 3)  # a soup: no vertex shared between triangles
        trimesh.Trimesh(corners, np.arange(len(corners)).reshape(-1, 3), process=False).export(folder / "objs" / f"{name}.obj")
    parts, names = load_partnet(folder, 1)
    assert [len(p.faces) for p in parts] == [12, 24, 24]  # the reversed duplicates dropped
    summary = prepare(folder_jobs(folder.parent), tmp_path / "ds", TINY)
    assert summary.processed == 1 and summary.skipped == 0, summary.reasons
    samples = np.load(tmp_path / "ds" / "assets" / "173" / "samples.npz")
    assert (samples["query_sdf"] > 0).any(axis=1).all()


def test_several_roots_are_one_part_at_level_0_and_mesh_names_stay_in_objs(tmp_path):
    roots = [dict(TREE[0]["children"][0]), dict(TREE[0]["children"][2])]  # a merged hierarchy may keep several roots
    folder = write_annotation(tmp_path / "7", tree=roots)
    parts, names = load_partnet(folder, 0)
    assert names == ["object"] and len(parts[0].faces) == 12 * 3
    assert load_partnet(folder, 1)[1] == ["chair_back", "chair_base"]
    (tmp_path / "secret.obj").write_text((folder / "objs" / "original-1.obj").read_text())
    escaping = write_annotation(tmp_path / "8", tree=[{"name": "chair", "id": 0, "objs": ["../../secret"]}])
    with pytest.raises(InputError, match=r"names the mesh '../../secret', not a file of objs/"):
        load_partnet(escaping, 0)
