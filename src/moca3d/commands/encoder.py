"""`moca3d pretrain-encoder`: give the built-in image encoder a 3D prior before DiT training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from moca3d.commands.common import DEVICE_HELP


def register(app: typer.Typer) -> None:
    """Add `pretrain-encoder`."""

    @app.command("pretrain-encoder")
    def pretrain_encoder_cmd(
        data_dir: Path = typer.Argument(..., help="Prepared dataset (manifest.jsonl + assets/ with samples.npz): objects, or scenes with a scene recipe."),
        out_dir: Path = typer.Option(..., "--output", "--out", "-o", help="Run folder: checkpoints, log.jsonl, summary.json, image_encoder/."),
        config: Optional[Path] = typer.Option(None, "--config", help="JSON recipe (configs/encoder_pretrain.json; default: a resumed run's own recipe, else its values without its 20-minute limit and 1-thread setting)."),
        cache: Optional[Path] = typer.Option(None, "--cache", help="Read the renders from this latent cache (moca3d cache-latents) of DATA_DIR's train split (objects only)."),
        steps: Optional[int] = typer.Option(None, "--steps", help="Override the number of steps."),
        time_limit: Optional[float] = typer.Option(None, "--time-limit", help="Stop after this many seconds of training, a resumed run counting its earlier ones (the LR schedule ends there)."),
        device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    ) -> None:
        """Train the image encoder to predict each object's coarse 3D surface grid from its render (torchrun / accelerate launch: data-parallel over several processes).

        With a scene recipe (configs/encoder_pretrain_scene.json, "condition": "scene") each visible instance's 7-channel stack predicts that instance's grid in the scene frame, starting from an object encoder widened to 7 channels. The result, OUT/image_encoder, is what a DiT or scene recipe's `image_encoder_from` loads. Resumes from OUT's checkpoints, with the recipe it was started with (OUT/pretrain_config.json, used when --config is left out): only --steps, --time-limit (each kept until given again), num_threads, log_every and checkpoint_every may change; another recipe is refused.

        Under `torchrun --nproc_per_node K -m moca3d pretrain-encoder ...` (or `accelerate launch -m moca3d ...`) each process encodes batch_size / K of every batch (batch_size must be divisible by K), gradients are averaged, and the first process alone logs and writes. The batches do not depend on K: a run resumes under another process count as the same run.
        """
        from moca3d.commands.common import check_run_folder, keep_run_length, resolve_device, resume_recipe, training_stops
        from moca3d.training.pretrain_encoder import EncoderPretrainConfig, pretrain_encoder

        recipe, recorded = resume_recipe(EncoderPretrainConfig, config, out_dir, "pretrain_config.json")
        if steps is not None:
            recipe["steps"] = steps
        if time_limit is not None:
            recipe["time_limit_s"] = time_limit
        keep_run_length(recipe, recorded, steps=steps, time_limit_s=time_limit)
        cfg = EncoderPretrainConfig.from_dict(recipe)  # checked
        check_run_folder(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        log_path = out_dir / "log.jsonl"

        def log(record: dict) -> None:  # the first process's records alone (a multi-process launch's others log nothing)
            if record.get("event") == "resume":  # the steps logged after its checkpoint are run (and logged) again
                from moca3d.training.checkpoints import trim_log

                trim_log(log_path, record["step"])
            with open(log_path, "a") as log_file:
                log_file.write(json.dumps(record) + "\n")
            typer.echo(describe(record))

        with training_stops(out_dir):
            folder = pretrain_encoder(cfg, data_dir, out_dir, cache=cache, log=log, device=resolve_device(device))
        if folder is None:  # a further process of a multi-process launch: the first one reports
            return
        typer.echo(f"image encoder: {folder}")


def describe(record: dict) -> str:
    """One pretraining log record (log.jsonl keeps them whole) as the line the command prints."""
    rest = {k: v for k, v in record.items() if k not in ("event", "step", "elapsed_s", "path", "note", "finished")}
    pairs = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rest.items())
    event = record.get("event")
    if event == "building surface grids":
        return f"building the surface grids of {record['assets']} assets (once): {record['path']}"
    if event == "resume":
        return (f"resuming at step {record['step']}" + (f" ({record['note']})" if "note" in record else "")
                + (f": {record['finished']}" if "finished" in record else ""))
    if event == "done":
        return f"finished at step {record['step']} after {record['elapsed_s'] / 60:.1f} min of training" + (f": {pairs}" if pairs else "")
    if event is None and "step" in record:
        return f"step {record['step']}: {pairs}, {record['elapsed_s']:.0f} s"
    return " ".join(f"{k}={v}" for k, v in record.items())
