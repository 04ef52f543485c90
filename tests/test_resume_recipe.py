"""Which recipe a resumed training command runs: without --config the run's own; its steps and time limit kept unless
given again (a requeued command that forgot --time-limit dropped the limit and raised the LR again)."""

import json
import re

import pytest

from typer.testing import CliRunner

from conftest import TINY_VAE, tiny_dit_recipe
from moca3d.cli import app
from moca3d.training.checkpoints import latest_checkpoint


def invoke(*args):
    """Run the CLI; its result (exit code checked by the caller)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def test_a_dit_run_resumes_without_its_config_and_keeps_its_length(object_dataset, tmp_path):
    root, vae_dir = object_dataset
    config = tmp_path / "recipe.json"
    config.write_text(json.dumps(tiny_dit_recipe(checkpoint_every=2).to_dict()))  # steps 2, no time limit
    run = tmp_path / "run"
    first = invoke("train", root, "-o", run, "--config", config, "--vae", vae_dir, "--steps", 2, "--time-limit", 1000)
    assert first.exit_code == 0, first.output
    recorded = json.loads((run / "train_config.json").read_text())
    assert (recorded["steps"], recorded["time_limit_s"]) == (2, 1000)

    again = invoke("train", root, "-o", run, "--vae", vae_dir)  # no --config: the run's own recipe, not the defaults
    assert again.exit_code == 0, again.output
    assert "trained nothing: the run is at step 2" in again.output and "keeping" not in again.output

    requeued = invoke("train", root, "-o", run, "--config", config, "--vae", vae_dir, "--steps", 3)  # --time-limit left out
    assert requeued.exit_code == 0, requeued.output
    assert "keeping the run's time_limit_s 1000.0 (the recipe's is 0.0; --time-limit changes it)" in requeued.output
    assert "resuming with steps 2 -> 3" in requeued.output and "trained 1 step (to step 3)" in requeued.output
    recorded = json.loads((run / "train_config.json").read_text())
    assert (recorded["steps"], recorded["time_limit_s"]) == (3, 1000)

    changed = invoke("train", root, "-o", run, "--vae", vae_dir, "--time-limit", 0)  # given again: changed, and said
    assert changed.exit_code == 0, changed.output
    assert "resuming with time_limit_s 1000.0 -> 0.0" in changed.output
    assert json.loads((run / "train_config.json").read_text())["time_limit_s"] == 0


def test_a_fresh_run_takes_its_config_and_a_new_folder_the_defaults(object_dataset, tmp_path):
    """No checkpoint yet: --config's values as given (nothing kept from a recorded recipe of a run cut before its
    first checkpoint)."""
    root, vae_dir = object_dataset
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text(json.dumps(tiny_dit_recipe(steps=7, time_limit_s=5.0).to_dict()))
    config = tmp_path / "recipe.json"
    config.write_text(json.dumps(tiny_dit_recipe(steps=1).to_dict()))
    result = invoke("train", root, "-o", run, "--config", config, "--vae", vae_dir)
    assert result.exit_code == 0, result.output
    assert "keeping" not in result.output and "trained 1 step (to step 1)" in result.output
    assert json.loads((run / "train_config.json").read_text())["time_limit_s"] == 0


def test_a_vae_run_resumes_without_its_config_and_keeps_its_steps(object_dataset, tmp_path):
    root, _ = object_dataset
    config = tmp_path / "vae.json"
    config.write_text(json.dumps(dict(model=TINY_VAE, steps=4, batch_size=2, num_surface_points=64, num_query_points=64,
                                      log_every=1, checkpoint_every=1, validate_every=1000, val_assets=1, val_resolution=16,
                                      val_coarse_resolution=8, metric_points=500, warmup_steps=1, num_threads=1)))
    run = tmp_path / "vae"
    first = invoke("train-vae", root, "-o", run, "--config", config, "--steps", 2)
    assert first.exit_code == 0, first.output
    again = invoke("train-vae", root, "-o", run, "--resume")  # no --config: the run's recipe, so nothing to train
    assert again.exit_code == 0, again.output
    assert "trained 0 steps (to step 2)" in again.output
    assert re.search(r"trained 2 steps \(to step 2\) in \d+\.\d min; weights", first.output), first.output
    assert re.search(r"in 0\.\d min \(\d+\.\d min over the whole run\)", again.output), again.output  # it was the run's
    requeued = invoke("train-vae", root, "-o", run, "--config", config, "--resume")  # the file says 4; the run was 2
    assert requeued.exit_code == 0, requeued.output
    assert "keeping the run's steps 2 (the recipe's is 4; --steps changes it)" in requeued.output
    assert latest_checkpoint(run).name == "step_00000002"


def test_a_pretraining_run_resumes_without_its_config(object_dataset, tmp_path):
    root, _ = object_dataset
    config = tmp_path / "pretrain.json"
    config.write_text(json.dumps(dict(image_encoder=dict(image_size=32, patch_size=8, width=32, num_layers=1, num_heads=4),
                                      grid_resolution=8, dilate=0, queries_per_image=64, head_width=32, head_heads=4,
                                      steps=6, batch_size=2, warmup_steps=1, val_assets=1, log_every=1, checkpoint_every=1)))
    run = tmp_path / "enc"
    first = invoke("pretrain-encoder", root, "-o", run, "--config", config, "--steps", 1, "--time-limit", 500)
    assert first.exit_code == 0, first.output
    again = invoke("pretrain-encoder", root, "-o", run, "--steps", 2)
    assert again.exit_code == 0, again.output
    assert "resuming with steps 1 -> 2" in again.output and "keeping" not in again.output
    recorded = json.loads((run / "pretrain_config.json").read_text())
    assert (recorded["steps"], recorded["time_limit_s"], recorded["head_width"]) == (2, 500, 32)


def test_a_vae_resume_with_another_model_names_the_recipe_key(object_dataset, tmp_path):
    """It named a tensor shape ('post_quant.weight': (32, 4), the model has (64, 4)): the checkpoint was loaded before
    the recipe was compared."""
    from moca3d.errors import ConfigError
    from moca3d.training.train_vae import VAETrainConfig, train_vae

    root, _ = object_dataset
    recipe = dict(model=TINY_VAE, steps=1, batch_size=2, num_surface_points=64, num_query_points=64, log_every=1,
                  checkpoint_every=1, validate_every=1000, val_assets=1, val_resolution=16, val_coarse_resolution=8,
                  metric_points=500, warmup_steps=1)
    train_vae(root, tmp_path / "vae", VAETrainConfig.from_dict(recipe), progress=False, validate_at_end=False)
    wider = VAETrainConfig.from_dict({**recipe, "model": {**TINY_VAE, "width_decoder": 64}})
    with pytest.raises(ConfigError, match=r"started with another recipe \(model.width_decoder 32 -> 64\)"):
        train_vae(root, tmp_path / "vae", wider, resume=True, progress=False)
    # the model's own default spelled out (or left out) is the same model: resumed, not "another recipe"
    from moca3d.models.vae import VecSetVAE
    import inspect

    default_in = inspect.signature(VecSetVAE.__init__).parameters["in_channels"].default
    assert "in_channels" not in TINY_VAE
    spelled = VAETrainConfig.from_dict({**recipe, "steps": 2, "model": {**TINY_VAE, "in_channels": default_in}})
    train_vae(root, tmp_path / "vae", spelled, resume=True, progress=False, validate_at_end=False)
    assert latest_checkpoint(tmp_path / "vae").name == "step_00000002"
    other = VAETrainConfig.from_dict({**recipe, "steps": 3, "model": {**TINY_VAE, "in_channels": default_in + 3}})
    with pytest.raises(ConfigError, match=rf"another recipe \(model.in_channels {default_in} -> {default_in + 3}\)"):
        train_vae(root, tmp_path / "vae", other, resume=True, progress=False)


def test_a_run_started_with_a_relative_init_from_resumes_from_another_folder(object_dataset, object_pipeline, tmp_path,
                                                                              monkeypatch):
    """Resumed without --config from another folder, the recorded relative init_from named nothing there."""
    import shutil

    root, _ = object_dataset
    shutil.copytree(object_pipeline, tmp_path / "work" / "prior")
    monkeypatch.chdir(tmp_path / "work")
    first = invoke("train", root, "-o", "run", "--init-from", "prior", "--steps", 1)
    assert first.exit_code == 0, first.output
    monkeypatch.chdir(tmp_path)
    again = invoke("train", root, "-o", "work/run", "--steps", 2)
    assert again.exit_code == 0, again.output
    assert "trained 1 step (to step 2)" in again.output
    # the work folder moved, prior with it: the checkpoint's recorded VAE (work/prior/vae) is gone, the pipeline's is taken
    shutil.move(tmp_path / "work", tmp_path / "work2")
    moved = invoke("train", root, "-o", "work2/run", "--init-from", "work2/prior", "--steps", 3)
    assert moved.exit_code == 0, moved.output
    assert "trained 1 step (to step 3)" in moved.output and "which is gone" not in moved.output


def test_a_refused_resume_says_how_many_changes_it_left_unnamed(object_dataset, tmp_path):
    """It named the first three changes only, as if they were all."""
    from moca3d.errors import ConfigError
    from moca3d.training.train_dit import train

    root, vae_dir = object_dataset
    train(root, tmp_path / "run", tiny_dit_recipe(steps=1), vae_dir=vae_dir, device="cpu", progress=False)
    other = tiny_dit_recipe(steps=1, lr=0.5, warmup_steps=0, batch_size=4, seed=3, ema_decay=0.5)
    with pytest.raises(ConfigError, match=r"another recipe \(batch_size 2 -> 4, ema_decay .* -> 0.5, lr .* -> 0.5 and 2 more\)"):
        train(root, tmp_path / "run", other, vae_dir=vae_dir, device="cpu", progress=False)


def test_a_run_cut_before_its_first_checkpoint_restarts_with_its_own_recipe(object_dataset, tmp_path):
    """No checkpoint yet, run again without --config: it trained the defaults (a bigger model) and recorded them over
    the run's recipe."""
    import json as json_module

    root, vae_dir = object_dataset
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text(json_module.dumps(tiny_dit_recipe(steps=1).to_dict()))  # killed while loading
    result = invoke("train", root, "-o", run, "--vae", vae_dir)
    assert result.exit_code == 0, result.output
    assert f"recipe: {run / 'train_config.json'} (the run's own)" in result.output and "trained 1 step" in result.output
    config = json_module.loads((run / "pipeline" / "transformer" / "config.json").read_text())
    assert config["width"] == 32  # tiny_dit_recipe's, not the defaults'


def test_the_recipe_notes_are_said_by_the_first_process_alone(tmp_path, monkeypatch, capsys):
    """Under torchrun every process printed "keeping the run's ..." and "recipe: ..."."""
    from moca3d.commands.common import keep_run_length

    for rank, said in (("1", ""), ("0", "keeping the run's steps 5")):
        monkeypatch.setenv("RANK", rank)
        recipe = {"steps": 9}
        keep_run_length(recipe, {"steps": 5})
        assert recipe["steps"] == 5 and capsys.readouterr().out.startswith(said)


def test_train_vae_resume_of_an_empty_folder_says_it_starts_a_new_run(object_dataset, tmp_path, capsys):
    """A mistyped -o with --resume started a 10 000-step run without a word."""
    from moca3d.training.train_vae import VAETrainConfig, train_vae

    root, _ = object_dataset
    recipe = dict(model=TINY_VAE, steps=1, batch_size=2, num_surface_points=64, num_query_points=64, log_every=1,
                  checkpoint_every=1, validate_every=1000, val_assets=1, warmup_steps=1)
    train_vae(root, tmp_path / "typo", VAETrainConfig.from_dict(recipe), resume=True, progress=False, validate_at_end=False)
    assert f"{tmp_path / 'typo'}: no checkpoint to resume from: a new run of 1 steps" in capsys.readouterr().out
    assert (tmp_path / "typo" / "train_config.json").is_file()


def test_a_missing_init_from_is_named_missing_not_a_recipe_change(object_dataset, object_pipeline, tmp_path, monkeypatch):
    """From another folder, a relative --init-from that names nothing there read as "started with another recipe
    (init_from "/abs/prior" -> "prior")"."""
    import shutil

    root, _ = object_dataset
    shutil.copytree(object_pipeline, tmp_path / "work" / "prior")
    monkeypatch.chdir(tmp_path / "work")
    assert invoke("train", root, "-o", "run", "--init-from", "prior", "--steps", 1).exit_code == 0
    monkeypatch.chdir(tmp_path)
    result = invoke("train", root, "-o", "work/run", "--init-from", "prior", "--steps", 2)
    assert str(result.exception) == f"--init-from prior: no such folder (from {tmp_path})"


def test_a_dit_run_resumes_without_its_vae_and_a_gone_one_is_named(object_dataset, tmp_path):
    """`train DATA -o RUN` (resume, no --config) still said "train needs --vae": the run's checkpoints record the VAE
    folder they were trained with, and a resume loads it (said); one moved away is named in one line."""
    import shutil

    root, vae_dir = object_dataset
    config = tmp_path / "recipe.json"
    config.write_text(json.dumps(tiny_dit_recipe(checkpoint_every=1).to_dict()))
    moved = tmp_path / "vae_copy"
    shutil.copytree(vae_dir, moved)
    run = tmp_path / "run"
    first = invoke("train", root, "-o", run, "--config", config, "--vae", moved, "--steps", 1)
    assert first.exit_code == 0, first.output
    again = invoke("train", root, "-o", run, "--steps", 2)
    assert again.exit_code == 0, again.output
    assert f"vae: {moved.resolve()} (the run's own)" in again.output and "trained 1 step (to step 2)" in again.output
    shutil.rmtree(moved)
    gone = invoke("train", root, "-o", run, "--steps", 3)
    assert gone.exit_code != 0 and "which is gone: resume with --vae" in str(gone.exception), gone.output
    given = invoke("train", root, "-o", run, "--vae", vae_dir, "--steps", 3)  # the same VAE from elsewhere: accepted
    assert given.exit_code == 0, given.output
    fresh = invoke("train", root, "-o", tmp_path / "new", "--config", config)  # a new run still needs it
    assert fresh.exit_code != 0 and "train needs --vae" in str(fresh.exception)
