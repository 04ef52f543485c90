"""Helpers shared by the CLI verbs (this module registers no verb)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import typer

from moca3d.defaults import check_part_files, check_sampling_args
from moca3d.errors import ConfigError, InputError, cannot_write
from moca3d.progress import cli_progress

DTYPE_HELP = ("auto (bf16 on a GPU that has it, else fp32), fp32, bf16 or fp16: the transformer's and image encoder's "
              "dtype (the VAE stays fp32); on a CPU keep fp32: bf16 matmuls there are far slower.")
FACES_HELP = ("Triangle budget of the whole output: the components share it in proportion to their size (a share of at least "
              "20 each) and are simplified by quadric decimation (fast-simplification), each to at most its share; at small "
              "shares a part's smallest islands are dropped; default: marching cubes' full meshes (thousands to tens of "
              "thousands of triangles per component).")
FRAME_HELP = ("The frame of the fused-surface metrics and self-IoU: each (prediction and ground truth each centred and "
              "scaled to their own box, largest side 2: blind to a prediction's position and scale, but one fragment far "
              "from the rest shrinks the rest), gt (the ground truth's normalisation applied to both: PartCrafter's, for a "
              "prediction in the ground truth's frame, as moca3d's own are) or none (both as given).")
SAVE_HELP = "Also write each generation to this folder as <id>.glb (read back by --predictions, e.g. to score it in another --frame)."
COMPONENTS_HELP = ("a mesh file (one per node or OBJ `o` object; a generation's empty ones stay in place) or a folder "
                   "(one per mesh file; a folder of a single file: that file's components)")  # mesh_io.read_components


def plural(count: int, noun: str) -> str:
    """`count` and `noun` (singular), an s added but for one: '1 step', '2 steps'."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def resolve_device(name: str) -> str:
    """'auto' -> cuda when available, else cpu; other names are checked (one-line ConfigError), for the CLI and the pipeline."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' requested but MPS (Apple GPU) is not available")
    if name != "cpu" and not name.startswith("cuda") and name != "mps":
        raise ConfigError(f"unknown device '{name}' (use auto, cpu, cuda, cuda:N or mps)")
    return name


def _check_parents(path: Path, option: str) -> None:
    """The nearest existing ancestor of `path` is a folder we may write in (missing ones are created)."""
    folder = next(p for p in path.absolute().parents if p.exists())
    if not folder.is_dir():
        raise ConfigError(f"{option} {path}: {folder} is a file, not a folder")
    _check_writable(folder, path, option)


def _check_writable(folder: Path, path: Path, option: str) -> None:
    """ConfigError unless a file can be made in `folder` (for `option` `path`)."""
    try:  # a trial file: permissions, a read-only or virtual file system (/sys, /proc) all show here, not after the work
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".moca3d-write-test-"):
            pass
    except OSError as err:
        raise ConfigError(f"{option} {path}: cannot write in {folder} ({err.strerror or err})") from None


def check_output_path(path: Optional[Path], option: str = "--output") -> None:
    """`path` can become a file: it is no folder and no parent of it is a file (None and '-' pass; one-line ConfigError)."""
    if path is None or str(path) == "-":
        return
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder: give a file path")
    _check_parents(path, option)


def check_save_folder(save: Optional[Path], predictions: Optional[Path]) -> None:
    """An evaluation's --save: a folder (or none yet), and not beside --predictions (nothing is generated then)."""
    if save is None:
        return
    if predictions is not None:
        raise ConfigError("--save writes generations, and --predictions scores read ones: give one of them")
    check_run_folder(save, "--save")


def check_run_folder(path: Path, option: str = "--output") -> None:
    """`path` can be (or become) a folder: it is no file and no parent of it is a file (one-line ConfigError)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path} is a file, not a folder")
    if not path.exists():
        _check_parents(path, option)
    else:  # e.g. a read-only mount: found before the data and the model load
        _check_writable(path, path, option)


def check_generation_args(steps: int, resolution: int, guidance: float, output: Path, seed: int = 0,
                          shift: Optional[float] = None) -> None:
    """The generation verbs' option checks, before any model is loaded: one-line ConfigErrors."""
    check_sampling_args(steps, guidance, resolution, shift, seed=seed)
    from moca3d.geometry.mesh_io import MESH_FORMATS, mtl_path, mtl_target

    check_output_path(output)  # first: an existing folder is named as one
    if output.suffix.lower() not in MESH_FORMATS:
        raise ConfigError(f"--output must be a .glb file (one named node per component) or .obj (one object each), got {output}")
    if output.suffix.lower() == ".obj":  # its materials go beside it, replacing only a .mtl moca3d wrote
        if mtl_path(output).is_dir():
            raise ConfigError(f"--output {output}: its materials go to {mtl_path(output)}, which is a folder")
        mtl_target(output)  # someone else's material file: refused before the generation, not after


def model_limit(folder: Path) -> Optional[int]:
    """Pipeline `folder`'s component limit from its transformer/config.json, no weights loaded; None if unreadable there."""
    try:
        limit = json.loads((Path(folder) / "transformer" / "config.json").read_text()).get("id_codebook_size")
    except (OSError, ValueError, AttributeError):  # missing or unreadable file, bad JSON, not a JSON object
        return None
    return limit if isinstance(limit, int) and not isinstance(limit, bool) else None


@contextmanager
def interruptible(written: Optional[list] = None) -> Iterator[None]:
    """Ctrl+C inside ends the verb with one line on stderr, saying what was `written` by then, and exit code 130."""
    try:
        yield
    except KeyboardInterrupt:
        done = f"{len(written)} written, the last {written[-1]}" if written else "nothing written"
        typer.echo(f"interrupted: {done}", err=True)
        raise typer.Exit(130) from None


SEPARATE_HELP = ("Also write each {noun} as its own file of this format (glb, obj, ply or stl) into OUTPUT's name + "
                 "_parts/ beside it (chair.glb: chair_parts/{noun}_00.glb, ...), in its place and colour in the whole; "
                 "empty {noun}s get no file; an earlier output's {noun} files there are removed.")


def separate_folder(output: Path) -> Path:
    """Where `--separate` writes a generation's one-file-per-component copy: beside OUTPUT, its name + _parts."""
    return output.with_name(f"{output.stem}_parts")


def check_separate(separate: Optional[str], output: Path) -> Optional[str]:
    """--separate's format, lower case, checked before a model loads (`check_part_files`: an InputError naming the
    formats, or the file in the way of its folder); None when not asked."""
    return None if separate is None else check_part_files(separate, separate_folder(output), "--separate writes")


def save_generation(result, output: Path, noun: str, started: float, separate: Optional[str] = None) -> Path:
    """Write a generation's GLB or OBJ and print one line: path, component count (of `noun`, singular), empty ones,
    triangles, time; with `separate` (a format), also each component's own file (`separate_folder`), one line more."""
    path = result.save(output)
    empty = sum(1 for m in result.meshes if len(m.faces) == 0)
    note = f", {empty} empty" if empty else ""
    triangles = sum(len(m.faces) for m in result.meshes)
    typer.echo(f"wrote {path}: {plural(len(result.meshes), noun)} ({triangles:,} triangles{note}) in {time.time() - started:.1f} s")
    if separate is not None:
        files = result.save_parts(separate_folder(output), ext=separate)
        typer.echo(f"wrote {plural(len(files), f'{noun} file')} to {separate_folder(output)}/")
    return path


def write_json(path: Optional[Path], obj: Any) -> bool:
    """Write `obj` as indented JSON to `path` atomically (checked as --json first; parents created), or print it for '-' (then True)."""
    from moca3d.training.checkpoints import atomic_write_json, finite_json

    check_output_path(path, "--json")
    if path is not None and str(path) == "-":  # standard JSON, as the file's: an empty prediction's inf chamfer is null
        typer.echo(json.dumps(finite_json(obj), indent=2, allow_nan=False))
        return True
    if path is not None:
        try:
            atomic_write_json(obj, path, sort_keys=False)
        except OSError as err:
            raise cannot_write(path, err) from None
    return False


def echo_means(mean: dict[str, Optional[float]], width: int, per: str = "item",
               errors: Optional[dict[str, Optional[float]]] = None) -> None:
    """The `mean` of an evaluation report, one key a line (no value: "-"; seconds as seconds per `per`, e.g. scene;
    ± its standard error where `errors` has one), then how many predictions were all empty."""
    labels = {key: f"seconds per {per}" if key == "seconds" else key for key in mean if key != "all_empty"}
    width = max([width, *map(len, labels.values())])
    errors = errors or {}
    for key, label in labels.items():
        value = mean[key]
        text = "-" if value is None else f"{value:.2f}" if key == "seconds" else f"{value:.4f}"
        if value is not None and errors.get(key) is not None:
            text += f" ± {errors[key]:.4f}"
        typer.echo(f"{label:>{width}}: {text}")
    if errors and any(v is not None for v in errors.values()):
        typer.echo(f"{'':>{width}}  (± the standard error of the mean over the {per}s)")
    if mean.get("all_empty"):
        typer.echo(f"{mean['all_empty']} with every component empty: scored F = 0, left out of the mean chamfer")


def echo_categories(by_category: dict[str, dict[str, float]], key: str, what: str) -> None:
    """One line per category of an evaluation report: its count (of `what`, singular) and mean `key`, lowest first."""
    if not by_category:
        return
    typer.echo(f"{key} by category ({what}s):")
    for cat, summary in sorted(by_category.items(), key=lambda item: item[1][key]):
        empty = f", {summary['empty']:.0%} empty" if "empty" in summary else ""
        typer.echo(f"{cat:>22}: {summary[key]:.4f}  ({plural(summary['count'], what)}{empty})")


EXPORT_ONLY_HELP = ("Write OUTPUT/pipeline from the newest checkpoint (its EMA weights) and train nothing: try a "
                    "long run part-way; run the same command without it to train on (the end overwrites that pipeline).")


DEVICE_HELP = "auto (cuda when available), cpu, cuda, cuda:N or mps."
TRAIN_DEVICE_HELP = "auto (cuda when available), cpu or cuda (another GPU: CUDA_VISIBLE_DEVICES; several: accelerate launch)."
THREADS_HELP = "torch CPU threads (the recipe's num_threads; 0: torch's default); may change when a run resumes."


def apply_threads(recipe: dict, threads: Optional[int]) -> None:
    """--threads into a training recipe's num_threads (checked), when given."""
    if threads is not None:
        if threads < 0:
            raise ConfigError(f"--threads must be >= 0 (0: torch's default), got {threads}")
        recipe["num_threads"] = threads


def apply_training_overrides(recipe: dict, steps: Optional[int], batch_size: Optional[int], attention_mode: Optional[str],
                             time_limit: Optional[float], lora_rank: Optional[int] = None, threads: Optional[int] = None) -> dict:
    """Apply the command-line overrides of `train` / `train-scene` to a recipe dict (checked)."""
    from moca3d.attention.config import MODES

    apply_threads(recipe, threads)
    if steps is not None:
        recipe["steps"] = steps
    if batch_size is not None:
        recipe["batch_size"] = batch_size
    if attention_mode is not None:
        if attention_mode not in MODES:
            raise ConfigError(f"--attention-mode must be one of {', '.join(MODES)}, got {attention_mode!r}")
        recipe["transformer"] = {**recipe.get("transformer", {}), "attention_mode": attention_mode}
    if time_limit is not None:
        recipe["time_limit_s"] = time_limit
    if lora_rank is not None:
        recipe["transformer_lora_rank"] = lora_rank
    return recipe


RUN_LENGTH_FLAGS = {"steps": "--steps", "time_limit_s": "--time-limit"}  # recipe keys a resumed run keeps unless given


def first_process() -> bool:
    """Whether this is the first process of a launch (torchrun, accelerate launch: RANK 0), or the only one: the one
    that speaks for all (each would say the same line)."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


def say_once(message: str) -> None:
    """Echo `message` from the first process alone of a launch, or from this one."""
    if first_process():
        typer.echo(message)


def resume_recipe(recipe_class: type, config: Optional[Path], output: Path, record_name: str,
                  resume: bool = True) -> tuple[dict, Optional[dict]]:
    """A training verb's starting recipe, JSON-ready: --config's (checked by `recipe_class`); or, resuming a run (OUTPUT
    holds the recipe it recorded, `record_name`: also one cut before its first checkpoint) without --config, the run's
    own (`recorded_recipe`: its relative paths as they were meant); {} (the recipe class's defaults) otherwise. And the
    run's recorded recipe when it resumes (holds checkpoints), else None."""
    from moca3d.training.checkpoints import list_checkpoints  # (the trainer warns of a damaged newest one)

    record = None
    if resume and (output / record_name).is_file():
        try:
            record = json.loads((output / record_name).read_text())
        except (OSError, ValueError):
            record = None  # the trainer names the damaged file
    record = record if isinstance(record, dict) else None
    recorded = record if record is not None and list_checkpoints(output) else None  # the run resumes
    if config is not None:
        return recipe_class.from_json(config).to_dict(), recorded
    if record is None:
        return {}, None
    from moca3d.training.recipe import recorded_recipe

    say_once(f"recipe: {output / record_name} (the run's own)")  # also a run cut before its first checkpoint
    return recorded_recipe(output / record_name, record), recorded


def shipped(path: Optional[Path]) -> Optional[Path]:
    """A model path option as the README writes it, "src/moca3d/weights/...": the installed package's copy when the
    path is not there from the current folder (moca3d installed from a wheel, or run outside the repository)."""
    from moca3d.defaults import shipped_path

    return None if path is None else shipped_path(path)


def run_vae(output: Path, vae: Optional[Path], resume: bool = True, init_from: Optional[str] = None) -> Optional[Path]:
    """`vae` (--vae) when given; else, resuming the run in OUTPUT, the VAE folder its newest checkpoint records (said);
    else None. A recorded folder that is gone is a one-line ConfigError (the run needs that VAE: its latent scale),
    unless the run starts from a pipeline (`init_from`, perhaps moved with the run): None, its VAE then."""
    from moca3d.training.checkpoints import checkpoint_extra, latest_checkpoint

    ckpt = latest_checkpoint(output) if vae is None and resume else None
    if ckpt is None:
        return vae
    recorded = checkpoint_extra(ckpt).get("vae_dir")  # (the trainer names a damaged checkpoint)
    if not recorded:  # a checkpoint from before the record, or a run without a VAE
        return None
    if not Path(recorded).is_dir():
        if init_from:  # the trainer takes the pipeline's VAE and checks it is the run's
            return None
        raise ConfigError(f"{output} was trained with the VAE {recorded}, which is gone: resume with --vae (that VAE, "
                          "moved), or train into a new output folder")
    say_once(f"vae: {recorded} (the run's own)")
    return Path(recorded)


def check_init_from(init_from: Optional[Path]) -> None:
    """--init-from names a folder that exists (from here): one line, before a resume could call another path a recipe change."""
    if init_from is not None and not init_from.expanduser().is_dir():
        raise ConfigError(f"--init-from {init_from}: no such folder (from {Path.cwd()})")


def keep_run_length(recipe: dict, recorded: Optional[dict], **given: Any) -> None:
    """A resumed run keeps its recorded steps and time limit unless the command line gives them again (`given`: the
    flags' values by recipe key, None when not given): a requeued command that leaves out --time-limit would otherwise
    drop the limit and restart the LR schedule's tail over all its steps."""
    for key, flag in RUN_LENGTH_FLAGS.items():
        if recorded is None or given.get(key) is not None or key not in recorded or recipe.get(key) == recorded[key]:
            continue
        say_once(f"keeping the run's {key} {recorded[key]} (the recipe's is {recipe.get(key)}; {flag} changes it)")
        recipe[key] = recorded[key]


@contextmanager
def training_stops(output: Path) -> Iterator[None]:
    """A training verb stopped by SIGTERM or Ctrl+C: one line on stderr, exit code 128 + the signal (143, 130)."""
    from moca3d.training.stop import TrainingStopped

    try:
        yield
    except TrainingStopped as stop:  # the step's checkpoint is written
        if first_process():
            typer.echo(f"interrupted: {stop}", err=True)
        raise typer.Exit(128 + int(stop.signum)) from None
    except KeyboardInterrupt:  # a second Ctrl+C: at once
        if first_process():
            typer.echo(f"interrupted: {output}'s newest checkpoint is the last one written; the same command resumes", err=True)
        raise typer.Exit(130) from None


def run_dit_training(data: Path, output: Path, recipe: dict, vae: Optional[Path], device: str, resume: bool,
                     export_only: bool = False) -> None:
    """Build the recipe (overrides already applied), train (or only export), and print the outcome."""
    from moca3d.training.train_dit import DiTTrainConfig, train

    check_run_folder(output)
    with training_stops(output):
        result = train(data, output, DiTTrainConfig.from_dict(recipe), vae_dir=vae, device=device, resume=resume,
                       export_only=export_only, progress=cli_progress(sys.stdout))  # rich's bar on stdout, else lines
    if result.get("writer") is False:  # a further process of a multi-process launch: the first one reports
        return
    if result["trained_steps"]:
        typer.echo(f"trained {plural(result['trained_steps'], 'step')} (to step {result['steps']}) in {result['seconds']:.0f} s; "
                   f"final loss {result['final_loss']:.4f}")
    else:
        typer.echo(f"trained nothing: the run is at step {result['steps']}")
    if "pipeline" in result:
        typer.echo(f"pipeline: {result['pipeline']}")


def load_or_predictions(model: Optional[Path], lora: Optional[Path], reconstruct: bool, predictions: Optional[Path], device: str):
    """The evaluation verbs' pipeline (`model`, the built-in one when None), or None when they score --predictions
    (then a --model, --lora or --reconstruct would go unused: one-line ConfigError)."""
    if predictions is None:
        from moca3d.pipeline import MoCAPipeline  # slow to import (seconds)

        return MoCAPipeline.from_pretrained(model, device=resolve_device(device), lora=lora)
    given = [name for name, value in (("--model", model), ("--lora", lora), ("--reconstruct", reconstruct or None)) if value is not None]
    if given:
        raise ConfigError(f"--predictions scores existing meshes: {', '.join(given)} would not be used")
    if not predictions.is_dir():
        raise InputError(f"--predictions {predictions}: no such folder")
    return None


def echo_missing(result: dict) -> None:
    """Say how many assets of a --predictions evaluation had none, and how many had one that could not be read."""
    if result.get("missing"):
        typer.echo(f"{len(result['missing'])} without a prediction (scored as empty), e.g. {result['missing'][0]}")
    if result.get("unusable"):
        first = result["unusable"][0]
        typer.echo(f"{len(result['unusable'])} with an unreadable prediction (scored as empty), e.g. {first['path']}: {first['reason']}")
