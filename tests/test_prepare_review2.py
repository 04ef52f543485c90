"""`moca3d prepare` review: a namesake from another folder is its own asset, a closed speck is left out and named,
nested part files and duplicate parts are warned of."""

import json
import shutil

import pytest
import trimesh

import moca3d.data.prepare as prep
from conftest import TINY_PREPARE
from moca3d.errors import InputError, InputWarning
from moca3d.geometry.mesh_io import read_components, save_glb

TINY = TINY_PREPARE


def _meta(root, asset_id):
    return json.loads((root / "assets" / asset_id / "meta.json").read_text())


def _chair(path, seat_height):
    """A two-part 'chair' (seat, leg) whose seat sits at `seat_height`: another height, another file of the same name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    seat = trimesh.creation.box([1.0, 0.2, 1.0]).apply_translation([0, seat_height, 0])
    save_glb(path, [seat, trimesh.creation.box([0.2, seat_height, 0.2]).apply_translation([0, seat_height / 2, 0])],
             ["seat", "leg"])
    return path


def test_a_namesake_from_another_folder_gets_its_own_id_and_each_rerun_skips_its_own(tmp_path, capsys):
    """a/chair.glb, then b/chair.glb (another file) into the same dataset: b is prepared as chair_1 (it was counted
    'already done' and the old asset kept), said in one line; rerunning either, or a moved copy of a, prepares nothing."""
    first, other = _chair(tmp_path / "a" / "chair.glb", 1.0), _chair(tmp_path / "b" / "chair.glb", 2.0)
    root = tmp_path / "ds"
    assert prep.prepare(prep.folder_jobs(first), root, TINY, progress=False).processed == 1
    summary = prep.prepare(prep.folder_jobs(other), root, TINY, progress=False)
    assert (summary.processed, summary.already_done) == (1, 0) and summary.renamed == 1
    assert f"{other} gets the id 'chair_1': asset 'chair' holds another source ({first})" in capsys.readouterr().out
    assert _meta(root, "chair")["source"] == str(first) and _meta(root, "chair_1")["source"] == str(other)
    assert _meta(root, "chair_1")["source_sha1"] == prep.source_digest(other) != prep.source_digest(first)
    moved = tmp_path / "moved" / "chair.glb"
    moved.parent.mkdir()
    shutil.copy(first, moved)
    for source in (other, first, moved):
        again = prep.prepare(prep.folder_jobs(source), root, TINY, progress=False)
        assert (again.processed, again.already_done) == (0, 1), source
    assert sorted(p.name for p in (root / "assets").iterdir()) == ["chair", "chair_1"]


def test_an_asset_of_an_earlier_version_without_a_fingerprint_is_told_apart_by_its_file(tmp_path):
    """meta.json without source_sha1 (prepared before it was recorded): a namesake is its source when that file is gone
    (a moved folder), another asset when the recorded file is still there and differs."""
    first = _chair(tmp_path / "a" / "chair.glb", 1.0)
    root = tmp_path / "ds"
    prep.prepare(prep.folder_jobs(first), root, TINY, progress=False)
    meta = _meta(root, "chair")
    meta.pop("source_sha1", None)
    (root / "assets" / "chair" / "meta.json").write_text(json.dumps(meta))
    other = _chair(tmp_path / "b" / "chair.glb", 2.0)
    assert [job.id for job in prep.resume_jobs(prep.folder_jobs(other), root)] == ["chair_1"]
    moved = tmp_path / "moved" / "chair.glb"
    moved.parent.mkdir()
    first.rename(moved)
    assert prep.resume_jobs(prep.folder_jobs(moved), root) == []


def _box_and_speck(path, radius):
    """A unit box and a closed icosphere of `radius` beside it (the researcher's tiny_part.glb)."""
    speck = trimesh.creation.icosphere(subdivisions=2, radius=radius).apply_translation([0.6, 0, 0])
    save_glb(path, [trimesh.creation.box(), speck], ["big", "tiny"])
    return path


@pytest.mark.parametrize("radius", [1e-4, 3e-4])
def test_a_closed_speck_is_left_out_and_named_and_the_asset_kept(tmp_path, capsys, radius):
    """A closed part too small for any query point to fall inside was 'encloses no volume (open or flat)' and the whole
    asset skipped: it is left out, named as such, and the rest normalised without it (the box fills the frame)."""
    src = tmp_path / "src"
    src.mkdir()
    root = tmp_path / "ds"
    summary = prep.prepare(prep.folder_jobs(_box_and_speck(src / "tiny_part.glb", radius)), root, TINY, progress=False)
    assert (summary.processed, summary.skipped) == (1, 0) and (summary.small_assets, summary.dropped_assets) == (1, 0)
    meta = _meta(root, "tiny_part")
    assert (meta["names"], meta["dropped_components"], meta["small_components"]) == (["big"], ["tiny"], ["tiny"])
    assert json.loads((root / "assets" / "tiny_part" / "normalization.json").read_text())["scale"] == pytest.approx(2.0)
    out = capsys.readouterr().out
    assert "too small for the query sampling" in out and out.rstrip().endswith(": tiny") and "open or flat" not in out


def test_an_open_or_a_thin_part_without_inside_queries_still_refuses_the_asset_with_its_reason(tmp_path):
    """Not a speck: an open sheet encloses no volume; a closed plate of visible size but too thin for any query to fall
    inside is named as too thin, not as open."""
    src = tmp_path / "src"
    src.mkdir()
    sheet = trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [1, 0, 1], [0, 0, 1]], [[0, 1, 2], [0, 2, 3]], process=False)
    save_glb(src / "sheet.glb", [trimesh.creation.box(), sheet.apply_translation([1, 0, 0])], ["cube", "sheet"])
    save_glb(src / "pane.glb", [trimesh.creation.box(), trimesh.creation.box([1.0, 1e-7, 1.0]).apply_translation([1.5, 0, 0])],
             ["cube", "pane"])
    root = tmp_path / "ds"
    summary = prep.prepare(prep.folder_jobs(src), root, TINY, progress=False)
    assert (summary.processed, summary.skipped) == (0, 2)
    reasons = dict(reason.split(": ", 1) for reason in summary.reasons)
    assert "component 'pane' is closed but too thin for the query sampling" in reasons[str(src / "pane.glb")]
    assert "component 'sheet' encloses no volume (open or flat" in reasons[str(src / "sheet.glb")]


def test_part_files_in_a_sub_folder_are_warned_of_and_named(tmp_path, capsys):
    """A folder asset reads only the files directly in it: the ones in its sub-folders were ignored without a word; now
    prepare prints a warning naming them and keeps it in meta.json, and read_components warns (one file beside them
    too); a folder with part files only in sub-folders says so."""
    src = tmp_path / "src"
    lamp, floorlamp = src / "lamp", src / "floorlamp"
    (lamp / "extra").mkdir(parents=True)
    (floorlamp / "extra").mkdir(parents=True)
    trimesh.creation.box().export(lamp / "base.obj")
    trimesh.creation.icosphere().apply_translation([0, 2, 0]).export(lamp / "pole.obj")
    trimesh.creation.cone(0.5, 0.5).apply_translation([0, 3, 0]).export(lamp / "extra" / "shade.obj")
    save_glb(floorlamp / "lamp.glb", [trimesh.creation.box(), trimesh.creation.icosphere().apply_translation([0, 2, 0])],
             ["base", "pole"])
    shutil.copy(lamp / "extra" / "shade.obj", floorlamp / "extra" / "shade.obj")
    root = tmp_path / "ds"
    assert prep.prepare(prep.folder_jobs(src), root, TINY, progress=False).processed == 2
    out = capsys.readouterr().out
    for asset in ("lamp", "floorlamp"):
        assert f"warning: {asset}: 1 mesh file in its sub-folders is not read" in out
        assert any("extra/shade.obj" in note for note in _meta(root, asset)["warnings"])
        with pytest.warns(InputWarning, match="extra/shade.obj"):
            read_components(src / asset)
    (lamp / "base.obj").unlink()
    (lamp / "pole.obj").unlink()
    with pytest.raises(InputError, match=r"lamp: folder holds no mesh files \(only its sub-folders do, e.g. extra/shade.obj"):
        read_components(lamp)


def test_an_exact_duplicate_part_is_warned_of_and_recorded(tmp_path, capsys):
    """Two identical components (the researcher's dup_part.glb) gave no warning: the asset is kept, the pair recorded
    and printed; instances of one mesh in other places (a table's legs) are no duplicates."""
    src = tmp_path / "src"
    src.mkdir()
    block = trimesh.creation.box([0.3, 0.3, 0.3])
    ball = trimesh.creation.icosphere(radius=0.15).apply_translation([0, 0.45, 0])
    save_glb(src / "dup_part.glb", [block, block.copy(), ball], ["block", "block_copy", "ball"])
    legs = [block.copy().apply_translation([x, 0, 0]) for x in (-1.0, 1.0)]
    save_glb(src / "legs.glb", legs, ["leg", "leg_1"])
    root = tmp_path / "ds"
    assert prep.prepare(prep.folder_jobs(src), root, TINY, progress=False).processed == 2
    assert _meta(root, "dup_part").get("duplicate_components") == [["block", "block_copy"]]
    assert _meta(root, "legs")["duplicate_components"] == [] and _meta(root, "legs")["warnings"] == []
    out = capsys.readouterr().out
    assert "warning: dup_part.glb: component 'block_copy' duplicates 'block' (the same surface in the same place)" in out
    reordered = trimesh.Trimesh(block.vertices[::-1], (len(block.vertices) - 1 - block.faces)[::-1], process=False)
    assert prep.duplicate_components([block, reordered, ball], ["a", "b", "c"]) == [["a", "b"]]


def test_the_command_counts_renamed_assets_in_its_summary(tmp_path):
    """The per-asset line scrolled away among the others: the summary counts them too."""
    from typer.testing import CliRunner

    from moca3d.cli import app

    first, other = _chair(tmp_path / "a" / "chair.glb", 1.0), _chair(tmp_path / "b" / "chair.glb", 2.0)
    small = ["--num-surface", "128", "--num-queries", "96", "--image-size", "32", "--workers", "1"]
    for source in (first, other):
        result = CliRunner().invoke(app, ["prepare", str(source), "-o", str(tmp_path / "ds"), *small])
        assert result.exit_code == 0, result.output
    assert "1 given an id with a _k suffix: their file's name was taken by an asset of another source" in result.output


def test_one_name_in_two_formats_is_warned_as_two_assets(tmp_path):
    """thing.glb and thing.obj in one folder became the assets 'thing' and 'thing.obj' silently: one asset trained on
    twice, or held out while its copy is trained on. Both still become assets, named in one warning."""
    src = tmp_path / "meshes"
    _chair(src / "thing.glb", 1.0)
    trimesh.creation.box().export(src / "thing.obj")
    trimesh.creation.box().export(src / "other.obj")
    with pytest.warns(InputWarning) as caught:
        jobs = prep.folder_jobs(src)
    assert [job.id for job in jobs] == ["other", "thing", "thing.obj"]
    message = [str(w.message) for w in caught if "share the name" in str(w.message)]
    assert len(message) == 1 and "thing.glb (id 'thing'), thing.obj (id 'thing.obj')" in message[0]
    assert "\n" not in message[0] and "other" not in message[0].split(":", 1)[1]
    (src / "thing.obj").unlink()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        assert [job.id for job in prep.folder_jobs(src)] == ["other", "thing"]


def test_a_large_folder_is_checked_under_a_bar(tmp_path, capsys):
    """Each new source is hashed (copies are left out) before preparing starts: a large PartNet folder read silently."""
    many, few = prep.procedural_jobs("objects", 120), prep.procedural_jobs("objects", 5)
    assert len(prep.resume_jobs(many, tmp_path, progress=True)) == 120
    assert "checking sources" in capsys.readouterr().err
    prep.resume_jobs(few, tmp_path, progress=True)
    prep.resume_jobs(many, tmp_path, progress=False)
    assert "checking sources" not in capsys.readouterr().err  # a few sources, or no bars asked
