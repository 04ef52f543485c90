"""CLI verbs for instance-composed scenes (issue 7): `generate-scene`, `evaluate-scenes`, `train-scene`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moca3d.commands.common import (DEVICE_HELP, TRAIN_DEVICE_HELP, THREADS_HELP, DTYPE_HELP, EXPORT_ONLY_HELP, FACES_HELP, FRAME_HELP, SAVE_HELP, SEPARATE_HELP, apply_training_overrides,
                                    check_generation_args, check_output_path, check_separate, check_save_folder, echo_categories, echo_means, echo_missing,
                                    interruptible, check_init_from, keep_run_length, load_or_predictions, model_limit, plural, resolve_device, resume_recipe, run_dit_training, run_vae, shipped,
                                    save_generation, write_json)
from moca3d.defaults import DEFAULT_MODEL_DIR, DEFAULT_SCENE_MODEL_DIR, INSTANCE_MASKS, SCENE_GUIDANCE, STEPS, check_sampling_args, resolve_dtype
from moca3d.errors import ConfigError
from moca3d.geometry.simplify import check_faces
from moca3d.progress import cli_progress


SCENE_LORA_HELP = ("A scene LoRA adapter folder (OUT/lora of `moca3d train-scene --lora-rank`), folded into --model, the object "
                   "pipeline it was fine-tuned from (default: the built-in model); the same as OUT/pipeline in megabytes instead of "
                   "the whole model.")
SCENE_MODEL_HELP = ("Scene pipeline folder (trained with `train-scene`; default: the built-in scene model); with --lora, the object "
                    "pipeline the adapter was fine-tuned from (default: the built-in model).")


def scene_model(model: Optional[Path], lora: Optional[Path] = None) -> Optional[Path]:
    """The pipeline folder to load: `model`, or the built-in scene model; with a scene adapter `lora` (checked here, before
    any model loads), the object pipeline it was fine-tuned from: `model`, or None for the built-in model."""
    if lora is not None:
        from moca3d.models.lora import read_adapter_config

        read_adapter_config(lora, "scene")
        return model
    if model is not None:
        return model
    if not (DEFAULT_SCENE_MODEL_DIR / "model_index.json").is_file():
        raise ConfigError(f"no built-in scene model at {DEFAULT_SCENE_MODEL_DIR}: pass --model (a `train-scene` pipeline)")
    return DEFAULT_SCENE_MODEL_DIR


def register(app: typer.Typer) -> None:
    """Add the scene verbs to the CLI."""

    @app.command("generate-scene")
    def generate_scene(
        image: Path = typer.Argument(..., help="Scene image (PNG, JPG, WebP, BMP, GIF or TIFF)."),
        masks: Path = typer.Option(..., "--masks", "-m", help="Label map image, lossless (PNG, BMP, TIFF, lossless WebP; 8/16-bit or palette; 0 = background, every other id an instance, in increasing id order; resized only with nearest-neighbour: smoothed edges are refused), or a folder of binary masks (0/255, 0/1 or cut-outs whose alpha is the instance; JPEG is fine here; file-name order, mask_2 before mask_10; where masks overlap, the later file wins). At most the model's limit of instances (the built-in scene model: 50 ids, trained on up to 32: more are warned about)."),
        output: Path = typer.Option(Path("scene.glb"), "--output", "--out", "-o", help="Output .glb (one named node per instance, in its colour) or .obj (one object per instance, its colour material in a .mtl beside it)."),
        model: Optional[Path] = typer.Option(None, "--model", callback=shipped, help=SCENE_MODEL_HELP),
        lora: Optional[Path] = typer.Option(None, "--lora", help=SCENE_LORA_HELP),
        steps: int = typer.Option(STEPS, help="Sampling steps (Euler)."),
        guidance: float = typer.Option(SCENE_GUIDANCE, help="Classifier-free guidance scale (1 = off; scenes score best at low guidance: README)."),
        seed: int = typer.Option(0, help="Random seed: the same seed gives the same output."),
        shift: Optional[float] = typer.Option(None, help="Timestep shift of the sampler (>1: more steps at high noise; default: the model's scheduler)."),
        resolution: int = typer.Option(128, help="Marching-cubes grid resolution per instance (16, 32 or a multiple of 4 from 64 to 1024)."),
        faces: Optional[int] = typer.Option(None, "--faces", help=FACES_HELP),
        device: str = typer.Option("auto", help=DEVICE_HELP),
        dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
        separate: Optional[str] = typer.Option(None, "--separate", metavar="FORMAT", help=SEPARATE_HELP.format(noun="instance")),
    ) -> None:
        """Generate one mesh per instance mask of a scene IMAGE, placed as in the image, as a GLB (or OBJ) file."""
        import time

        with interruptible():
            from moca3d.data.scene import read_masks, tiny_masks_quiet, union_box, warn_exif_turn
            from moca3d.data.images import check_image, load_image

            check_generation_args(steps, resolution, guidance, output, seed, shift)
            separate = check_separate(separate, output)
            dev = resolve_device(device)
            torch_dtype = resolve_dtype(dtype, dev)
            folder = scene_model(model, lora)  # None: the built-in object model, the base of a --lora
            # the image and masks are read, and bad ones refused, before the (slow) model loading; the pipeline takes them read
            warn_exif_turn(image)  # the picture goes to the pipeline read: warned once, here
            picture = load_image(image)
            instances, sources = read_masks(masks, image_size=picture.size, max_instances=model_limit(folder or DEFAULT_MODEL_DIR))
            check_image(picture, box=union_box(instances))  # e.g. blank where the masks are
            check_faces(faces, len(instances))
            from moca3d.pipeline import MoCAPipeline  # slow to import (a second and more)

            t0 = time.time()
            pipe = MoCAPipeline.from_pretrained(folder, device=dev, lora=lora, torch_dtype=torch_dtype)
            with tiny_masks_quiet():  # warned of above, by their ids or file names
                result = pipe.generate_scene(picture, instances, steps=steps, guidance=guidance, seed=seed, shift=shift,
                                             resolution=resolution, faces=faces)
            result.settings.update(image=image.name, masks=masks.name, **{INSTANCE_MASKS: sources})  # as for paths given
            save_generation(result, output, "instance", t0, separate)

    @app.command("evaluate-scenes")
    def evaluate_scenes(
        data: Path = typer.Argument(..., help="Prepared scenes (moca3d prepare --procedural scenes)."),
        model: Optional[Path] = typer.Option(None, "--model", callback=shipped, help=SCENE_MODEL_HELP),
        lora: Optional[Path] = typer.Option(None, "--lora", help=SCENE_LORA_HELP),
        split: str = typer.Option("test", help="Split to evaluate: train, val, test or all."),
        count: Optional[int] = typer.Option(None, help="Evaluate only the first COUNT scenes of the split (those among them with an instance hidden in the render are skipped and listed)."),
        steps: int = typer.Option(STEPS, help="Sampling steps."),
        guidance: float = typer.Option(SCENE_GUIDANCE, help="Classifier-free guidance scale."),
        shift: Optional[float] = typer.Option(None, help="Timestep shift of the sampler (default: the model's scheduler)."),
        resolution: int = typer.Option(128, help="Marching-cubes resolution per instance (16, 32 or a multiple of 4 from 64 to 1024)."),
        min_instances: int = typer.Option(2, help="Skip scenes with fewer instances."),
        max_instances: int = typer.Option(32, help="Skip scenes with more instances."),
        seed: int = typer.Option(0, help="Sampling and metric seed."),
        metric_points: int = typer.Option(20000, help="Points sampled on each surface for CD / F-score."),
        device: str = typer.Option("auto", help=DEVICE_HELP),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Write mean, per-category, per-scene and per-instance metrics to this JSON file ('-': print it alone)."),
        reconstruct: bool = typer.Option(False, "--reconstruct", help="Score the VAE round trip of the GT instances instead of generations: the ceiling of any transformer on this VAE."),
        predictions: Optional[Path] = typer.Option(None, "--predictions", help="Score the meshes in this folder instead of generating (another method's outputs: <scene id>.glb, .obj or an <scene id>/ folder, instance i for mask i, or paired by name when it names the ground truth's instances in another order; in the prepared scene's frame); a scene without one scores as empty and is listed as missing."),
        frame: str = typer.Option("each", "--frame", help=FRAME_HELP + " Instance metrics always use each GT instance's own box."),
        save: Optional[Path] = typer.Option(None, "--save", help=SAVE_HELP),
    ) -> None:
        """Report scene-level and per-instance CD and F-score@0.1/0.05 and self-IoU over a prepared split."""
        from moca3d.evaluation import evaluate_scenes as run
        from moca3d.metrics import MetricsConfig, check_metric_settings
        if min_instances > max_instances:
            raise ConfigError(f"--min-instances {min_instances} is above --max-instances {max_instances}")
        check_sampling_args(steps, guidance, resolution, shift)
        check_output_path(json_out, "--json")
        check_metric_settings(metric_points, MetricsConfig.iou_resolution, points_name="--metric-points", frame=frame, frame_name="--frame")
        check_save_folder(save, predictions)
        pipe = load_or_predictions(scene_model(model, lora) if predictions is None else model, lora, reconstruct, predictions, device)
        result = run(pipe, data, split, count, steps, guidance, resolution, seed, min_instances, max_instances, metric_points,
                     reconstruct=reconstruct, shift=shift, predictions=predictions, progress=cli_progress(), frame=frame, save=save)
        if predictions is None:
            result["model"] = pipe.source["model"]  # the folder, "built-in scene", or "built-in" (a --lora's default base)
        if lora is not None:
            result["lora"] = str(lora)
        if write_json(json_out, result):
            return
        echo_means(result["mean"], 22, "scene", result.get("standard_error"))
        echo_categories(result["by_category"], "fscore@0.1", "instance")
        typer.echo(f"{plural(result['count'], 'scene')} of '{split}' with {min_instances}-{max_instances} instances; "
                   f"{len(result['skipped'])} skipped (hidden instances)")
        by_name = [row["id"] for row in result["scenes"] if row.get("paired_by_name")]
        if by_name:  # (the JSON says so per scene)
            typer.echo(f"{plural(len(by_name), 'prediction')} paired with the masks by instance name (listed in another "
                       f"order): {', '.join(by_name[:5])}{', ...' if len(by_name) > 5 else ''}")
        echo_missing(result)

    @app.command("train-scene")
    def train_scene(
        data: Path = typer.Argument(..., help="Prepared scenes with cached latents (moca3d prepare --procedural scenes + encode-dataset), or a scene cache file (moca3d cache-latents)."),
        output: Path = typer.Option(..., "--output", "--out", "-o", help="Run folder: checkpoints, logs, final pipeline/."),
        init_from: Optional[Path] = typer.Option(None, "--init-from", callback=shipped, help="Object pipeline folder to fine-tune (overrides the recipe's init_from)."),
        config: Optional[Path] = typer.Option(None, "--config", help="Scene recipe JSON (configs/dit_scene_*.json; default: a resumed run's own recipe)."),
        vae: Optional[Path] = typer.Option(None, "--vae", callback=shipped, help="VAE folder for the exported pipeline (default: a resumed run's own, else the init pipeline's)."),
        steps: Optional[int] = typer.Option(None, help="Override the recipe's step count (a resumed run keeps its own until given again)."),
        batch_size: Optional[int] = typer.Option(None, help="Override the global batch size."),
        device: str = typer.Option("auto", help=TRAIN_DEVICE_HELP),
        resume: bool = typer.Option(True, help="Continue from the newest checkpoint in the run folder."),
        export_only: bool = typer.Option(False, "--export-only", help=EXPORT_ONLY_HELP),
        attention_mode: Optional[str] = typer.Option(None, help="Override the global blocks: moc, dense (the dense-global baseline; a MoCA checkpoint's router weights are dropped) or none (local only)."),
        time_limit: Optional[float] = typer.Option(None, help="Stop after this many seconds of training, a resumed run counting its earlier ones (the LR schedule ends there; a resumed run keeps its own until given again), then export."),
        lora_rank: Optional[int] = typer.Option(None, "--lora-rank", help="Fine-tune the transformer through LoRA adapters of this rank (its layers frozen; MoCA's packer, routers and ID embedding in full; merged on export into OUT/pipeline, and OUT/lora holds the run's changes alone, the encoder's adapters and widened projection too, for generate-scene --lora), 0 in full; needs a pipeline to start from. Overrides the recipe's transformer_lora_rank."),
        threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    ) -> None:
        """Fine-tune an object pipeline on scenes: 7-channel per-instance conditions, LoRA on the encoder."""
        from moca3d.training.train_dit import DiTTrainConfig

        check_init_from(init_from)
        recipe, recorded = resume_recipe(DiTTrainConfig, config, output, "train_config.json", resume)
        recipe["condition"] = "scene"
        if init_from is not None:
            recipe["init_from"] = str(init_from)
        apply_training_overrides(recipe, steps, batch_size, attention_mode, time_limit, lora_rank, threads)
        keep_run_length(recipe, recorded, steps=steps, time_limit_s=time_limit)
        run_dit_training(data, output, recipe, run_vae(output, vae, resume, recipe.get("init_from")), device, resume, export_only)
