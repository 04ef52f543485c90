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
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import typer

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


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


def stage_config(name: str, start: str, previous: Path):
    """The DiT recipe `name` pointed at the previous stage's pipeline (or only at its image encoder)."""
    from moca3d.training.train_dit import DiTTrainConfig

    cfg = DiTTrainConfig.from_json(CONFIGS / name)
    if start == "encoder":
        return DiTTrainConfig.from_dict({**cfg.to_dict(), "init_from": None, "image_encoder": {},
                                         "image_encoder_from": str(previous / "image_encoder")})
    return DiTTrainConfig.from_dict({**cfg.to_dict(), "init_from": str(previous), "image_encoder_from": None})


def register(app: typer.Typer) -> None:
    """Add `train-default`."""

    @app.command("train-default")
    def train_default(
        work: Path = typer.Option(Path("runs/default"), "--work", help="Working folder: data/, vae/, dit/ (resumable)."),
        recipe: Optional[Path] = typer.Option(None, "--recipe", help="Recipe JSON: dataset size and each training stage's config (default: the repository's configs/default.json)."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N (auto: cuda when available)."),
        workers: int = typer.Option(2, "--workers", help="Processes for data preparation."),
        install: bool = typer.Option(False, "--install", help="Copy the trained pipeline into the package as the default model."),
        data: Optional[Path] = typer.Option(None, "--data", help="Use this prepared dataset instead of preparing one."),
    ) -> None:
        """Train the built-in model from scratch on procedural objects, every stage resumable.

        configs/default.json (the shipped model) ends with a GPU-sized stage, a medium transformer: 4 minutes on an H200, roughly 11 hours on one CPU core. --recipe configs/default_cpu.json stops before it: the previous, small built-in model, hours on a 2-core CPU.
        """
        from moca3d.commands.vae import _weights_id, load_vae
        from moca3d.data.prepare import PrepareConfig, prepare, procedural_jobs
        from moca3d.geometry.inside import QueryConfig
        from moca3d.geometry.sampling import SurfaceSamplingConfig
        from moca3d.pipeline import DEFAULT_MODEL_DIR
        from moca3d.training.train_dit import DiTTrainConfig, train
        from moca3d.training.train_vae import VAETrainConfig, encode_dataset, train_vae

        from moca3d.commands.common import resolve_device
        from moca3d.errors import ConfigError

        recipe = recipe if recipe is not None else CONFIGS / "default.json"
        if not recipe.is_file():
            raise ConfigError(f"recipe not found: {recipe} (the recipes live in the repository's configs/ folder)")
        spec = json.loads(recipe.read_text())
        dev = resolve_device(device)
        root = data or work / "data"

        def prepare_objects(count: int, start: int, num_queries: int) -> None:
            """Objects start..start+count-1 of the recipe's stream into `root`, with `num_queries` SDF queries each."""
            cfg = PrepareConfig(
                surface=SurfaceSamplingConfig(num_points=spec["num_surface"]), queries=QueryConfig(num_queries=num_queries),
                val_fraction=spec["val_fraction"], test_fraction=spec["test_fraction"], seed=spec["seed"],
            )
            prepare(procedural_jobs("objects", count, seed=spec["seed"], start=start), root, cfg, workers=workers)

        if data is None:
            typer.echo(f"[1/4] preparing {spec['objects']} procedural objects in {root}")
            prepare_objects(spec["objects"], 0, spec["num_queries"])
        vae_run = work / "vae"
        if not (vae_run / "vae" / "config.json").is_file():
            typer.echo(f"[2/4] training the VAE in {vae_run}")
            train_vae(root, vae_run, VAETrainConfig.from_json(CONFIGS / spec["vae_config"]), resume=True, device=dev)
        extra = int(spec.get("dit_extra_objects", 0))
        if extra and data is None:  # DiT-only objects: surface samples for the latents, few SDF queries
            typer.echo(f"[2b/4] preparing {extra} more procedural objects for the transformer in {root}")
            prepare_objects(extra, spec["objects"], spec["dit_extra_num_queries"])
        vae_dir = vae_run / "vae"
        if spec.get("vae_finetune_config"):  # decoder only: the latents below stay those of vae_run
            ft_run = work / "vae_finetune"
            if not (ft_run / "vae" / "config.json").is_file():
                typer.echo(f"[2c/4] fine-tuning the VAE decoder in {ft_run}")
                ft_cfg = VAETrainConfig.from_json(CONFIGS / spec["vae_finetune_config"])
                if not ft_cfg.freeze_encoder:
                    raise ConfigError(f"{spec['vae_finetune_config']}: a recipe's VAE fine-tune must set freeze_encoder")
                ft_cfg.init_from = str(vae_dir)
                train_vae(root, ft_run, ft_cfg, resume=True, device=dev)
            vae_dir = ft_run / "vae"
        typer.echo("[3/4] caching latents")
        vae = load_vae(vae_dir, dev)
        encode_dataset(root, vae, _weights_id(vae_dir), spec["encoder_points"])
        dit_cfg = DiTTrainConfig.from_json(CONFIGS / spec["dit_config"])
        if spec.get("encoder_pretrain_config"):  # the image encoder learns a 3D prior first (then frozen or not)
            from moca3d.training.pretrain_encoder import EncoderPretrainConfig, pretrain_encoder

            enc_run = work / "encoder"
            if not (enc_run / "summary.json").is_file():  # written last: the encoder folder is complete
                typer.echo(f"[3b/4] pre-training the image encoder in {enc_run}")
                pretrain_encoder(EncoderPretrainConfig.from_json(CONFIGS / spec["encoder_pretrain_config"]), root, enc_run, device=dev)
            dit_cfg = DiTTrainConfig.from_dict({**dit_cfg.to_dict(), "image_encoder": {}, "image_encoder_from": str(enc_run / "image_encoder")})
        typer.echo(f"[4/4] training the transformer in {work / 'dit'}")
        result = train(root, work / "dit", dit_cfg, vae_dir=vae_dir, device=dev)
        stages = continue_stages(spec)
        for i, (name, start) in enumerate(stages):  # more training, each stage from the last one's pipeline
            folder = work / ("dit_continue" if i == 0 else f"dit_continue{i + 1}")
            what = "a new transformer on the image encoder" if start == "encoder" else "the transformer further"
            typer.echo(f"[4b/4] training {what} ({i + 1} of {len(stages)}, {name}) in {folder}")
            more = stage_config(name, start, Path(result["pipeline"]))
            result = train(root, folder, more, vae_dir=vae_dir, device=dev)
        pipeline = Path(result["pipeline"])
        typer.echo(f"pipeline: {pipeline}")
        if install:
            if DEFAULT_MODEL_DIR.exists():
                shutil.rmtree(DEFAULT_MODEL_DIR)
            shutil.copytree(pipeline, DEFAULT_MODEL_DIR)
            typer.echo(f"installed as the default model: {DEFAULT_MODEL_DIR}")
