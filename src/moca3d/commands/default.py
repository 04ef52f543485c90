"""`moca3d train-default`: the reproducible recipe of the built-in model, every stage resumable.

procedural objects -> prepare -> train-vae -> [more objects for the DiT] -> encode-dataset ->
train (DiT) -> pipeline folder, optionally installed as the package's default model. The VAE trains
on the first `objects`; `dit_extra_objects` more (the same stream, prepared after the VAE with only
`dit_extra_num_queries` SDF queries each, since the transformer needs their latents alone) widen the
transformer's training set. `encoder_pretrain_config` pre-trains the image encoder on the training
objects' coarse surface grids (`moca3d pretrain-encoder`); the transformer then starts from it. Two
optional stages refine the result: `vae_finetune_config` trains the VAE's decoder again on all objects
(encoder frozen, so the latents stay those of the first VAE) and `dit_continue_config` (one stage or a
list) trains further, each stage from the previous stage's pipeline. A stage is a DiT recipe name (the
transformer and encoder continue) or `{"config": name, "start": "encoder"}`: a new transformer, built from
the recipe's own `transformer` config, trained on the previous stage's image encoder (how the built-in model
grew from a small transformer to a medium one).

A work folder holds the run of one recipe (recorded in its recipe.json at the start): run again, it skips the
finished stages and resumes the cut one; another recipe is refused, unless it only adds continue stages, and so is
an edited VAE, VAE fine-tune or encoder pre-training config (their content hashes are recorded too).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from moca3d.commands.common import TRAIN_DEVICE_HELP
from moca3d.progress import cli_progress

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
RECIPE_KEYS: dict[str, Any] = {  # a recipe's keys and their JSON types (Any: checked by continue_stages)
    "objects": int, "seed": int, "num_surface": int, "num_queries": int, "val_fraction": float, "test_fraction": float,
    "encoder_points": int, "vae_config": str, "dit_config": str, "dit_extra_objects": int, "dit_extra_num_queries": int,
    "vae_finetune_config": Optional[str], "encoder_pretrain_config": Optional[str], "dit_continue_config": Any,
}
REQUIRED_KEYS = ("objects", "seed", "num_surface", "num_queries", "val_fraction", "test_fraction", "encoder_points",
                 "vae_config", "dit_config")
RECORD = "recipe.json"  # in the work folder: the recipe it was started with
HASHES = "config_hashes"  # in RECORD: `config_hashes` of the recipe


def stage_file(folder: Path, name: str) -> Path:
    """A stage config a recipe in `folder` names: beside the recipe (or a path), else the repository's configs/ one."""
    beside = folder / name
    return beside if beside.is_file() or not (CONFIGS / name).is_file() else CONFIGS / name


def borrowed_configs(folder: Path, spec: dict) -> list[str]:
    """The stage configs a recipe in `folder` names that are read from the repository's configs/, none beside it."""
    names = [spec[k] for k in ("vae_config", "vae_finetune_config", "encoder_pretrain_config", "dit_config") if spec.get(k)]
    names += [name for name, _ in continue_stages(spec)]
    return [n for n in dict.fromkeys(names) if stage_file(folder, n) != folder / n]


STAGE_STARTS = ("pipeline", "encoder")  # continue the whole previous pipeline, or only its image encoder


def continue_stages(spec: dict) -> list[tuple[str, str]]:
    """The recipe's `dit_continue_config` as (recipe name, start) pairs, run in order."""
    from moca3d.errors import ConfigError

    raw = spec.get("dit_continue_config") or []
    entries = raw if isinstance(raw, list) else [raw]
    stages = []
    for entry in entries:
        if isinstance(entry, str):
            stages.append((entry, "pipeline"))
        elif isinstance(entry, dict) and set(entry) <= {"config", "start"} and isinstance(entry.get("config"), str) \
                and entry.get("start", "pipeline") in STAGE_STARTS:
            stages.append((entry["config"], entry.get("start", "pipeline")))
        else:
            raise ConfigError("dit_continue_config must be a recipe name, {\"config\": name, \"start\": \"pipeline\" or"
                              f" \"encoder\"}}, or a list of them; got {raw!r}")
    return stages


def stage_config(name: str, start: str, previous: Path, folder: Path = CONFIGS):
    """The DiT recipe `name` (of a recipe in `folder`) pointed at the previous stage's pipeline (or only at its image encoder)."""
    from moca3d.training.train_dit import DiTTrainConfig

    cfg = DiTTrainConfig.from_json(stage_file(folder, name))
    if start == "encoder":
        return DiTTrainConfig.from_dict({**cfg.to_dict(), "init_from": None, "image_encoder": {},
                                         "image_encoder_from": str(previous / "image_encoder")})
    return DiTTrainConfig.from_dict({**cfg.to_dict(), "init_from": str(previous), "image_encoder_from": None})


def read_recipe(path: Path) -> dict:
    """The recipe at `path`, checked before any work (keys, types, every stage config it names): one-line ConfigErrors."""
    from moca3d.errors import ConfigError
    from moca3d.training.pretrain_encoder import EncoderPretrainConfig
    from moca3d.training.recipe import read_json, type_error
    from moca3d.training.train_dit import DiTTrainConfig
    from moca3d.training.train_vae import VAETrainConfig

    spec = read_json(path, "recipe not found: {path} (the recipes live in the repository's configs/ folder)")
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a recipe must be a JSON object of keys and values")
    unknown = sorted(set(spec) - set(RECIPE_KEYS))
    missing = [k for k in REQUIRED_KEYS if k not in spec]
    if spec.get("dit_extra_objects") and "dit_extra_num_queries" not in spec:
        missing.append("dit_extra_num_queries")
    problems = ([f"unknown recipe keys: {', '.join(unknown)}"] if unknown else []) + \
        ([f"missing recipe keys: {', '.join(missing)}"] if missing else [])
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    for key, value in spec.items():
        wrong = type_error(RECIPE_KEYS[key], value)
        if wrong is not None:
            raise ConfigError(f"{path}: recipe key '{key}' must be {wrong}, got {json.dumps(value)[:60]}")
    check_ranges(path, spec)
    folder = path.parent
    VAETrainConfig.from_json(stage_file(folder, spec["vae_config"]))
    if spec.get("vae_finetune_config") and not VAETrainConfig.from_json(stage_file(folder, spec["vae_finetune_config"])).freeze_encoder:
        raise ConfigError(f"{spec['vae_finetune_config']}: a recipe's VAE fine-tune must set freeze_encoder")
    if spec.get("encoder_pretrain_config"):
        EncoderPretrainConfig.from_json(stage_file(folder, spec["encoder_pretrain_config"]))
    DiTTrainConfig.from_json(stage_file(folder, spec["dit_config"]))
    for name, start in continue_stages(spec):
        stage_config(name, start, Path("previous"), folder)
    return spec


def check_ranges(path: Path, spec: dict) -> None:
    """A ConfigError naming the recipe key of a value out of range: the configs the stages build (PrepareConfig, whose own
    checks name `prepare`'s flags) are built here, before the recipe is recorded in a work folder."""
    from moca3d.data.prepare import PrepareConfig
    from moca3d.errors import ConfigError
    from moca3d.geometry.inside import QueryConfig
    from moca3d.geometry.sampling import SurfaceSamplingConfig

    lowest = {"objects": 1, "encoder_points": 1, "seed": 0, "dit_extra_objects": 0, "dit_extra_num_queries": 1}
    for key, low in lowest.items():
        if key in spec and spec[key] < low:
            raise ConfigError(f"{path}: recipe key '{key}' must be >= {low}, got {spec[key]}")
    flags = {"--num-surface": "num_surface", "--val-fraction": "val_fraction", "--test-fraction": "test_fraction"}
    for queries in ("num_queries", "dit_extra_num_queries"):
        if queries not in spec:
            continue
        try:
            PrepareConfig(surface=SurfaceSamplingConfig(num_points=spec["num_surface"]),
                          queries=QueryConfig(num_queries=spec[queries]), val_fraction=spec["val_fraction"],
                          test_fraction=spec["test_fraction"], seed=spec["seed"])
        except ConfigError as err:
            text = str(err)
            for flag, key in {**flags, "--num-queries": queries}.items():
                text = text.replace(flag, f"recipe key '{key}'")
            raise ConfigError(f"{path}: {text}") from None


HASHED = ("vae_config", "vae_finetune_config", "encoder_pretrain_config")  # stages skipped once their summary.json is written


def config_hashes(spec: dict, folder: Path = CONFIGS) -> dict[str, str]:
    """The content (parsed JSON, so not its spacing) hash of each stage config the recipe (in `folder`) names whose
    finished stage is skipped without a look at its config (the DiT stages compare theirs: `trained`), by recipe key."""
    import hashlib

    out = {}
    for key in HASHED:
        if spec.get(key):
            content = json.dumps(json.loads(stage_file(folder, spec[key]).read_text()), sort_keys=True)
            out[key] = hashlib.sha256(content.encode()).hexdigest()
    return out


def check_same_recipe(work: Path, record: dict, folder: Path = CONFIGS) -> None:
    """Write `record` (the recipe and --data) into a new work folder; one-line ConfigError when it holds another one's run.

    Only the continue stages may differ, one list extending the other (configs/default.json adds a stage to
    default_cpu.json's): the run goes on to the longer list's last stage, or stops at the shorter one's. A stage config
    whose content hash (record[HASHES]) differs from the recorded one is refused too; a run recorded without the hashes
    accepts them (and records them from now on).
    """
    from moca3d.errors import ConfigError
    from moca3d.training.checkpoints import atomic_write_json

    path = work / RECORD
    if not path.is_file():
        atomic_write_json(record, path)
        return
    old = json.loads(path.read_text())
    if isinstance(old.get("--data"), str) and isinstance(record.get("--data"), str) \
            and Path(old["--data"]).resolve() == Path(record["--data"]).resolve():
        old["--data"] = record["--data"]  # the same dataset, spelled another way (a link, or "..")
    changed = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k) and k not in ("dit_continue_config", HASHES))
    stages, before = continue_stages(record), continue_stages(old)
    hashes, recorded = record.get(HASHES) or {}, old.get(HASHES) or {}  # none recorded (an older run): not known, accepted
    edited = [k for k in HASHED if k in hashes and k in recorded and hashes[k] != recorded[k] and not changed]
    if edited:
        raise ConfigError(f"{stage_file(folder, record[edited[0]])} (the recipe's {edited[0]}) changed since {work} started its run"
                          f" (recorded in {path}): its finished stage would not be trained again; restore it, or give a new --work folder")
    if stages[:len(before)] != before[:len(stages)]:  # neither list of continue stages extends the other
        changed.append("dit_continue_config")
    if changed:
        diff = ", ".join(f"{k} {json.dumps(old.get(k))[:40]} -> {json.dumps(record.get(k))[:40]}" for k in changed[:3])
        raise ConfigError(f"{work} holds the run of another recipe ({diff}; its own is recorded in {path}): run it with that one,"
                          " or give a new --work folder")
    if len(stages) > len(before):  # more stages: the run now goes on to them
        atomic_write_json(record, path)
    elif set(hashes) - set(recorded):  # a run recorded before the hashes were: from now on, its configs are known
        atomic_write_json({**json.loads(path.read_text()), HASHES: {**hashes, **recorded}}, path)


def trained(run: Path, cfg) -> bool:
    """A DiT stage is done: its pipeline is complete (model_index.json is written last) and its recipe is `cfg` (its
    paths may name the same folders another way: the work folder moved, or given relative instead of absolute)."""
    from moca3d.training.recipe import recipe_changes, recipe_defaults

    config = run / "train_config.json"
    return (run / "pipeline" / "model_index.json").is_file() and config.is_file() and not recipe_changes(config, cfg.to_dict(), recipe_defaults(type(cfg)))


def register(app: typer.Typer) -> None:
    """Add `train-default`."""

    @app.command("train-default")
    def train_default(
        work: Path = typer.Option(Path("runs/default"), "--work", help="Working folder: data/, vae/, dit/ (resumable)."),
        recipe: Optional[Path] = typer.Option(None, "--recipe", help="Recipe JSON: dataset size and each training stage's config, named by file beside the recipe (else the repository's configs/ one) or by path (default: the repository's configs/default.json)."),
        device: str = typer.Option("auto", "--device", help=TRAIN_DEVICE_HELP),
        workers: int = typer.Option(2, "--workers", help="Processes for data preparation."),
        install: bool = typer.Option(False, "--install", help="Copy the trained pipeline into the package as the default model (the installed package's folder: it needs write access there; a wheel install's record of its files no longer matches)."),
        data: Optional[Path] = typer.Option(None, "--data", help="Use this prepared dataset instead of preparing one."),
    ) -> None:
        """Train the built-in model from scratch on procedural objects, every stage resumable.

        configs/default.json (the shipped model) ends with a GPU-sized stage, a medium transformer: 4 minutes on an H200, roughly 11 hours on one CPU core. --recipe configs/default_cpu.json stops before it: the previous, small built-in model, hours on a 2-core CPU.
        """
        from moca3d.errors import ConfigError

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # its stages prepare, encode and export in one process
            raise ConfigError("train-default runs in one process: under torchrun / accelerate launch, run its training stages"
                              " (train-vae, train) with their configs instead")
        from moca3d.commands.vae import _weights_id, load_vae
        from moca3d.data.prepare import PrepareConfig, prepare, procedural_jobs
        from moca3d.geometry.inside import QueryConfig
        from moca3d.geometry.sampling import SurfaceSamplingConfig
        from moca3d.pipeline import DEFAULT_MODEL_DIR
        from moca3d.training.train_dit import DiTTrainConfig, train
        from moca3d.training.train_vae import VAETrainConfig, encode_dataset, train_vae

        from moca3d.commands.common import check_run_folder, resolve_device, training_stops

        if recipe is None and not (CONFIGS / "default.json").is_file():  # moca3d installed from a wheel: no configs/
            raise ConfigError("train-default's recipes come with moca3d's source repository (its configs/ folder), not the "
                              "installed package: give --recipe PATH, with the stage configs it names beside it")
        recipe = recipe if recipe is not None else CONFIGS / "default.json"
        spec, beside = read_recipe(recipe), recipe.parent
        borrowed = borrowed_configs(beside, spec)
        if borrowed:
            typer.echo(f"stage configs not beside {recipe}, read from {CONFIGS}: {', '.join(borrowed)}")
        check_run_folder(work, "--work")
        dev = resolve_device(device)
        check_same_recipe(work, {**spec, "--data": str(data.absolute()) if data else None, HASHES: config_hashes(spec, beside)}, beside)
        root = data or work / "data"
        with training_stops(work):  # SIGTERM / Ctrl+C: the stage running stops after its step, checkpointed

            def prepare_objects(count: int, start: int, num_queries: int) -> None:
                """Objects start..start+count-1 of the recipe's stream into `root`, with `num_queries` SDF queries each."""
                cfg = PrepareConfig(
                    surface=SurfaceSamplingConfig(num_points=spec["num_surface"]), queries=QueryConfig(num_queries=num_queries),
                    val_fraction=spec["val_fraction"], test_fraction=spec["test_fraction"], seed=spec["seed"],
                )
                # the DiT-only objects have fewer SDF queries than the VAE's, on purpose
                prepare(procedural_jobs("objects", count, seed=spec["seed"], start=start), root, cfg, workers=workers,
                        vary=("queries.num_queries",), progress=cli_progress())

            if data is None:
                typer.echo(f"[1/4] preparing {spec['objects']} procedural objects in {root}")
                prepare_objects(spec["objects"], 0, spec["num_queries"])
            vae_run = work / "vae"
            if (vae_run / "summary.json").is_file():  # written last: the VAE folder is complete
                typer.echo(f"[2/4] the VAE in {vae_run} is trained: skipped")
            else:
                typer.echo(f"[2/4] training the VAE in {vae_run}")
                train_vae(root, vae_run, VAETrainConfig.from_json(stage_file(beside, spec["vae_config"])), resume=True, device=dev,
                          progress=cli_progress())
            extra = int(spec.get("dit_extra_objects", 0))
            if extra and data is None:  # DiT-only objects: surface samples for the latents, few SDF queries
                typer.echo(f"[2b/4] preparing {extra} more procedural objects for the transformer in {root}")
                prepare_objects(extra, spec["objects"], spec["dit_extra_num_queries"])
            vae_dir = vae_run / "vae"
            if spec.get("vae_finetune_config"):  # decoder only: the latents below stay those of vae_run
                ft_run = work / "vae_finetune"
                if (ft_run / "summary.json").is_file():
                    typer.echo(f"[2c/4] the VAE decoder in {ft_run} is fine-tuned: skipped")
                else:
                    typer.echo(f"[2c/4] fine-tuning the VAE decoder in {ft_run}")
                    ft_cfg = VAETrainConfig.from_json(stage_file(beside, spec["vae_finetune_config"]))
                    ft_cfg.init_from = str(vae_dir)
                    train_vae(root, ft_run, ft_cfg, resume=True, device=dev, progress=cli_progress())
                vae_dir = ft_run / "vae"
            typer.echo("[3/4] caching latents")
            vae = load_vae(vae_dir, dev)
            counts = encode_dataset(root, vae, _weights_id(vae_dir), spec["encoder_points"], progress=cli_progress(), replace=True)
            if counts["replaced"]:  # e.g. --data encoded before with another VAE: this recipe's transformer needs its own
                typer.echo(f"      re-encoded {counts['replaced']} assets whose latents another VAE (or other settings) made")
            dit_cfg = DiTTrainConfig.from_json(stage_file(beside, spec["dit_config"]))
            if spec.get("encoder_pretrain_config"):  # the image encoder learns a 3D prior first (then frozen or not)
                from moca3d.training.pretrain_encoder import EncoderPretrainConfig, pretrain_encoder

                enc_run = work / "encoder"
                if (enc_run / "summary.json").is_file():  # written last: the encoder folder is complete
                    typer.echo(f"[3b/4] the image encoder in {enc_run} is pre-trained: skipped")
                else:
                    typer.echo(f"[3b/4] pre-training the image encoder in {enc_run}")
                    pretrain_encoder(EncoderPretrainConfig.from_json(stage_file(beside, spec["encoder_pretrain_config"])), root, enc_run, device=dev)
                dit_cfg = DiTTrainConfig.from_dict({**dit_cfg.to_dict(), "image_encoder": {}, "image_encoder_from": str(enc_run / "image_encoder")})

            def train_stage(label: str, what: str, folder: Path, cfg) -> Path:
                """Train one DiT stage into `folder` (resuming), or skip it when done; its pipeline folder."""
                if trained(folder, cfg):
                    typer.echo(f"{label} the transformer in {folder} is trained: skipped")
                    return folder / "pipeline"
                typer.echo(f"{label} training {what} in {folder}")
                return Path(train(root, folder, cfg, vae_dir=vae_dir, device=dev, progress=cli_progress(sys.stdout))["pipeline"])

            pipeline = train_stage("[4/4]", "the transformer", work / "dit", dit_cfg)
            stages = continue_stages(spec)
            for i, (name, start) in enumerate(stages):  # more training, each stage from the last one's pipeline
                stage_dir = work / ("dit_continue" if i == 0 else f"dit_continue{i + 1}")
                what = "a new transformer on the image encoder" if start == "encoder" else "the transformer further"
                pipeline = train_stage("[4b/4]", f"{what} ({i + 1} of {len(stages)}, {name})", stage_dir, stage_config(name, start, pipeline, beside))
            typer.echo(f"pipeline: {pipeline}")
            if install:  # copied beside it, then renamed into place: never a partial default model
                tmp = DEFAULT_MODEL_DIR.with_name(f".{DEFAULT_MODEL_DIR.name}.tmp")
                try:
                    shutil.rmtree(tmp, ignore_errors=True)
                    shutil.copytree(pipeline, tmp)
                    if DEFAULT_MODEL_DIR.exists():
                        shutil.rmtree(DEFAULT_MODEL_DIR)
                    os.replace(tmp, DEFAULT_MODEL_DIR)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                typer.echo(f"installed as the default model: {DEFAULT_MODEL_DIR}")
