"""What the CLI prints for a reader: bars only where they redraw in place, counts with their plural, labelled and
rounded numbers."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import trimesh
import typer.main
from typer.testing import CliRunner

from moca3d.cli import app


@pytest.fixture
def not_a_terminal(monkeypatch):
    """No environment variable makes rich take CliRunner's captured streams for a terminal."""
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)


def test_tqdm_bars_are_left_out_where_stderr_is_no_terminal(tmp_path, monkeypatch, not_a_terminal):
    """prepare, evaluate-model and evaluate-scenes drew their tqdm bars on a redirected stderr (`2>e.txt` filled with
    \\r lines); their means printed `seconds: 0.0012` unlabelled and counts as "1 scenes"."""
    runner = CliRunner()
    data = tmp_path / "scenes"
    result = runner.invoke(app, ["prepare", "--procedural", "scenes", "--count", "1", "--scene-objects", "2", "2", "-o", str(data),
                                 "--num-surface", "128", "--num-queries", "96", "--image-size", "48", "--test-fraction", "1",
                                 "--val-fraction", "0"])
    assert result.exit_code == 0, result.output
    assert result.stderr == "" and "1 prepared" in result.stdout
    preds = tmp_path / "preds"  # the ground truth as another method's predictions: no model is loaded
    preds.mkdir()
    for asset in (data / "assets").iterdir():
        shutil.copy(asset / "mesh.glb", preds / f"{asset.name}.glb")
    base = [str(data), "--predictions", str(preds), "--metric-points", "1000"]
    result = runner.invoke(app, ["evaluate-model", *base])
    assert result.exit_code == 0, result.output
    assert result.stderr == "", result.stderr
    assert re.search(r"seconds per asset: \d+\.\d\d\n", result.stdout) and "1 asset of 'test'" in result.stdout
    result = runner.invoke(app, ["evaluate-scenes", *base])
    assert result.exit_code == 0, result.output
    assert result.stderr == "", result.stderr
    assert re.search(r"seconds per scene: \d+\.\d\d\n", result.stdout) and "1 scene of 'test' with 2-32 instances" in result.stdout
    assert "(1 instance, 0% empty)" in result.stdout  # the scene's two objects, of two categories
    monkeypatch.setattr("moca3d.progress.on_terminal", lambda stream=None: True)  # a terminal: the bar is drawn
    assert "evaluate test" in runner.invoke(app, ["evaluate-model", *base]).stderr


def test_training_outcome_counts_steps_and_rounds_the_loss(tmp_path, monkeypatch, capsys):
    """It printed "trained 1 steps ...; final loss 7.894750595092773"."""
    from moca3d.commands.common import run_dit_training

    outcome = {"trained_steps": 1, "steps": 1, "seconds": 2.0, "final_loss": 7.894750595092773, "pipeline": "run/pipeline"}
    monkeypatch.setattr("moca3d.training.train_dit.train", lambda *args, **kwargs: outcome)
    run_dit_training(tmp_path, tmp_path / "run", {}, None, "cpu", True)
    assert "trained 1 step (to step 1) in 2 s; final loss 7.8948\n" in capsys.readouterr().out
    outcome.update(trained_steps=2, steps=2)
    run_dit_training(tmp_path, tmp_path / "run", {}, None, "cpu", True)
    assert "trained 2 steps (to step 2)" in capsys.readouterr().out


def test_counts_printed_with_their_plural(tmp_path, capsys):
    """A one-part generation was "1 parts", a category of one instance "(1 instances)"."""
    from types import SimpleNamespace

    from moca3d.commands.common import echo_categories, plural, save_generation

    assert [plural(n, "step") for n in (0, 1, 2)] == ["0 steps", "1 step", "2 steps"]
    box = trimesh.creation.box()
    result = SimpleNamespace(meshes=[box], save=lambda path: path)
    save_generation(result, tmp_path / "one.glb", "part", 0.0)
    assert f"wrote {tmp_path / 'one.glb'}: 1 part (12 triangles)" in capsys.readouterr().out
    echo_categories({"chair": {"count": 1, "fscore@0.1": 0.5}, "lamp": {"count": 2, "fscore@0.1": 0.7}}, "fscore@0.1", "asset")
    out = capsys.readouterr().out
    assert "by category (assets):" in out and "(1 asset)" in out and "(2 assets)" in out


def test_evaluate_names_what_its_counts_count(tmp_path):
    """A 3-part prediction with an empty part printed `num_pred: 2` beside `num_empty: 1`; --scene's num_pred counts
    the empty ones too. The JSON keeps its keys."""
    from moca3d.geometry.mesh_io import save_glb

    boxes = [trimesh.creation.box(extents=[0.4] * 3).apply_translation([x, 0, 0]) for x in (-1.0, 0.0, 1.0)]
    save_glb(tmp_path / "gt.glb", boxes, ["a", "b", "c"])
    save_glb(tmp_path / "pred.glb", [boxes[0], trimesh.Trimesh(), boxes[2]], ["a", "b", "c"], metadata={"verb": "generate"})
    runner = CliRunner()
    base = ["evaluate", str(tmp_path / "pred.glb"), str(tmp_path / "gt.glb"), "--num-points", "2000"]
    text = runner.invoke(app, base).stdout
    assert "non-empty predicted parts: 2\n" in text and "ground-truth parts: 3\n" in text and "empty predicted parts: 1\n" in text
    assert "num_" not in text
    text = runner.invoke(app, base + ["--scene"]).stdout
    assert "predicted instances (all): 3\n" in text and "empty predicted instances: 1\n" in text and "instance b: empty" in text
    report = json.loads(runner.invoke(app, base + ["--json", "-"]).stdout)
    assert (report["num_pred"], report["num_gt"], report["num_empty"]) == (2, 3, 1)


def test_prepare_help_says_the_split_fractions_are_approximate():
    prepare = typer.main.get_command(app).commands["prepare"]
    helps = {param.name: param.help for param in prepare.params}
    for name in ("val_fraction", "test_fraction"):
        assert "approximate" in helps[name] and "hash of its id" in helps[name]


def test_json_to_stdout_is_standard_json_as_the_file_is(tmp_path, capsys):
    """`--json -` printed an empty prediction's chamfer as `Infinity` (strict parsers refuse it) where `--json FILE`
    wrote null: both write null for NaN and infinities now."""
    from pathlib import Path

    from moca3d.commands.common import write_json

    def strict(text):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))

    report = {"chamfer": float("inf"), "fscore@0.1": 0.0, "rows": [{"self_iou": float("nan")}]}
    assert write_json(Path("-"), report)
    assert strict(capsys.readouterr().out) == {"chamfer": None, "fscore@0.1": 0.0, "rows": [{"self_iou": None}]}
    write_json(tmp_path / "r.json", report)
    assert strict((tmp_path / "r.json").read_text()) == {"chamfer": None, "fscore@0.1": 0.0, "rows": [{"self_iou": None}]}
