"""`evaluate-model --predictions`: an empty or unreadable prediction file scores as all-empty, named, instead of
stopping the whole evaluation with a message that named the file but not its folder."""

import warnings

import pytest

from moca3d.data.dataset import read_manifest
from moca3d.errors import InputError, InputWarning
from moca3d.evaluation import evaluate_pipeline
from moca3d.geometry.mesh_io import load_components, save_components


@pytest.mark.filterwarnings("ignore::moca3d.errors.InputWarning")  # the CLI run's, each asserted in the first run
def test_empty_or_corrupt_prediction_scores_as_all_empty_and_is_listed(object_dataset, tmp_path):
    root, _ = object_dataset
    ids = [r["id"] for r in read_manifest(root, "train")][:3]
    preds = tmp_path / "preds"
    preds.mkdir()
    save_components(preds / f"{ids[0]}.glb", *load_components(root / "assets" / ids[0] / "mesh.glb"))
    (preds / f"{ids[1]}.obj").write_bytes(b"")  # a 0-byte file: a method that crashed on this asset
    (preds / f"{ids[2]}.glb").write_bytes(b"not a glb at all")  # a corrupt file
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = evaluate_pipeline(None, root, "train", count=3, metric_points=2000, progress=False, predictions=preds)
    scores = {row["id"]: row for row in report["assets"]}
    assert scores[ids[0]]["fscore@0.1"] == 1.0
    for asset in ids[1:]:
        assert scores[asset]["fscore@0.1"] == 0.0 and scores[asset]["num_pred"] == 0
    assert report["missing"] == []
    assert [u["id"] for u in report["unusable"]] == ids[1:]
    assert report["unusable"][0]["path"] == str(preds / f"{ids[1]}.obj") and "the file is empty" in report["unusable"][0]["reason"]
    assert "unreadable mesh" in report["unusable"][1]["reason"]
    said = [str(w.message) for w in caught if issubclass(w.category, InputWarning)]
    assert any(str(preds / f"{ids[1]}.obj") in m and "scored as all-empty" in m for m in said)
    assert any(str(preds / f"{ids[2]}.glb") in m for m in said)
    from typer.testing import CliRunner

    from moca3d.cli import app

    shown = CliRunner().invoke(app, ["evaluate-model", str(root), "--split", "train", "--count", "3", "--metric-points", "2000",
                                     "--predictions", str(preds)])
    assert shown.exit_code == 0, shown.output
    assert f"2 with an unreadable prediction (scored as empty), e.g. {preds / f'{ids[1]}.obj'}" in shown.output


def test_a_folder_of_only_unusable_predictions_is_one_line_naming_a_path(object_dataset, tmp_path):
    root, _ = object_dataset
    ids = [r["id"] for r in read_manifest(root, "train")][:2]
    preds = tmp_path / "preds"
    preds.mkdir()
    for asset in ids:
        (preds / f"{asset}.obj").write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)
        with pytest.raises(InputError, match="no usable prediction for any of the 2 assets") as err:
            evaluate_pipeline(None, root, "train", count=2, metric_points=2000, progress=False, predictions=preds)
    assert str(preds / f"{ids[0]}.obj") in str(err.value) and "\n" not in str(err.value)
