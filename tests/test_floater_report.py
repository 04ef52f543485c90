"""benchmarks/floater_filter.py's summary: an all-empty object's infinite CD never reaches a mean; it is counted."""

import math

import pytest

from conftest import load_benchmark

SETTINGS = [(0.02, 0), (0.5, 0), (0.9, 0)]


def _scores(chamfer, fscore, num_empty, self_iou=None):
    """One object's `object_metrics` under one setting (an all-empty prediction: CD inf, F = 0, no self-IoU)."""
    return {"chamfer": chamfer, "fscore@0.1": fscore, "fscore@0.05": fscore / 2, "self_iou": self_iou, "num_empty": num_empty}


def _rows():
    """Three objects of two parts: c is all empty at 0.5; every object is all empty at 0.9."""
    inf, gone = math.inf, _scores(math.inf, 0.0, 2)
    return [
        {"id": "a", "0.02": _scores(0.10, 0.8, 0, 0.1), "0.5": _scores(0.20, 0.6, 1, 0.2), "0.9": gone},
        {"id": "b", "0.02": _scores(0.30, 0.4, 0, 0.3), "0.5": _scores(0.30, 0.5, 0, 0.1), "0.9": gone},
        {"id": "c", "0.02": _scores(0.50, 0.6, 1, 0.2), "0.5": _scores(inf, 0.0, 2), "0.9": gone},
    ]


def test_summary_leaves_all_empty_objects_out_of_the_mean_cd_and_counts_them():
    """The table used to print a mean CD of inf (and a paired CD change of inf) as soon as one object came out empty."""
    ff = load_benchmark("floater_filter")
    ref, some, none = ff.summarize(_rows(), SETTINGS)
    assert ref["chamfer"] == pytest.approx(0.3) and ref["empty_objects"] == 0 and ref["num_empty"] == 1
    assert ref["chamfer_paired"] == pytest.approx(0.0) and ref["fscore@0.1_paired"] == pytest.approx(0.0)
    # 0.5: c is left out of the mean CD and of its paired change (a, b), and counted; F-scores average it as 0
    assert some["chamfer"] == pytest.approx(0.25) and some["empty_objects"] == 1 and some["num_empty"] == 3
    assert some["chamfer_paired"] == pytest.approx(0.05) and some["chamfer_paired_se"] == pytest.approx(0.05)
    assert some["fscore@0.1"] == pytest.approx(1.1 / 3) and some["fscore@0.1_paired"] == pytest.approx(-0.7 / 3)
    # self-IoU: c has none at 0.5 (all empty): the mean of a and b, and the pairs of a and b (it was NaN throughout)
    assert some["self_iou"] == pytest.approx(0.15) and some["self_iou_paired"] == pytest.approx(-0.05)
    assert none["self_iou"] is None and "self_iou_paired" not in none
    # 0.9: no object has a surface, so there is no mean CD and no paired CD change
    assert none["chamfer"] is None and "chamfer_paired" not in none and none["empty_objects"] == 3 and none["num_empty"] == 6
    assert none["fscore@0.1"] == 0.0
    for entry in (ref, some, none):
        assert all(math.isfinite(v) for v in entry.values() if isinstance(v, (int, float))), entry


def test_printed_table_shows_no_inf_or_nan_and_says_why_cd_leaves_objects_out(capsys):
    """A setting where no object has a surface prints "-" for its CD, and a note says which objects CD leaves out."""
    ff = load_benchmark("floater_filter")
    ff.print_summary(ff.summarize(_rows(), SETTINGS))
    out = capsys.readouterr().out
    text = out.lower().replace("infinite", "")
    assert "inf" not in text and "nan" not in text
    assert "empty objects" in out and "CD: mean over the objects with a surface" in out
    header, _, _, last = [[cell.strip() for cell in line.split(" | ")] for line in out.splitlines()[:4]]
    assert last[header.index("CD")] == "-" and last[header.index("empty objects")] == "3"
    # without an empty object there is nothing to explain
    rows = [{"id": "a", "0.02": _scores(0.1, 0.8, 0), "0.5": _scores(0.2, 0.6, 1)}]
    ff.print_summary(ff.summarize(rows, SETTINGS[:2]))
    assert "CD: mean over" not in capsys.readouterr().out
