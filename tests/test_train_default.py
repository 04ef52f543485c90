"""`moca3d train-default` runs every stage of a recipe end to end (the smoke recipe: seconds on a CPU)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import moca3d.pipeline as pipeline_module
from moca3d.cli import app
from moca3d.errors import ConfigError
from moca3d.models.image_encoder import ImageEncoder
from moca3d.models.vae import VecSetVAE
from moca3d.pipeline import MoCAPipeline

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.json"


def test_smoke_recipe_runs_every_stage(tmp_path):
    """prepare -> VAE -> decoder fine-tune -> latents -> DiT -> continued DiT -> a new DiT on that encoder; the recipe
    copied elsewhere with its stage configs (one edited) beside it, as a user without the repository runs it: each
    stage reads its config from there (a continue stage looked for it in its own work folder: "config file not found")."""
    work, recipes = tmp_path / "work", tmp_path / "recipes"
    recipes.mkdir()
    spec = json.loads(SMOKE.read_text())
    names = [spec[k] for k in ("vae_config", "dit_config", "vae_finetune_config", "encoder_pretrain_config")]
    names += [e if isinstance(e, str) else e["config"] for e in spec["dit_continue_config"]]
    for name in names:
        shutil.copy(SMOKE.parent / name, recipes / name)
    edited = {**json.loads((recipes / "dit_smoke_continue.json").read_text()), "steps": 3}
    (recipes / "dit_smoke_continue.json").write_text(json.dumps(edited))
    shutil.copy(SMOKE, recipes / "smoke.json")
    result = CliRunner().invoke(app, ["train-default", "--work", str(work), "--recipe", str(recipes / "smoke.json"),
                                      "--workers", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "read from" not in result.output  # every stage config beside the recipe
    assert json.loads((work / "dit_continue" / "train_config.json").read_text())["steps"] == 3  # the edited one
    for stage in ("[1/4]", "[2/4]", "[2c/4]", "[3/4]", "[3b/4]", "[4/4]", "[4b/4]"):
        assert stage in result.output
    # the DiT started from the pre-trained encoder: its width (48) is not the DiT recipe's own (64)
    pretrained = ImageEncoder.from_pretrained(str(work / "encoder" / "image_encoder"))
    assert pretrained.config.width == 48 == MoCAPipeline.from_pretrained(str(work / "dit" / "pipeline")).image_encoder.config.width
    assert json.loads((work / "dit" / "train_config.json").read_text())["image_encoder_from"] == str(work / "encoder" / "image_encoder")
    pipe = MoCAPipeline.from_pretrained(str(work / "dit_continue" / "pipeline"))
    first, tuned = (VecSetVAE.from_pretrained(str(work / run / "vae")) for run in ("vae", "vae_finetune"))
    shipped = pipe.vae.state_dict()
    for k, v in tuned.state_dict().items():  # the pipeline decodes with the fine-tuned decoder ...
        assert torch.equal(shipped[k], v), k
    for k, v in first.state_dict().items():  # ... behind the first VAE's encoder, whose latents the DiT learned
        if k.startswith(("encoder.", "quant.")):
            assert torch.equal(shipped[k], v), k
    assert any(not torch.equal(shipped[k], v) for k, v in first.state_dict().items() if k.startswith("decoder."))
    stage1 = MoCAPipeline.from_pretrained(str(work / "dit" / "pipeline")).transformer.state_dict()
    assert any(not torch.equal(stage1[k], v) for k, v in pipe.transformer.state_dict().items())  # trained further
    # the last stage: a new transformer (configs/dit_smoke_grow.json: width 48, 3 blocks) on the continued encoder
    grown = MoCAPipeline.from_pretrained(str(work / "dit_continue2" / "pipeline"))
    assert (grown.transformer.config.width, grown.transformer.config.num_layers) == (48, 3)
    assert "a new transformer on the image encoder" in result.output
    config = json.loads((work / "dit_continue2" / "train_config.json").read_text())
    assert config["image_encoder_from"] == str(work / "dit_continue" / "pipeline" / "image_encoder") and not config["init_from"]


# a two-object recipe of tiny models (seconds): what a user whose run was killed runs again
TINY_VAE = {"model": {"latent_channels": 4, "num_latents": 16, "num_attention_heads": 4, "width_encoder": 32, "width_decoder": 32,
                      "num_layers_encoder": 1, "num_layers_decoder": 1, "embed_frequency": 4},
            "steps": 2, "batch_size": 4, "warmup_steps": 1, "num_surface_points": 128, "num_query_points": 64,
            "checkpoint_every": 1, "log_every": 1, "val_query_every": 1000, "validate_every": 1000}
TINY_DIT = {"transformer": {"width": 32, "num_layers": 2, "num_heads": 2, "compression": 8},
            "image_encoder": {"image_size": 32, "patch_size": 16, "width": 32, "num_layers": 1, "num_heads": 2},
            "steps": 2, "batch_size": 2, "warmup_steps": 1, "log_every": 1, "checkpoint_every": 1}


def train_default(work: Path, recipe: Path, *more: str):
    """`moca3d train-default` on the CPU, in this process."""
    return CliRunner().invoke(app, ["train-default", "--work", str(work), "--recipe", str(recipe), "--workers", "1",
                                    "--device", "cpu", *more])


def tiny_recipe(folder: Path, **changes) -> Path:
    """The tiny recipe (its stage configs beside it, named by absolute path), with `changes`."""
    (folder / "vae.json").write_text(json.dumps(TINY_VAE))
    (folder / "dit.json").write_text(json.dumps(TINY_DIT))
    spec = {"objects": 2, "seed": 1, "num_surface": 256, "num_queries": 128, "val_fraction": 0.0, "test_fraction": 0.0,
            "encoder_points": 128, "vae_config": str(folder / "vae.json"), "dit_config": str(folder / "dit.json"), **changes}
    path = folder / "recipe.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished run of the tiny recipe: (recipe, work folder); tests work on copies of it."""
    root = tmp_path_factory.mktemp("tiny")
    recipe, work = tiny_recipe(root), root / "work"
    result = train_default(work, recipe)
    assert result.exit_code == 0, result.output
    return recipe, work


def copy_run(tiny_run, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the finished tiny run to break: (recipe, work folder)."""
    recipe, work = tiny_run
    shutil.copytree(work, tmp_path / "work")
    return recipe, tmp_path / "work"


def test_finished_run_again_skips_every_stage(tiny_run, tmp_path):
    """Run again, a finished run says so and neither trains nor rewrites its models."""
    recipe, work = copy_run(tiny_run, tmp_path)
    index = work / "dit" / "pipeline" / "model_index.json"
    before = index.stat().st_mtime_ns
    result = train_default(work, recipe)
    assert result.exit_code == 0, result.output
    assert "[2/4] the VAE in" in result.output and "[4/4] the transformer in" in result.output
    assert "skipped" in result.output and "exported again" not in result.output
    assert index.stat().st_mtime_ns == before and f"pipeline: {work / 'dit' / 'pipeline'}" in result.output


def test_vae_cut_while_exported_is_exported_again(tiny_run, tmp_path):
    """A kill while the VAE folder was written (config.json first, then the weights) is no finished VAE."""
    recipe, work = copy_run(tiny_run, tmp_path)
    (work / "vae" / "summary.json").unlink()  # written last, after the VAE folder
    for weights in (work / "vae" / "vae").glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:100])
    result = train_default(work, recipe)
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.output and (work / "vae" / "summary.json").is_file()
    VecSetVAE.from_pretrained(str(work / "vae" / "vae"))


def test_another_recipe_in_the_same_work_folder_is_refused(tiny_run, tmp_path):
    """A work folder holds one recipe's run: another recipe is a one-line error, before anything is mixed in."""
    recipe, work = copy_run(tiny_run, tmp_path)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**json.loads(recipe.read_text()), "objects": 3}))
    result = train_default(work, other)
    assert isinstance(result.exception, ConfigError), result.output
    assert "another recipe" in str(result.exception) and "objects 2 -> 3" in str(result.exception)
    assert len((work / "data" / "manifest.jsonl").read_text().splitlines()) == 2 and len(list((work / "data" / "assets").iterdir())) == 2


@pytest.mark.parametrize("text, message", [
    ('{"objects": 2', "invalid JSON"),
    ("[1, 2]", "a JSON object"),
    ("missing:encoder_points", "missing recipe keys: encoder_points"),
    ("change:objects=\"2\"", "'objects' must be an integer"),
    ("change:epochs=3", "unknown recipe keys: epochs"),
    ("change:dit_config=\"no_such.json\"", "config file not found"),
    ("change:dit_continue_config=[\"no_such.json\"]", "config file not found"),
    # values out of range, named by their recipe key (not a `prepare` flag), before the recipe is recorded
    ("change:objects=-1", "recipe key 'objects' must be >= 1, got -1"),
    ("change:encoder_points=0", "recipe key 'encoder_points' must be >= 1"),
    ("change:seed=-1", "recipe key 'seed' must be >= 0"),
    ("change:dit_extra_objects=-2&dit_extra_num_queries=4", "recipe key 'dit_extra_objects' must be >= 0"),
    ("change:dit_extra_num_queries=0", "recipe key 'dit_extra_num_queries' must be >= 1"),
    ("change:num_surface=-5", "recipe key 'num_surface' must be >= 1, got -5"),
    ("change:num_queries=0", "recipe key 'num_queries' must be >= 1"),
    ("change:val_fraction=2.0", "recipe key 'val_fraction' must be between 0 and 1, got 2.0"),
    ("change:test_fraction=-0.5", "recipe key 'test_fraction' must be between 0 and 1"),
])
def test_bad_recipe_is_refused_before_any_work(tmp_path, text, message):
    """A broken recipe is a one-line ConfigError before anything is prepared or trained (not a trace hours later)."""
    recipe = tiny_recipe(tmp_path)
    spec = json.loads(recipe.read_text())
    if text.startswith("missing:"):
        del spec[text.split(":")[1]]
        text = json.dumps(spec)
    elif text.startswith("change:"):
        changes = [item.split("=", 1) for item in text.split(":", 1)[1].split("&")]  # key=value&key=value
        text = json.dumps({**spec, **{key: json.loads(value) for key, value in changes}})
    recipe.write_text(text)
    result = train_default(tmp_path / "work", recipe)
    assert isinstance(result.exception, ConfigError) and message in str(result.exception), result.output
    assert not (tmp_path / "work").exists()


def test_install_is_all_or_nothing(tiny_run, tmp_path, monkeypatch):
    """--install cut by a failed copy (disk full) keeps the previous default model whole."""
    recipe, work = copy_run(tiny_run, tmp_path)
    default = tmp_path / "weights" / "default"
    default.mkdir(parents=True)
    (default / "model_index.json").write_text("the previous model")
    monkeypatch.setattr(pipeline_module, "DEFAULT_MODEL_DIR", default)
    copyfile, copies = shutil.copyfile, []

    def full_disk(src, dst, **kwargs):
        copies.append(src)
        if len(copies) > 2:
            raise OSError(28, "No space left on device")
        return copyfile(src, dst, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", full_disk)
    result = train_default(work, recipe, "--install")
    assert isinstance(result.exception, OSError), result.output
    assert [p.name for p in default.parent.iterdir()] == ["default"]
    assert [p.name for p in default.iterdir()] == ["model_index.json"] and (default / "model_index.json").read_text() == "the previous model"
    monkeypatch.setattr(shutil, "copyfile", copyfile)
    result = train_default(work, recipe, "--install")
    assert result.exit_code == 0, result.output
    assert MoCAPipeline.from_pretrained(str(default)).transformer.config.width == 32


def test_vae_cut_before_its_first_checkpoint_logs_each_step_once(tiny_run, tmp_path):
    """A VAE run killed before its first checkpoint starts again from step 0, and so does its log."""
    recipe, work = copy_run(tiny_run, tmp_path)
    shutil.rmtree(work / "vae" / "checkpoints")  # what a kill before the first checkpoint leaves: the log (2 steps)
    shutil.rmtree(work / "vae" / "vae")
    (work / "vae" / "summary.json").unlink()
    result = train_default(work, recipe)
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["step"] for line in (work / "vae" / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_more_continue_stages_extend_a_finished_run(tiny_run, tmp_path):
    """A recipe that only adds continue stages (default.json to default_cpu.json's run) trains just those."""
    recipe, work = copy_run(tiny_run, tmp_path)
    spec = json.loads(recipe.read_text())
    longer = tmp_path / "longer.json"
    longer.write_text(json.dumps({**spec, "dit_continue_config": [spec["dit_config"]]}))
    result = train_default(work, longer)
    assert result.exit_code == 0, result.output
    assert "[4/4] the transformer in" in result.output and "skipped" in result.output
    assert f"pipeline: {work / 'dit_continue' / 'pipeline'}" in result.output
    result = train_default(work, recipe)  # the shorter list again: every stage of it is done
    assert result.exit_code == 0 and f"pipeline: {work / 'dit' / 'pipeline'}" in result.output, result.output
    spec["dit_continue_config"] = [{"config": spec["dit_config"], "start": "encoder"}]
    longer.write_text(json.dumps(spec))
    result = train_default(work, longer)
    assert isinstance(result.exception, ConfigError) and "dit_continue_config" in str(result.exception), result.output


def test_a_moved_work_folder_resumes_its_cut_stage(tiny_run, tmp_path, monkeypatch):
    """A work folder moved as a whole, then run again by a relative --work, resumes its cut transformer stage (whose
    recipe named the previous stage's pipeline by its old path); run again absolute, every stage is done."""
    recipe, work = copy_run(tiny_run, tmp_path)
    spec = json.loads(recipe.read_text())
    longer = tmp_path / "longer.json"
    longer.write_text(json.dumps({**spec, "dit_continue_config": [spec["dit_config"]]}))
    assert train_default(work, longer).exit_code == 0  # dit_continue starts from work/dit/pipeline
    stage = work / "dit_continue"
    assert json.loads((stage / "train_config.json").read_text())["init_from"] == str(work / "dit" / "pipeline")
    shutil.rmtree(stage / "pipeline")  # cut after its first step's checkpoint
    shutil.rmtree(stage / "checkpoints" / "step_00000002")
    moved = tmp_path / "moved"
    work.rename(moved)
    monkeypatch.chdir(tmp_path)
    result = train_default(Path("moved"), longer)
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.output and "(step 1)" in result.output
    assert (f"resuming with init_from moved/dit/pipeline (recorded as {work / 'dit' / 'pipeline'}: the same folder, moved with "
            "the run or spelled from here)") in result.output  # (`A -> B` read like a change of base)
    assert json.loads((moved / "dit_continue" / "train_config.json").read_text())["init_from"] == "moved/dit/pipeline"
    index = moved / "dit_continue" / "pipeline" / "model_index.json"
    before = index.stat().st_mtime_ns
    result = train_default(moved, longer)  # absolute now: the same folders
    assert result.exit_code == 0, result.output
    assert "[4b/4] the transformer in" in result.output and "training" not in result.output
    assert index.stat().st_mtime_ns == before


def test_a_run_recipe_path_is_the_same_spelled_or_moved_another_way_but_not_another_folder(tmp_path, monkeypatch):
    """check_resume's paths: relative and absolute spellings of one folder are the same, and so is a folder inside the
    run's work folder once that is moved; another folder is another recipe, and so is a moved run without its origin."""
    from moca3d.training.recipe import check_resume, origin_path, record_run_config

    monkeypatch.chdir(tmp_path)
    config = Path("work") / "run" / "train_config.json"
    config.parent.mkdir(parents=True)
    record_run_config(config, {"init_from": "work/dit/pipeline", "image_encoder_from": None, "steps": 2})
    said = []
    check_resume(config, {"init_from": str(tmp_path / "work" / "dit" / "pipeline"), "image_encoder_from": None, "steps": 2},
                 said.append)()  # (the returned function says and records, once the resume is accepted)
    assert said == [f"resuming with init_from {tmp_path / 'work' / 'dit' / 'pipeline'} (recorded as work/dit/pipeline: the same "
                    "folder, moved with the run or spelled from here)"]
    (tmp_path / "work").rename(tmp_path / "moved")
    config = tmp_path / "moved" / "run" / "train_config.json"
    same = {"init_from": str(tmp_path / "moved" / "dit" / "pipeline"), "image_encoder_from": None, "steps": 3}
    check_resume(config, same, said.append)()
    assert said[-1] == (f"resuming with steps 2 -> 3, init_from {same['init_from']} (recorded as {tmp_path / 'work' / 'dit' / 'pipeline'}: "
                        "the same folder, moved with the run or spelled from here)")
    for other in ("moved/dit_continue/pipeline", str(tmp_path / "work" / "dit" / "pipeline"), "elsewhere/dit/pipeline"):
        with pytest.raises(ConfigError, match=r"another recipe \(init_from"):
            check_resume(config, {**same, "init_from": other}, said.append)
    with pytest.raises(ConfigError, match=r"another recipe \(image_encoder_from null -> \"moved/dit/pipeline"):
        check_resume(config, {**same, "image_encoder_from": "moved/dit/pipeline"}, said.append)
    origin_path(config).unlink()  # a run recorded before origins were: where it was is not known
    (tmp_path / "moved").rename(tmp_path / "again")
    with pytest.raises(ConfigError, match=r"another recipe \(init_from"):
        check_resume(tmp_path / "again" / "run" / "train_config.json",
                     {**same, "init_from": str(tmp_path / "again" / "dit" / "pipeline")}, said.append)


def test_the_same_data_folder_spelled_another_way_is_the_same_recipe(tmp_path):
    """--data through ".." (or a link) names the folder recorded in recipe.json: no refusal; another folder is one."""
    from moca3d.commands.default import check_same_recipe

    (tmp_path / "data").mkdir()
    (tmp_path / "work").mkdir()
    check_same_recipe(tmp_path / "work", {"objects": 2, "--data": str(tmp_path / "data")})
    check_same_recipe(tmp_path / "work", {"objects": 2, "--data": str(tmp_path / "work" / ".." / "data")})
    with pytest.raises(ConfigError, match="another recipe"):
        check_same_recipe(tmp_path / "work", {"objects": 2, "--data": str(tmp_path / "work" / "data")})


def test_a_multi_process_launch_is_refused_before_any_work(tmp_path, monkeypatch):
    """Under torchrun each process would prepare, encode and export the same folders: one line instead."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(app, ["train-default", "--work", str(tmp_path / "work")])
    assert isinstance(result.exception, ConfigError) and "train-default runs in one process" in str(result.exception)
    assert not (tmp_path / "work").exists()


def test_an_edited_stage_config_is_refused_not_skipped(tiny_run, tmp_path):
    """recipe.json recorded the stage config names only: an edited VAE config was skipped as trained (summary.json).
    Its content hash is recorded now: an edit is a one-line refusal naming the file; a run recorded without the hashes
    is accepted and records them."""
    from moca3d.commands.default import config_hashes

    recipe, work = copy_run(tiny_run, tmp_path)
    record = json.loads((work / "recipe.json").read_text())
    assert record["config_hashes"] == config_hashes(json.loads(recipe.read_text())) and set(record["config_hashes"]) == {"vae_config"}
    (work / "recipe.json").write_text(json.dumps({**record, "config_hashes": {"vae_config": "0" * 64}}))  # vae.json since edited
    result = train_default(work, recipe)
    assert isinstance(result.exception, ConfigError), result.output
    message = str(result.exception)
    assert "vae.json" in message and "changed since" in message and "--work" in message and "\n" not in message
    assert "[2/4]" not in result.output
    del record["config_hashes"]  # a run recorded before the hashes were
    (work / "recipe.json").write_text(json.dumps(record))
    result = train_default(work, recipe)
    assert result.exit_code == 0, result.output
    assert json.loads((work / "recipe.json").read_text())["config_hashes"] == config_hashes(json.loads(recipe.read_text()))


def test_sigterm_in_a_stage_exits_143_and_the_same_command_goes_on(tiny_run, tmp_path, monkeypatch):
    """A preempted train-default (SIGTERM in its transformer stage) said "Aborted!" and exited 1, as if nothing were
    saved; now the stage stops after its step, checkpointed, the command exits 143 naming the checkpoint, and run
    again it resumes that stage."""
    import moca3d.training.train_dit as train_dit
    from conftest import preempt_on_call

    recipe, work = copy_run(tiny_run, tmp_path)
    shutil.rmtree(work / "dit")  # the transformer stage, to be run again
    calls = []
    monkeypatch.setattr(train_dit, "training_loss", preempt_on_call(train_dit.training_loss, 1, calls))  # in step 1
    result = train_default(work, recipe)
    assert result.exit_code == 143, result.output
    assert "interrupted: stopped at step 1 of 2 (SIGTERM): checkpoint saved" in result.output
    assert [p.name for p in (work / "dit" / "checkpoints").iterdir()] == ["step_00000001"]
    monkeypatch.undo()
    result = train_default(work, recipe)
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.output and (work / "dit" / "pipeline" / "model_index.json").is_file()


def test_stage_configs_are_read_beside_the_recipe_first(tmp_path):
    """A recipe copied into a folder with its own edited stage configs trained the repository's configs/ ones of the
    same names; now a name is read beside the recipe, and only the ones missing there from configs/ (said)."""
    from moca3d.commands.default import CONFIGS, borrowed_configs, config_hashes, read_recipe, stage_config

    spec = json.loads(SMOKE.read_text())
    recipe = tmp_path / "mine.json"
    recipe.write_text(json.dumps(spec))
    mine = {**json.loads((CONFIGS / "dit_smoke_continue.json").read_text()), "steps": 7, "lr": 3e-5}
    (tmp_path / "dit_smoke_continue.json").write_text(json.dumps(mine))
    (tmp_path / "vae_smoke.json").write_text(json.dumps({**json.loads((CONFIGS / "vae_smoke.json").read_text()), "steps": 5}))
    assert read_recipe(recipe) == spec
    cfg = stage_config("dit_smoke_continue.json", "pipeline", tmp_path / "previous", tmp_path)
    assert (cfg.steps, cfg.lr) == (7, 3e-5)  # the edited one, not the repository's
    assert stage_config("dit_smoke_continue.json", "pipeline", tmp_path / "previous").steps != 7
    assert config_hashes(spec, tmp_path)["vae_config"] != config_hashes(spec)["vae_config"]
    borrowed = borrowed_configs(tmp_path, spec)
    assert "vae_smoke.json" not in borrowed and "dit_smoke_continue.json" not in borrowed and "dit_smoke.json" in borrowed
    assert borrowed_configs(CONFIGS, spec) == []
    (tmp_path / "dit_smoke.json").write_text("{not json")  # a broken one beside the recipe is its own, refused before any work
    with pytest.raises(ConfigError, match=str(tmp_path / "dit_smoke.json")):
        read_recipe(recipe)
    result = CliRunner().invoke(app, ["train-default", "--work", str(tmp_path / "work"), "--recipe", str(recipe)])
    assert isinstance(result.exception, ConfigError) and not (tmp_path / "work").exists()


def test_a_recipe_elsewhere_says_which_stage_configs_come_from_the_repository(tmp_path):
    """The message names the borrowed stage configs once, before any work (here: a --work that is a file, refused)."""
    recipe = tmp_path / "mine.json"
    recipe.write_text(SMOKE.read_text())
    (tmp_path / "vae_smoke.json").write_text((SMOKE.parent / "vae_smoke.json").read_text())
    (tmp_path / "work").write_text("a file")
    result = CliRunner().invoke(app, ["train-default", "--work", str(tmp_path / "work"), "--recipe", str(recipe)])
    assert isinstance(result.exception, ConfigError), result.output
    said = [line for line in result.output.splitlines() if "read from" in line]
    assert len(said) == 1 and "dit_smoke.json" in said[0] and "encoder_pretrain_smoke.json" in said[0]
    assert "vae_smoke.json" not in said[0]
    result = CliRunner().invoke(app, ["train-default", "--work", str(tmp_path / "work"), "--recipe", str(SMOKE)])
    assert isinstance(result.exception, ConfigError) and "read from" not in result.output


def test_without_the_repository_train_default_asks_for_a_recipe(tmp_path, monkeypatch):
    """Installed from a wheel there is no configs/: it said "recipe not found: .../lib/python3.11/configs/default.json"."""
    import moca3d.commands.default as default

    monkeypatch.setattr(default, "CONFIGS", tmp_path / "no_configs")
    result = CliRunner().invoke(app, ["train-default", "--work", str(tmp_path / "work")])
    assert isinstance(result.exception, ConfigError) and "give --recipe PATH" in str(result.exception)
    assert not (tmp_path / "work").exists()
