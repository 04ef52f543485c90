"""What moca3d writes a generation as: an OBJ keeps every component (an empty one as an `o` object without faces), a
GLB colours each part with a named material and carries vertex normals; both read back in place."""

import numpy as np
import pytest
import trimesh
from typer.testing import CliRunner

from moca3d.cli import app
from moca3d.commands.info import describe
from moca3d.evaluation import read_prediction
from moca3d.geometry.mesh_io import gltf_document, load_file, main_color, palette, save_components, save_glb

NAMES = ["box", "hole", "ball", "gap"]


@pytest.fixture
def parts():
    """Four components in one frame, the second and fourth empty (as a generation's empty parts)."""
    box = trimesh.creation.box(extents=[0.6, 0.6, 0.6]).apply_translation([-0.6, 0, 0])
    ball = trimesh.creation.icosphere(subdivisions=2, radius=0.3).apply_translation([0.6, 0, 0])
    return [box, trimesh.Trimesh(), ball, trimesh.Trimesh()]


@pytest.mark.parametrize("suffix", [".obj", ".glb"])
def test_every_component_is_written_and_read_back_in_place(parts, tmp_path, suffix):
    """The OBJ left its empty components out (trimesh skips nodes without geometry): 2 `o` objects for 4 instances."""
    path = save_components(tmp_path / f"scene{suffix}", parts, NAMES, metadata={"instances": 4})
    if suffix == ".obj":
        assert [line[2:].strip() for line in path.read_text().splitlines() if line.startswith("o ")] == NAMES
    assert load_file(path)[1] == ["box", "ball"]  # the surfaces
    meshes, names = read_prediction(path)  # evaluation: the empty ones stay where they are
    assert names == NAMES and [len(m.faces) > 0 for m in meshes] == [True, False, True, False]
    assert np.allclose(meshes[2].bounds, parts[2].bounds)
    report = describe(path)
    assert report["components"] == NAMES and report["empty"] == ["hole", "gap"] and report["settings"] == {"instances": 4}
    text = CliRunner().invoke(app, ["info", str(path)]).output
    assert "4 components (2 empty: hole, gap): box, hole, ball, gap" in text


def test_evaluate_scene_pairs_an_obj_prediction_with_empty_instances(parts, tmp_path):
    """`evaluate --scene` on an OBJ generation with empty instances could not pair them (2 predicted, 4 in the GT)."""
    gt = [parts[0], trimesh.creation.box(extents=[0.2] * 3), parts[2], trimesh.creation.box(extents=[0.2] * 3).apply_translation([0, 0.5, 0])]
    save_components(tmp_path / "gt.glb", gt, NAMES)
    save_components(tmp_path / "pred.obj", parts, NAMES, metadata={"verb": "generate-scene"})
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "pred.obj"), str(tmp_path / "gt.glb"), "--scene", "--num-points", "2000"])
    assert result.exit_code == 0, result.output
    assert "per-instance metrics need equal component counts" not in result.output
    assert "instance hole: empty" in result.output and "instance gap: empty" in result.output
    assert "instance box: chamfer" in result.output


def test_glb_parts_carry_a_named_material_of_their_colour_and_vertex_normals(parts, tmp_path):
    """Viewers and Blender show a material's colour (vertex colours alone came out white) and shade smoothly with the
    file's normals (none were written: faceted); the colours still read back as each part's colour."""
    colors = palette(4, seed=3)
    path = save_glb(tmp_path / "parts.glb", parts, NAMES, colors=colors)
    doc = gltf_document(path)
    meshes = {node["name"]: doc["meshes"][node["mesh"]] for node in doc["nodes"] if "mesh" in node}
    assert sorted(meshes) == ["ball", "box"]
    for name, k in (("box", 0), ("ball", 2)):
        primitive = meshes[name]["primitives"][0]
        assert "NORMAL" in primitive["attributes"] and "COLOR_0" not in primitive["attributes"]  # glTF multiplies the two
        material = doc["materials"][primitive["material"]]
        pbr = material["pbrMetallicRoughness"]
        assert material["name"] == name and pbr["metallicFactor"] == 0.0
        assert np.array_equal(np.round(np.asarray(pbr["baseColorFactor"]) * 255), colors[k])
    loaded, names = load_file(path)
    assert [main_color(m).tolist() for m in loaded] == [colors[0].tolist(), colors[2].tolist()]  # render's part colours
    assert all(np.allclose(m.vertices, p.vertices, atol=1e-6) and np.array_equal(m.faces, p.faces) for m, p in zip(loaded, parts[::2]))


@pytest.mark.parametrize("suffix", [".obj", ".glb"])
def test_another_tools_empty_objects_are_not_components(parts, tmp_path, suffix):
    """Only a file with moca3d's record keeps empty components: another tool's Empty node or face-less object (a
    helper line, a locator) is no part, or every per-instance pairing would be off by one."""
    path = save_components(tmp_path / f"other{suffix}", parts, NAMES)  # no record: as another tool writes them
    meshes, names = read_prediction(path)
    assert names == ["box", "ball"] and all(len(m.faces) for m in meshes)


def test_glb_normals_are_unit_even_on_a_two_sided_fin(tmp_path):
    """Decimation can leave a fin (a triangle and its twin): its vertex normals cancel to zero, which glTF forbids
    and viewers shade black; each such vertex takes one of its faces' normals (norms within 1e-5 of 1)."""
    fin = trimesh.Trimesh([[2, 0, 0], [3, 0, 0], [2, 1, 0]], [[0, 1, 2], [0, 2, 1]], process=False)
    path = save_glb(tmp_path / "fin.glb", [trimesh.creation.box(), fin], ["box", "fin"])
    doc, data = gltf_document(path), path.read_bytes()
    body = 20 + int.from_bytes(data[12:16], "little") + 8  # the BIN chunk's first byte
    for mesh in doc["meshes"]:
        accessor = doc["accessors"][mesh["primitives"][0]["attributes"]["NORMAL"]]
        view = doc["bufferViews"][accessor["bufferView"]]
        start = body + view.get("byteOffset", 0) + accessor.get("byteOffset", 0)
        normals = np.frombuffer(data, np.float32, accessor["count"] * 3, start).reshape(-1, 3)  # (V, 3)
        assert np.allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-5), mesh.get("name")
