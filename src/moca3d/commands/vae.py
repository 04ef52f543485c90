"""CLI verbs of the vecset VAE: `train-vae`, `eval-vae`, `reconstruct`, `encode-dataset`, `cache-latents`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moca3d.commands.common import (DEVICE_HELP, COMPONENTS_HELP, FACES_HELP, THREADS_HELP, apply_threads, shipped, check_output_path, check_run_folder, keep_run_length, plural, resolve_device,
                                   resume_recipe, training_stops, write_json)
from moca3d.defaults import RESOLUTION_RULE, check_resolution
from moca3d.errors import ConfigError, InputError, warn_input
from moca3d.progress import cli_progress

# the packaged reconstruction VAE: the built-in model's encoder, its decoder fine-tuned with free-space queries
# (configs/vae_small_freespace.json); the generation pipelines keep the first decoder (README: their generated
# latents decode to more empty parts with this one). Same encoder, so the latents of both are identical.
PACKAGED_VAE = Path(__file__).resolve().parent.parent / "weights" / "vae"
# --points: 8x the 8192 surface samples `prepare` draws per component (the VAEs train on 512 of them); the encoder's
# cross-attention holds about 2.3 KiB a point per component (packaged VAE), and reconstruct encodes 16 components
# at once: about 2.3 GiB at this bound
MAX_POINTS = 65_536
# --image-size: 4x the built-in encoders' 128 px and twice prepare's default 256 px renders (larger only upsamples
# them); the cache is built from float32 images, 3 MiB an asset at this size
MAX_IMAGE_SIZE = 512


def load_vae(model_dir: Optional[Path], device: str = "cpu"):
    """A VecSetVAE from a diffusers-style folder (default: the packaged weights)."""
    from moca3d.training.train_vae import load_vae_folder

    folder = Path(model_dir) if model_dir is not None else PACKAGED_VAE
    hint = "" if model_dir is not None else " (no packaged VAE weights; pass --model)"
    return load_vae_folder(folder, hint).to(device).eval()


def check_max_points(points: int) -> None:
    """--points at most MAX_POINTS, checked before any model loads (more points only cost memory)."""
    if points > MAX_POINTS:
        raise ConfigError(f"--points must be at most {MAX_POINTS} (surface points per component), got {points}")


def check_points(points: int, vae, num_latents: Optional[int] = None) -> None:
    """--points must cover the latent tokens (`num_latents`, default the VAE's): its encoder picks that many of them by
    farthest-point sampling."""
    tokens = num_latents or vae.config.num_latents
    if points < tokens:
        whose = "--num-latents" if num_latents else "the VAE's"
        raise ConfigError(f"--points must be at least {whose} {tokens} latent tokens, got {points}")


def _weights_id(folder: Path) -> str:
    """Content hash of a model folder's safetensors files, the "model" encode-dataset records with the latents (the
    "encoder" record, `train_vae.encoder_id`, is what training checks)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return f"sha256:{digest.hexdigest()[:16]}"


def register(app: typer.Typer) -> None:
    """Add the VAE verbs to the CLI."""

    @app.command("train-vae")
    def train_vae_cmd(
        data_dir: Path = typer.Argument(..., help="Prepared dataset (manifest.jsonl + assets/)."),
        out_dir: Path = typer.Option(..., "--output", "--out", "-o", help="Run directory: checkpoints, logs, vae/."),
        config: Optional[Path] = typer.Option(None, "--config", help="JSON recipe (default: a resumed run's own recipe, else the built-in small recipe, as configs/vae_small.json)."),
        steps: Optional[int] = typer.Option(None, "--steps", help="Override the number of steps."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Override the batch size (components)."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in OUT_DIR."),
        device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
        threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
        init_from: Optional[Path] = typer.Option(None, "--init-from", callback=shipped, help="Start from this VAE folder (fine-tune)."),
        freeze_encoder: bool = typer.Option(False, "--freeze-encoder", help="Train the decoder only: latents cached with --init-from's VAE (and transformers trained on them) stay valid."),
        validate: bool = typer.Option(True, "--validate/--no-validate", help="Reconstruct the val split's assets at the end (CD, F-score; minutes at the recipe's val_resolution); --no-validate for a quick trial run (eval-vae scores it later)."),
    ) -> None:
        """Train the vecset VAE on part meshes (SDF + KL loss, EMA, checkpoints, validation; torchrun / accelerate launch: many GPUs)."""
        from moca3d.training.train_vae import VAETrainConfig, train_vae

        recipe, recorded = resume_recipe(VAETrainConfig, config, out_dir, "train_config.json", resume)
        if steps is not None:
            recipe["steps"] = steps
        if batch_size is not None:
            recipe["batch_size"] = batch_size
        apply_threads(recipe, threads)
        if init_from is not None:
            recipe["init_from"] = str(init_from)
        if freeze_encoder:
            recipe["freeze_encoder"] = True
        keep_run_length(recipe, recorded, steps=steps)
        cfg = VAETrainConfig.from_dict(recipe)  # checked
        check_run_folder(out_dir)
        with training_stops(out_dir):
            summary = train_vae(data_dir, out_dir, cfg, resume=resume, device=resolve_device(device), progress=cli_progress(),
                                validate_at_end=validate)
        if summary.get("writer") is False:  # a further process of a multi-process launch: the first one reports
            return
        run = f" ({summary['train_time_s'] / 60:.1f} min over the whole run)" if summary["trained_steps"] < summary["steps"] else ""
        typer.echo(f"trained {plural(summary['trained_steps'], 'step')} (to step {summary['steps']}) in "
                   f"{summary['session_time_s'] / 60:.1f} min{run}; weights in {out_dir / 'vae'}")
        for k, v in summary.get("val", {}).items():
            typer.echo(f"  val {k}: {v:.4f}")

    @app.command("eval-vae")
    def eval_vae_cmd(
        data_dir: Path = typer.Argument(..., help="Prepared dataset (manifest.jsonl + assets/)."),
        model: Optional[Path] = typer.Option(None, "--model", callback=shipped, help="VAE folder (config.json + safetensors; default: the packaged reconstruction VAE, src/moca3d/weights/vae)."),
        split: str = typer.Option("val", "--split", help="Split whose assets are reconstructed."),
        assets: int = typer.Option(12, "--assets", help="At most this many assets of the split."),
        resolution: int = typer.Option(128, "--resolution", help=f"Finest grid cells per axis ({RESOLUTION_RULE})."),
        points: int = typer.Option(512, "--points", help="Surface points fed to the encoder per component."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the metrics (and each asset's) to this JSON file ('-': print it alone)."),
        device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    ) -> None:
        """Reconstruct held-out assets part by part; print CD and F-scores (docs/DESIGN.md §6)."""
        from moca3d.training.train_vae import VAETrainConfig, validate

        if assets < 1:
            raise ConfigError(f"--assets must be >= 1, got {assets}")
        check_resolution(resolution)
        check_max_points(points)
        check_output_path(json_out, "--json")
        vae = load_vae(model, resolve_device(device))
        check_points(points, vae)
        cfg = VAETrainConfig(model={}, num_surface_points=points, val_resolution=resolution,
                             val_coarse_resolution=max(16, resolution // 4), val_assets=assets)
        metrics = validate(vae, data_dir, cfg, split=split, progress=cli_progress(), per_asset=True)
        from moca3d.metrics import MetricsConfig, protocol

        frames = ("asset: the fused parts, each side normalised alone; parts: each part in the prepared asset's frame, as "
                  "given; parts_normalized: each part normalised alone")
        metrics["settings"] = {"model": str(model) if model else "packaged", "split": split, "resolution": resolution,
                               "points": points, "metric_points": cfg.metric_points,
                               "protocol": {**{k: v for k, v in protocol(MetricsConfig(num_points=cfg.metric_points)).items()
                                               if k != "self_iou"}, "frame": frames,  # (no self-IoU here)
                                            "sampling": "uniform by area on each compared surface, each side its own stream of the seed"}}
        if write_json(json_out, metrics):
            return
        for k, v in metrics.items():
            if k not in ("assets", "settings"):  # each asset's scores go to the JSON only
                typer.echo(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")

    @app.command("reconstruct")
    def reconstruct_cmd(
        mesh: Path = typer.Argument(..., help=f"The components to round-trip: {COMPONENTS_HELP}."),
        out: Path = typer.Option(..., "--output", "--out", "-o", help="Output .glb (one named node per component) or .obj (one `o` object per component, a .mtl beside it); an empty component keeps its place, without faces."),
        model: Optional[Path] = typer.Option(None, "--model", callback=shipped, help="VAE folder (config.json + safetensors; default: the packaged reconstruction VAE, src/moca3d/weights/vae)."),
        resolution: int = typer.Option(256, "--resolution", help=f"Finest grid cells per axis ({RESOLUTION_RULE})."),
        points: int = typer.Option(512, "--points", help="Surface points fed to the encoder per component."),
        faces: Optional[int] = typer.Option(None, "--faces", help=FACES_HELP),
        device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    ) -> None:
        """Encode every component of a mesh and decode it back (VAE round trip); the file records how (`moca3d info`)."""
        from moca3d import __version__
        from moca3d.geometry.extract import vae_extract_config
        from moca3d.geometry.mesh_io import MESH_FORMATS, open_components, read_components, save_components
        from moca3d.geometry.simplify import check_faces, simplify_components
        from moca3d.training.train_vae import reconstruct_components

        if out.suffix.lower() not in MESH_FORMATS:
            raise InputError(f"{out}: output must be a {' or '.join(MESH_FORMATS)} file")
        check_output_path(out)
        check_resolution(resolution)
        check_max_points(points)
        check_faces(faces)
        parts, names = read_components(mesh)  # read once; a generation's empty components keep their place
        check_faces(faces, sum(1 for part in parts if len(part.faces)))  # what is decoded (and simplified), before minutes of it
        opened = open_components(parts, names)
        if opened:  # as prepare says: the VAE reads a closed surface's samples
            warn_input(f"{mesh.name}: open (not watertight) components {', '.join(opened)}: they may come back hollow or "
                       "ragged (the VAE learned closed surfaces)")
        dev = resolve_device(device)
        vae = load_vae(model, dev)
        check_points(points, vae)
        extract = vae_extract_config(resolution, progress=cli_progress() is True)  # a bar over field points: none in a log
        meshes = reconstruct_components(parts, names, vae, points, extract, label=mesh.name)
        empty_in = {name for name, part in zip(names, parts) if len(part.faces) == 0}
        if not any(len(m.faces) for m in meshes):
            raise InputError(f"{mesh}: no component decoded to a surface")
        builtin = model is None or model.resolve() == PACKAGED_VAE  # recorded by name, never by its install path
        settings = {"verb": "reconstruct", "model": "built-in reconstruction VAE" if builtin else str(model), "moca3d": __version__, "mesh": mesh.name,
                    "components": len(meshes), "resolution": resolution, "points": points, **({"faces": faces} if faces is not None else {})}
        meshes = simplify_components(meshes, faces)
        save_components(out, meshes, names, metadata=settings)
        empty = [f"{n} (empty in the input)" if n in empty_in else n for n, m in zip(names, meshes) if len(m.faces) == 0]
        note = f", {len(empty)} empty" if empty else ""
        typer.echo(f"wrote {out}: {len(meshes)} components ({sum(len(m.faces) for m in meshes):,} triangles{note})")
        if empty:
            typer.echo(f"warning: {len(empty)} of {len(meshes)} components have no surface, kept as empty: {', '.join(empty)}",
                       err=True)

    @app.command("encode-dataset")
    def encode_dataset_cmd(
        data_dir: Path = typer.Argument(..., help="Prepared dataset (manifest.jsonl + assets/)."),
        model: Optional[Path] = typer.Option(None, "--model", callback=shipped, help="VAE folder (config.json + safetensors; default: the packaged reconstruction VAE, src/moca3d/weights/vae)."),
        points: int = typer.Option(512, "--points", help="Surface points fed to the encoder per component."),
        batch_size: int = typer.Option(16, "--batch-size", help="Components encoded per forward pass."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Re-encode every asset, also replacing latents another VAE (or other --points / --num-latents / --token-order) made: refused without it, as a run trained on them could no longer resume."),
        device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
        token_order: str = typer.Option("fps", "--token-order", help="fps (farthest-point order, any transformer) or canonical (for a transformer with token_positions)."),
        num_latents: Optional[int] = typer.Option(None, "--num-latents", help="Latent tokens per component (default: the VAE's num_latents), e.g. 1024 for a fine-tune whose recipe sets the transformer's num_latents (configs/finetune_triposg_l1024.json); --points must be at least as many."),
    ) -> None:
        """Cache per-asset latents (posterior means) as assets/<id>/latents.safetensors (resumable)."""
        from moca3d.training.train_vae import encode_dataset

        if batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
        if num_latents is not None and num_latents < 1:
            raise ConfigError(f"--num-latents must be >= 1, got {num_latents}")
        check_max_points(points)
        folder = Path(model) if model is not None else PACKAGED_VAE
        vae = load_vae(folder, resolve_device(device))
        check_points(points, vae, num_latents)
        counts = encode_dataset(data_dir, vae, _weights_id(folder), points, batch_size, overwrite, progress=cli_progress(),
                                token_order=token_order, num_latents=num_latents)
        typer.echo(f"encoded {counts['encoded']} assets, skipped {counts['skipped']} already done")

    @app.command("cache-latents")
    def cache_latents_cmd(
        data_dir: Path = typer.Argument(..., help="Prepared dataset with cached latents (moca3d encode-dataset): objects, or scenes (every asset of the split a scene: cached with their instance masks, for a scene recipe)."),
        output: Path = typer.Option(..., "--output", "--out", "-o", help="The cache file to write (.safetensors)."),
        split: str = typer.Option("train", help="Split to cache: train, val, test or all (every split)."),
        image_size: int = typer.Option(128, "--image-size", help="The image encoder's input size (the recipe's image_encoder.image_size; a scene pipeline's: `moca3d info` shows it, 224 for a converted pipeline's DINOv2)."),
        max_parts: int = typer.Option(32, "--max-parts", help="Leave out assets with more parts."),
        instance_views: int = typer.Option(1, "--instance-views", help="Scenes: 2 also keeps the full-resolution renders and label maps, for a transformer with instance_views 2 (zoomed instance views)."),
    ) -> None:
        """Pack a split's latents and preprocessed renders into one file: `moca3d train CACHE` starts in seconds."""
        from moca3d.data.dataset import read_manifest
        from moca3d.data.scene import SceneLatentDataset
        from moca3d.data.images import MIN_IMAGE_SIDE
        from moca3d.training.train_dit import LatentDataset

        if not MIN_IMAGE_SIDE <= image_size <= MAX_IMAGE_SIZE:
            raise ConfigError(f"--image-size must be from {MIN_IMAGE_SIDE} to {MAX_IMAGE_SIZE} px (the image encoder's input size), got {image_size}")
        if max_parts < 1:
            raise ConfigError(f"--max-parts must be >= 1, got {max_parts}")
        check_output_path(output)
        records = read_manifest(data_dir, split)
        kinds = {r.get("kind") == "scene" for r in records}
        if len(kinds) > 1:
            raise InputError(f"{data_dir}: split '{split}' mixes scenes and objects; a cache holds one kind (prepare them apart)")
        scenes = kinds == {True}
        if instance_views != 1 and not scenes:
            raise InputError("--instance-views is for scene caches; objects have one view")
        option = ("--max-parts", "raise --max-parts to cache them")  # named when assets are left out: not the recipe's max_components
        if scenes:
            data = SceneLatentDataset(data_dir, split, image_size, max_parts, views=instance_views, parts_option=option)
        else:
            data = LatentDataset(data_dir, split, image_size, max_parts, parts_option=option)
        path = data.save_cache(output)
        noun = "scenes" if scenes else "assets"
        typer.echo(f"{path}: {len(data)} {noun}, {sum(z.shape[0] for z in data.latents)} parts, {image_size} px images")
