"""`moca3d --help` and the verbs' shared conventions."""

import typer.main
from typer.testing import CliRunner

from moca3d.cli import VERB_ORDER, app


def _commands():
    group = typer.main.get_group(app)
    return group, group.list_commands(None)


def test_help_lists_every_verb_in_workflow_order():
    group, names = _commands()
    verbs = [n for n in names if n != "convert"]  # convert is a group of its own (triposg, partcrafter)
    assert sorted(verbs) == sorted(VERB_ORDER), "a new verb needs a place in cli.VERB_ORDER"
    assert verbs == list(VERB_ORDER)
    text = CliRunner().invoke(app, ["--help"]).output
    assert text.index("generate ") < text.index("train ") and "Start here: moca3d generate" in text
    for name in names:
        assert group.get_command(None, name).get_short_help_str(), f"{name} has no help line"


def test_every_output_option_takes_out_and_output():
    group, names = _commands()
    checked = 0
    for name in names:
        command = group.get_command(None, name)
        for param in getattr(command, "params", []):
            if "-o" in param.opts:
                assert {"--out", "--output"} <= set(param.opts), f"{name}: {param.opts}"
                checked += 1
    assert checked >= 10  # generate, generate-scene, render, prepare, train-*, evaluate-*, ... (the loop ran)


def test_sampling_defaults_have_one_definition():
    import inspect

    from moca3d import defaults
    from moca3d.evaluation import evaluate_pipeline, evaluate_scenes
    from moca3d.pipeline import MoCAPipeline

    group, _ = _commands()

    def cli_default(verb, name):
        return next(p.default for p in group.get_command(None, verb).params if p.name == name)

    def default(fn, name):
        return inspect.signature(fn).parameters[name].default

    for verb, fn, guidance in [("generate", MoCAPipeline.__call__, defaults.GUIDANCE),
                               ("evaluate-model", evaluate_pipeline, defaults.GUIDANCE),
                               ("generate-scene", MoCAPipeline.generate_scene, defaults.SCENE_GUIDANCE),
                               ("evaluate-scenes", evaluate_scenes, defaults.SCENE_GUIDANCE)]:
        assert cli_default(verb, "guidance") == default(fn, "guidance") == guidance, verb
        assert cli_default(verb, "steps") == default(fn, "steps") == defaults.STEPS, verb


def test_generate_takes_a_folder_of_images_one_glb_each_and_names_the_bad_ones(object_dataset, object_pipeline, tmp_path):
    """The model loads once; each image writes <name>.glb into the output folder; an unreadable one is reported and
    skipped, and the command then ends with one line naming it."""
    import shutil

    import trimesh

    from moca3d.errors import InputError

    root, _ = object_dataset
    images = tmp_path / "images"
    images.mkdir()
    renders = sorted((root / "assets").iterdir())[:2]
    for k, asset in enumerate(renders):
        shutil.copy(asset / "render.png", images / f"view{k}.png")
    (images / "notes.png").write_text("not an image")
    (images / "readme.txt").write_text("ignored: not an image file name")
    out = tmp_path / "out"
    args = ["generate", str(images), "--model", object_pipeline, "--parts", "2", "--steps", "2", "--resolution", "16",
            "--device", "cpu", "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, InputError), result.output
    assert "1 of 3 images could not be used (first: notes.png)" in str(result.exception)
    assert "skipped notes.png" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["view0.glb", "view1.glb"]
    assert len(trimesh.load(out / "view0.glb", force="scene").geometry) >= 1
    (images / "notes.png").unlink()
    (images / "view0.jpg").write_bytes((images / "view0.png").read_bytes())
    clash = CliRunner().invoke(app, args)
    assert isinstance(clash.exception, InputError) and "two images are named 'view0'" in str(clash.exception)


def test_evaluate_model_scores_a_folder_of_predictions_in_any_frame(object_dataset, tmp_path):
    """Another method's outputs, <id>.glb per asset: the GT itself scores F = 1, also moved and scaled (each side is
    normalised); an asset without a prediction scores as empty and is listed; no model is loaded."""
    import numpy as np
    from conftest import cli_report

    from moca3d.data.dataset import read_manifest
    from moca3d.errors import ConfigError, InputError
    from moca3d.geometry.mesh_io import load_components, save_components

    root, _ = object_dataset
    ids = [r["id"] for r in read_manifest(root, "train")]
    preds = tmp_path / "preds"
    preds.mkdir()
    for k, asset in enumerate(ids[:2]):
        meshes, names = load_components(root / "assets" / asset / "mesh.glb")
        if k == 1:  # another frame: scaled by 3 and moved
            meshes = [m.copy().apply_scale(3.0).apply_translation([5.0, -2.0, 1.0]) for m in meshes]
        save_components(preds / f"{asset}.glb", meshes, names)
    base = ["evaluate-model", str(root), "--split", "train", "--metric-points", "4000", "--predictions", str(preds)]
    report = cli_report(base, tmp_path / "scores.json")
    scores = {row["id"]: row for row in report["assets"]}
    for asset in ids[:2]:
        assert scores[asset]["fscore@0.1"] == 1.0 and scores[asset]["chamfer"] < 0.02
    assert report["missing"] == ids[2:] and all(scores[a]["fscore@0.1"] == 0.0 for a in ids[2:])
    assert report["mean"]["fscore@0.1"] == np.mean([scores[a]["fscore@0.1"] for a in ids]) and "model" not in report
    wrong = CliRunner().invoke(app, base + ["--model", "somewhere"])
    assert isinstance(wrong.exception, ConfigError) and "--model would not be used" in str(wrong.exception)
    empty = tmp_path / "none"
    empty.mkdir()
    nothing = CliRunner().invoke(app, base[:-1] + [str(empty)])
    assert isinstance(nothing.exception, InputError) and "no prediction for any of the" in str(nothing.exception)
