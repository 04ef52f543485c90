"""CLI verbs of the compositional generator: `generate` (image -> part meshes) and `train`."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import typer

from moca3d.commands.common import (DEVICE_HELP, TRAIN_DEVICE_HELP, THREADS_HELP, DTYPE_HELP, EXPORT_ONLY_HELP, FACES_HELP, FRAME_HELP, SAVE_HELP, SEPARATE_HELP, apply_training_overrides,
                                    check_generation_args, check_output_path, check_separate, check_save_folder, check_run_folder, echo_categories, echo_means,
                                    echo_missing, interruptible, check_init_from, keep_run_length, load_or_predictions, model_limit, plural, resolve_device,
                                    resume_recipe, run_dit_training, run_vae, save_generation, shipped, write_json)
from moca3d.defaults import DEFAULT_MODEL_DIR, GUIDANCE, STEPS, check_component_count, check_sampling_args, resolve_dtype
from moca3d.errors import ConfigError, InputError, InputWarning, warn_input
from moca3d.geometry.simplify import check_faces
from moca3d.progress import cli_progress

DEFAULT_OUTPUT = Path("output.glb")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # what PIL reads and `generate` takes


def image_files(folder: Path) -> list[Path]:
    """The images of a folder, by name (what else it holds is named on stderr, left out); InputError when it holds
    none, or two with one name (a.png and a.jpg)."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    files = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise InputError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the folder")
    chosen = set(files)
    others = [p.name + ("/" if p.is_dir() else "") for p in entries if p not in chosen]
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        typer.echo(f"left out, not images ({' '.join(IMAGE_EXTENSIONS)}): {shown}", err=True)
    stems = [p.stem for p in files]
    clash = next((s for s in stems if stems.count(s) > 1), None)
    if clash is not None:
        raise InputError(f"{folder}: two images are named '{clash}': each writes {clash}.glb; rename one")
    return files


LORA_HELP = ("A LoRA adapter folder (OUT/lora of `moca3d train --lora-rank`), folded into --model, the pipeline it was trained "
             "from; the same as OUT/pipeline in megabytes instead of the whole model.")


def object_lora(lora: Optional[Path]) -> Optional[Path]:
    """`lora`, checked to be an object adapter before any model loads (a scene adapter is refused with one line)."""
    if lora is not None:
        from moca3d.models.lora import read_adapter_config

        read_adapter_config(lora, "object")
    return lora


def register(app: typer.Typer) -> None:
    """Add the generation, evaluation and DiT-training verbs to the CLI."""
    register_evaluation(app)

    @app.command("generate")
    def generate(
        image: Path = typer.Argument(..., help="Input image (PNG, JPG, WebP, BMP, GIF (its first frame) or TIFF; alpha or white background), or a folder of them: one output each, the model loaded once."),
        parts: int = typer.Option(4, "--parts", "-n", help="Number of part meshes to generate (at most the model's limit: 50 for the built-in model, trained on up to 27: more are warned about; `moca3d info MODEL` shows a model's)."),
        output: Path = typer.Option(DEFAULT_OUTPUT, "--output", "--out", "-o", help="Output .glb (one named node per part, in its colour) or .obj (one object per part, its colour material in a .mtl beside it); for a folder of images, the folder of <image name>.glb files (default: outputs/<folder name>)."),
        model: Optional[Path] = typer.Option(None, "--model", callback=shipped, help="Pipeline folder (default: the built-in model)."),
        lora: Optional[Path] = typer.Option(None, "--lora", help=LORA_HELP),
        steps: int = typer.Option(STEPS, help="Sampling steps (Euler)."),
        guidance: float = typer.Option(GUIDANCE, help="Classifier-free guidance scale (1 = off)."),
        seed: int = typer.Option(0, help="Random seed: the same seed gives the same output."),
        shift: Optional[float] = typer.Option(None, help="Timestep shift of the sampler (>1: more steps at high noise; default: the model's scheduler)."),
        resolution: int = typer.Option(128, help="Marching-cubes grid resolution per part (16, 32 or a multiple of 4 from 64 to 1024)."),
        faces: Optional[int] = typer.Option(None, "--faces", help=FACES_HELP),
        device: str = typer.Option("auto", help=DEVICE_HELP),
        offload: bool = typer.Option(False, "--offload", help="Sequential CPU offload: weights stay in RAM, modules visit the GPU in turn."),
        dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
        separate: Optional[str] = typer.Option(None, "--separate", metavar="FORMAT", help=SEPARATE_HELP.format(noun="part")),
    ) -> None:
        """Generate PARTS part meshes from one IMAGE (or each image of a folder) and write them as a GLB (or OBJ) file."""
        import time

        written: list[Path] = []
        with interruptible(written):
            from moca3d.data.images import MAX_WORKING_SIDE, check_image, load_image

            images = image_files(image) if image.is_dir() else None
            if images is not None:  # one .glb per image in a folder
                output = Path("outputs") / image.name if output == DEFAULT_OUTPUT else output
                if output.suffix.lower() in (".glb", ".obj"):
                    raise ConfigError(f"with a folder of images, -o names the folder of their .glb files, not a file: got {output}")
                check_generation_args(steps, resolution, guidance, output / "x.glb", seed, shift)
                check_run_folder(output)
                separate = check_separate(separate, output / "x.glb")
            else:
                check_generation_args(steps, resolution, guidance, output, seed, shift)
                separate = check_separate(separate, output)
            check_component_count(parts, model_limit(model or DEFAULT_MODEL_DIR), option="--parts")  # the pipeline's check, before loading
            check_faces(faces, parts)
            dev = resolve_device(device)
            if offload and dev == "cpu":
                warn_input("--offload moves weights to a GPU module by module; on the CPU it changes nothing (is --device "
                           "cuda meant?)")
            torch_dtype = resolve_dtype(dtype, dev)
            adapter = object_lora(lora)
            # a bad image is refused before the (slow) model loading; a huge one decoded at a reduced scale (as the pipeline would)
            picture = load_image(image, MAX_WORKING_SIDE) if images is None else None
            if picture is not None:
                check_image(picture)  # e.g. blank: no foreground
            from moca3d.pipeline import MoCAPipeline  # slow to import (a second and more)

            t0 = time.time()
            pipe = MoCAPipeline.from_pretrained(model, device="cpu" if offload else dev, lora=adapter, torch_dtype=torch_dtype)
            if offload:
                pipe.enable_sequential_cpu_offload(dev)
            settings = dict(num_parts=parts, steps=steps, guidance=guidance, seed=seed, shift=shift, resolution=resolution, faces=faces)
            if images is None:
                result = pipe(picture, **settings)
                result.settings["image"] = image.name  # recorded as for an image given by its path
                written.append(save_generation(result, output, "part", t0, separate))
                return
            failed = []
            for path in images:  # a bad image is reported and skipped; the others are generated
                started = time.time()
                try:
                    with warnings.catch_warnings(record=True) as caught:  # Python shows a warning once per place: each
                        warnings.simplefilter("always", InputWarning)  # image's own, named, or the next ones would be lost
                        result = pipe(path, **settings)
                except InputError as err:
                    typer.echo(f"skipped {path.name}: {err}")
                    failed.append(path.name)
                    continue
                finally:
                    for message in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, InputWarning)):
                        warn_input(f"{path.name}: {message}")
                    for w in caught:  # any other warning as Python would have shown it
                        if not issubclass(w.category, InputWarning):
                            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
                written.append(save_generation(result, output / f"{path.stem}.glb", "part", started, separate))
            if failed:
                raise InputError(f"{len(failed)} of {len(images)} images could not be used (first: {failed[0]}); the others are in {output}")

    @app.command("train")
    def train(
        data: Path = typer.Argument(..., help="Prepared dataset with cached latents (moca3d prepare + encode-dataset), or a cache file (moca3d cache-latents)."),
        output: Path = typer.Option(..., "--output", "--out", "-o", help="Run folder: checkpoints, logs, final pipeline/."),
        config: Optional[Path] = typer.Option(None, "--config", help="Training recipe JSON (configs/dit_*.json; default: a resumed run's own recipe, else the DiTTrainConfig defaults, a small from-scratch transformer)."),
        vae: Optional[Path] = typer.Option(None, "--vae", callback=shipped, help="The VAE folder that encoded DATA's latents: they are trained at its latent scale and it is bundled into the exported pipeline. Required unless the recipe has init_from (then: that pipeline's VAE) or the run resumed recorded it (then: the run's own)."),
        init_from: Optional[Path] = typer.Option(None, "--init-from", callback=shipped, help="Pipeline folder to fine-tune, e.g. a converted TripoSG (overrides the recipe's init_from; its VAE is used unless --vae is given)."),
        steps: Optional[int] = typer.Option(None, help="Override the recipe's step count (a resumed run keeps its own until given again)."),
        batch_size: Optional[int] = typer.Option(None, help="Override the global batch size."),
        device: str = typer.Option("auto", help=TRAIN_DEVICE_HELP),
        resume: bool = typer.Option(True, help="Continue from the newest checkpoint in the run folder."),
        export_only: bool = typer.Option(False, "--export-only", help=EXPORT_ONLY_HELP),
        attention_mode: Optional[str] = typer.Option(None, help="Override the global blocks: moc, dense (PartCrafter-style baseline) or none (local only)."),
        time_limit: Optional[float] = typer.Option(None, help="Stop after this many seconds of training, a resumed run counting its earlier ones (the LR schedule ends there; a resumed run keeps its own until given again), then export."),
        lora_rank: Optional[int] = typer.Option(None, "--lora-rank", help="Fine-tune the transformer through LoRA adapters of this rank (its layers frozen; MoCA's packer, routers and ID embedding in full; merged on export into OUT/pipeline, and OUT/lora holds the adapter alone, for --lora); the image encoder then stays frozen unless the recipe sets freeze_image_encoder false; 0: in full. Needs a pipeline to start from. Overrides the recipe's transformer_lora_rank."),
        threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    ) -> None:
        """Train the MoCA transformer and image encoder with rectified flow (accelerate: CPU, GPU, multi-GPU)."""
        from moca3d.training.train_dit import DiTTrainConfig

        check_init_from(init_from)
        recipe, recorded = resume_recipe(DiTTrainConfig, config, output, "train_config.json", resume)
        if init_from is not None:
            recipe["init_from"] = str(init_from)
        apply_training_overrides(recipe, steps, batch_size, attention_mode, time_limit, lora_rank, threads)  # bad values first
        vae = run_vae(output, vae, resume, recipe.get("init_from"))
        if vae is None and not recipe.get("init_from"):
            raise ConfigError("train needs --vae (the VAE folder that encoded DATA's latents, e.g. runs/vae/vae) unless it starts from a pipeline (--init-from or the recipe's init_from)")
        keep_run_length(recipe, recorded, steps=steps, time_limit_s=time_limit)
        run_dit_training(data, output, recipe, vae, device, resume, export_only)


def register_evaluation(app: typer.Typer) -> None:
    """Add `evaluate-model`."""

    @app.command("evaluate-model")
    def evaluate_model(
        data: Path = typer.Argument(..., help="Prepared dataset (moca3d prepare)."),
        model: Optional[Path] = typer.Option(None, "--model", callback=shipped, help="Pipeline folder (default: the built-in model)."),
        lora: Optional[Path] = typer.Option(None, "--lora", help=LORA_HELP),
        split: str = typer.Option("test", help="Split to evaluate: train, val, test or all."),
        count: Optional[int] = typer.Option(None, help="Evaluate only the first COUNT assets."),
        steps: int = typer.Option(STEPS, help="Sampling steps."),
        guidance: float = typer.Option(GUIDANCE, help="Classifier-free guidance scale."),
        shift: Optional[float] = typer.Option(None, help="Timestep shift of the sampler (default: the model's scheduler)."),
        resolution: int = typer.Option(128, help="Marching-cubes resolution per part (16, 32 or a multiple of 4 from 64 to 1024)."),
        min_parts: int = typer.Option(1, help="Skip assets with fewer parts."),
        max_parts: int = typer.Option(32, help="Skip assets with more parts."),
        seed: int = typer.Option(0, help="Sampling and metric seed."),
        metric_points: int = typer.Option(20000, help="Points sampled on each surface for CD / F-score."),
        device: str = typer.Option("auto", help=DEVICE_HELP),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Write mean, per-category and per-asset metrics to this JSON file ('-': print it alone)."),
        reconstruct: bool = typer.Option(False, "--reconstruct", help="Score the VAE round trip of the GT parts instead of generations: the ceiling of any transformer on this VAE."),
        predictions: Optional[Path] = typer.Option(None, "--predictions", help="Score the meshes in this folder instead of generating (another method's outputs: <asset id>.glb, .obj or an <asset id>/ folder of parts; in any frame with --frame each, in the prepared asset's with gt); an asset without one scores as empty and is listed as missing."),
        frame: str = typer.Option("each", "--frame", help=FRAME_HELP),
        save: Optional[Path] = typer.Option(None, "--save", help=SAVE_HELP),
    ) -> None:
        """Generate every asset of a split from its render (or read --predictions) and report CD, F-score@0.1/0.05 and self-IoU."""
        from moca3d.evaluation import evaluate_pipeline, select_records
        from moca3d.metrics import MetricsConfig, check_metric_settings

        if min_parts > max_parts:
            raise ConfigError(f"--min-parts {min_parts} is above --max-parts {max_parts}")
        check_sampling_args(steps, guidance, resolution, shift)
        check_output_path(json_out, "--json")
        check_metric_settings(metric_points, MetricsConfig.iou_resolution, points_name="--metric-points", frame=frame, frame_name="--frame")
        check_save_folder(save, predictions)
        select_records(data, split, count, min_parts, max_parts)  # an empty split: refused before the model loads
        pipe = load_or_predictions(model, object_lora(lora) if predictions is None else lora, reconstruct, predictions, device)
        result = evaluate_pipeline(pipe, data, split, count, steps, guidance, resolution, seed, min_parts, max_parts, metric_points,
                                   reconstruct=reconstruct, shift=shift, predictions=predictions, progress=cli_progress(),
                                   frame=frame, save=save)
        if predictions is None:
            result["model"] = pipe.source["model"]  # the folder, or "built-in" (never the shipped model's install path)
        if lora is not None:
            result["lora"] = str(lora)
        if write_json(json_out, result):
            return
        echo_means(result["mean"], 12, "asset", result.get("standard_error"))
        echo_categories(result["by_category"], "fscore@0.1", "asset")
        empty = sum(row.get("num_empty", 0) for row in result["assets"])
        parts = empty + sum(row.get("num_pred", 0) for row in result["assets"])  # (num_pred: the non-empty ones)
        typer.echo(f"{plural(result['count'], 'asset')} of '{split}'; {empty} of {parts} predicted parts empty")
        echo_missing(result)
