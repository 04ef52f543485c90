"""`moca3d info`: what a pipeline, LoRA adapter or model (e.g. VAE) folder holds, read from its configs and weight headers,
how a generated GLB / OBJ (or folder of part files) was made (the settings `MoCAOutput.save` and `reconstruct` write into
it), where a training run (or one of its checkpoints) stands and what it exported, or what a prepared dataset holds."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Optional

import typer

from moca3d.commands.common import plural, shipped
from moca3d.defaults import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, DEFAULT_MODEL_DIR, INSTANCE_MASKS, MESH_EXTENSIONS, TRAINED_KEY,
                             TRIMESH_GENERATOR)
from moca3d.errors import CheckpointError, InputError

DTYPE_NAMES = {"F32": "fp32", "F16": "fp16", "BF16": "bf16", "F64": "fp64"}
TASKS = {"object": "objects (one image)", "scene": "scenes (image + instance masks)"}  # what a pipeline (or adapter) generates
# what a glance needs of each component's config
SHOWN = {
    "transformer": ("width", "num_layers", "num_heads", "attention_mode", "global_blocks", "topk_ratio", "topk", "compression",
                    "num_latents", "in_channels", "id_codebook_size", "layout_features", "instance_views"),
    "image_encoder": ("in_channels", "image_size", "patch_size", "width", "num_layers"),
    "vae": ("num_latents", "latent_channels", "width_encoder", "width_decoder", "num_layers_decoder", "truncation"),
}
COMPONENT_CLASSES = {"MoCATransformer": "transformer", "ImageEncoder": "image_encoder", "VecSetVAE": "vae"}  # a model folder's role
MODEL_KINDS = {"transformer": "transformer", "image_encoder": "image encoder", "vae": "VAE"}
USED_BY = {"vae": "moca3d reconstruct / eval-vae / encode-dataset --model"}  # the verbs a lone model folder is given to
# a release's DiT class (transformer/config.json) -> its name; the `moca3d convert` verb is that name in lower case
RELEASE_TRANSFORMERS = {"TripoSGDiTModel": "TripoSG", "PartCrafterDiTModel": "PartCrafter"}
RUN_RECIPES = ("train_config.json", "pretrain_config.json")  # the recipe a training run records in its folder
RUN_LOGS = ("train_log.jsonl", "log.jsonl")  # train / train-scene's log, train-vae's
RUN_EXPORTS = {"pipeline": "pipeline", "lora": "LoRA adapter", "vae": "VAE", "image_encoder": "image encoder"}  # written at its end
EXPORT_MARKS = {"pipeline": "model_index.json", "lora": ADAPTER_CONFIG}  # written last: present, the folder is whole


def export_complete(folder: Path, name: str) -> bool:
    """Whether a run's export folder `name` was written whole (a kill during the export leaves it without its mark)."""
    mark = EXPORT_MARKS.get(name, "config.json")
    return (folder / mark).is_file() and (name not in ("vae", "image_encoder") or any(folder.glob("*.safetensors")))


def tensor_headers(folder: Path) -> dict[str, tuple[str, int]]:
    """{name: (dtype, element count)} of every tensor in a folder's .safetensors files, from their headers only."""
    from safetensors import SafetensorError, safe_open

    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="np") as fh:  # the header only (no torch import, no tensor read)
                for name in fh.keys():
                    entry = fh.get_slice(name)
                    tensors[name] = (entry.get_dtype(), math.prod(entry.get_shape()))
        except (OSError, SafetensorError) as err:
            raise CheckpointError(f"{path}: unreadable safetensors header ({err})") from None
    return tensors


def weights_summary(folder: Path) -> dict:
    """Parameter count, dtypes and bytes on disk of a component folder."""
    tensors = tensor_headers(folder)
    dtypes = sorted({DTYPE_NAMES.get(dtype, dtype.lower()) for dtype, _ in tensors.values()})
    return {"parameters": sum(count for _, count in tensors.values()), "dtypes": dtypes,
            "bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors"))}


def read_json(path: Path) -> dict:
    """A config file, CheckpointError when it is missing or not a JSON object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable config ({err})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return value


def generation_record(path: Path) -> dict:
    """A generated file's components as every reader names them (`read_components`) and which are empty, the settings
    it was made with (empty when it has none) and the program that wrote a glTF file."""
    from moca3d.geometry.mesh_io import METADATA_KEY, gltf_document, read_components

    suffix = path.suffix.lower()
    settings, generator = {}, None  # formats moca3d does not write (STL, PLY, OFF) hold no record
    try:
        if suffix == ".obj":
            with open(path, encoding="utf-8", errors="replace") as fh:
                first = fh.readline()
            tag = f"# {METADATA_KEY}: "
            settings = json.loads(first[len(tag):]) if first.startswith(tag) else {}
            generator = None
        elif suffix in (".glb", ".gltf"):
            doc = gltf_document(path)
            scenes = doc.get("scenes") or [{}]
            settings = (scenes[0].get("extras") or {}).get(METADATA_KEY, {})
            generator = (doc.get("asset") or {}).get("generator")
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable {suffix[1:].upper()} file ({err})") from None
    meshes, names = read_components(path)
    kind = "generated file" if settings else "mesh file"  # one without moca3d's record: another tool's, or a plain save
    return {"kind": kind, "path": str(path), "components": names,
            "empty": [name for name, mesh in zip(names, meshes) if len(mesh.faces) == 0], "settings": settings, "generator": generator}


def folder_record(path: Path) -> dict:
    """A folder of mesh files. One of parts (`MoCAOutput.save_parts`, a folder asset: each file one component, as
    every reader takes them) gives its components and how they were made (each generated part file carries its
    output's record); a folder holding one file, that file's (`component_source`); any other (whole objects, several
    generations: files of several components or other records) lists its files with their component counts.
    Unreadable files are listed, not fatal."""
    from moca3d.geometry.mesh_io import part_files

    files = part_files(path)
    if len(files) == 1:  # read as that file, as every reader reads such a folder
        return generation_record(files[0])
    records, unreadable = {}, []
    for f in files:
        try:
            records[f] = generation_record(f)
        except (InputError, CheckpointError) as err:
            unreadable.append(f"{f.name} ({err})")
    readable = list(records)
    made = [r["settings"] for r in records.values()]
    parts = readable and all(len(r["components"]) == 1 for r in records.values()) and all(m == made[0] for m in made)
    report = {"path": str(path), "unreadable": unreadable}
    if parts:
        return {"kind": "folder of generated parts" if made[0] else "folder of part files", **report,
                "components": [f.stem for f in readable], "empty": [f.stem for f in readable if records[f]["empty"]],
                "settings": made[0], "generator": records[readable[0]]["generator"]}
    return {"kind": "folder of mesh files", **report,
            "files": {f.name: len(records[f]["components"]) for f in readable}}


LATENT_RECORD = ("model", "encoder", "num_latents", "num_points", "token_order")  # how encode-dataset made an asset's latents


def dataset_report(path: Path) -> dict:
    """A prepared dataset (`moca3d prepare`: manifest.jsonl, assets/): its assets by split, kind and category, their
    component counts, and which of them hold cached latents made how (read from the files' headers)."""
    from safetensors import SafetensorError, safe_open

    records, bad = [], 0
    for line in (path / "manifest.jsonl").read_text(errors="replace").splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except ValueError:
            record = None
        if isinstance(record, dict) and {"id", "split", "num_components"} <= record.keys():
            records.append(record)
        elif line.strip():
            bad += 1
    counts = sorted(int(r["num_components"]) for r in records)
    latents, missing = Counter(), 0
    for r in records:
        file = path / "assets" / str(r["id"]) / "latents.safetensors"
        try:
            with safe_open(str(file), framework="np") as fh:
                meta = fh.metadata() or {}
        except (OSError, SafetensorError):  # none yet (encode-dataset not run, or cut off) or unreadable
            missing += 1
            continue
        latents[json.dumps({k: meta.get(k, "fps" if k == "token_order" else None) for k in LATENT_RECORD})] += 1

    def tally(key: str) -> dict:  # value -> count, most common first (then by name)
        return dict(sorted(Counter(str(r.get(key)) for r in records).items(), key=lambda kv: (-kv[1], kv[0])))

    splits = tally("split")
    try:  # how its splits were drawn: prepare's recorded settings
        settings = json.loads((path / "prepare.json").read_text())
    except (OSError, ValueError):
        settings = {}
    settings = settings if isinstance(settings, dict) else {}
    drawn = "from a split list (prepare --splits)" if settings.get("split_list") else \
        f"by id hash (val {settings.get('val_fraction', '?')}, test {settings.get('test_fraction', '?')})" if settings else None
    return {"kind": "prepared dataset", "path": str(path), "assets": len(records), "unreadable_lines": bad, "splits_drawn": drawn,
            "splits": {split: splits[split] for split in ("train", "val", "test") if split in splits},
            "kinds": tally("kind"), "categories": tally("category"),
            "components": {"min": counts[0], "median": counts[len(counts) // 2], "max": counts[-1]} if counts else None,
            "latents": [{**json.loads(how), "assets": n} for how, n in latents.most_common()],
            "without_latents": missing}


def component_entry(folder: Path, name: str) -> dict:
    """A model folder's class, config essentials (`SHOWN[name]`) and weights summary."""
    config = read_json(folder / "config.json")
    entry = {"class": config.get("_class_name", "?"),
             **{k: config[k] for k in SHOWN[name] if k in config and not (k == "topk" and config[k] is None)}}  # unset: the ratio
    if name == "image_encoder" and config.get("model_type") == "dinov2":  # a converted release's DINOv2
        from moca3d.models.dino import CROP_SIZE

        entry.update({"class": "DINOv2", "width": config.get("hidden_size"), "num_layers": config.get("num_hidden_layers"),
                      "in_channels": config.get("num_channels", 3), "image_size": CROP_SIZE})  # the pixels it is given
    return {**entry, **weights_summary(folder)}


def release_name(path: Path) -> Optional[str]:
    """'TripoSG' or 'PartCrafter' for a folder as those projects release it (`moca3d convert`'s SRC: their DiT in
    transformer/, DINOv2 in the folder model_index.json names for a Dinov2Model, e.g. image_encoder_dinov2/), else None."""
    def config(name: str) -> dict:
        try:
            value = json.loads((path / name).read_text())
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    dit = config("transformer/config.json")
    kind = dit.get("_class_name")
    dino = any(isinstance(v, list) and v[-1:] == ["Dinov2Model"] and k != "image_encoder"  # convert.triposg.DINO_CLASS
               for k, v in config("model_index.json").items())
    if kind not in RELEASE_TRANSFORMERS and not (dino and kind not in (None, "MoCATransformer")):  # not of that family
        return None
    return RELEASE_TRANSFORMERS.get(kind) or ("PartCrafter" if "max_num_parts" in dit else "TripoSG")


def last_logged(run: Path) -> Optional[dict]:
    """The last record with a loss in a run's log (`RUN_LOGS`), None without one (a line cut by a kill is passed over)."""
    for name in RUN_LOGS:
        if not (run / name).is_file():
            continue
        for line in reversed((run / name).read_text(errors="replace").splitlines()):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("loss"), (int, float)):
                return record
    return None


def run_report(path: Path) -> Optional[dict]:
    """A training run folder (`train`, `train-scene`, `train-vae`, `pretrain-encoder`: a recorded recipe or checkpoints/):
    the step of its newest checkpoint, the recipe's start and target, the last logged loss, the model folders it
    exported; for one of its checkpoints (checkpoints/step_XXXXXXXX), that step and its run's report; else None."""
    from moca3d.training.checkpoints import CHECKPOINT_DIR, STEP_PATTERN, checkpoint_extra, latest_checkpoint

    path = path.absolute()  # `info .` inside a checkpoint, `info step_00000005` inside checkpoints/
    checkpoint = STEP_PATTERN.match(path.name) if path.parent.name == CHECKPOINT_DIR else None
    if checkpoint:
        return {"kind": "training checkpoint", "path": str(path), "step": int(checkpoint.group(1)), "run": run_report(path.parent.parent)}
    recipes = [path / name for name in RUN_RECIPES if (path / name).is_file()]
    if not recipes and not (path / CHECKPOINT_DIR).is_dir():
        return None
    recipe = read_json(recipes[0]) if recipes else {}
    newest = latest_checkpoint(path)
    try:  # the run's training seconds at that checkpoint, what a time limit counts
        elapsed = float(checkpoint_extra(newest)["elapsed_s"]) if newest else None
    except (KeyError, TypeError, ValueError):
        elapsed = None
    report = {"kind": "training run", "path": str(path), "step": int(STEP_PATTERN.match(newest.name).group(1)) if newest else None,
              "steps": recipe.get("steps"), "time_limit_s": recipe.get("time_limit_s") or None, "elapsed_s": elapsed,
              "init_from": recipe.get("init_from"), "last_logged": last_logged(path),
              "exports": {name: str(path / name) for name in RUN_EXPORTS if (path / name).is_dir()},
              "incomplete": [name for name in RUN_EXPORTS if (path / name).is_dir() and not export_complete(path / name, name)]}
    if "condition" in recipe:
        report["task"] = TASKS.get(str(recipe["condition"]), "?")
    return report


def describe(path: Path) -> dict:
    """What the folder is and holds: a pipeline's components (class, config essentials, weights), an adapter's, or a
    lone model's (e.g. a VAE), a training run's or checkpoint's (`run_report`); for a .glb / .obj file, its components
    and how it was generated. A TripoSG / PartCrafter release is refused with the conversion to run (one line)."""
    if path.is_file() and path.suffix.lower() in MESH_EXTENSIONS:
        return generation_record(path)
    if path.is_file():
        from moca3d.commands.generate import IMAGE_EXTENSIONS

        what = f"an image (generate from it: moca3d generate {path})" if path.suffix.lower() in IMAGE_EXTENSIONS else \
            f"a {path.suffix or 'suffix-less'} file"
        raise InputError(f"{path}: {what}; info reads a mesh file ({' '.join(MESH_EXTENSIONS)}), or a pipeline, LoRA adapter, model "
                         f"(e.g. VAE), training run, prepared dataset or part files' folder")
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or folder")
    if (path / ADAPTER_CONFIG).is_file():
        config = read_json(path / ADAPTER_CONFIG)
        keys = ("rank", "alpha", "base", "transformer_overrides")
        # models.lora.adapter_condition, without its torch import
        report = {"kind": "LoRA adapter", "path": str(path), "task": TASKS.get(str(config.get("condition", "object")), "?"),
                  **{k: config.get(k) for k in keys}, "adapted_layers": len(config.get("target_modules", [])),
                  "trained_in_full": config.get("train_full"), "weights": weights_summary(path) if (path / ADAPTER_WEIGHTS).is_file() else None}
        encoder = config.get("image_encoder")
        if isinstance(encoder, dict):  # a scene adapter: the encoder's LoRA, and how it was widened to 7 channels
            report["image_encoder"] = {"rank": encoder.get("rank"), "alpha": encoder.get("alpha"),
                                       "adapted_layers": len(encoder.get("target_modules", [])), "trained_in_full": encoder.get("train_full"),
                                       "widen_init": encoder.get("widen_init"), "held_whole_from": encoder.get("source")}
        return report
    if (path / "config.json").is_file() and not (path / "model_index.json").is_file():
        config = read_json(path / "config.json")
        name = "image_encoder" if config.get("model_type") == "dinov2" else COMPONENT_CLASSES.get(str(config.get("_class_name")))
        if name is not None:
            return {"kind": MODEL_KINDS[name], "path": str(path), "component": name, "used_by": USED_BY.get(name),
                    "model": component_entry(path, name)}
    release = release_name(path)
    if release is not None:
        raise InputError(f"{path}: a {release} release, not a moca3d pipeline: convert it first "
                         f"(moca3d convert {release.lower()} {path} DST), then run info on DST")
    if (path / "manifest.jsonl").is_file():
        return dataset_report(path)
    if not (path / "model_index.json").is_file():
        run = run_report(path)
        if run is not None:
            return run
        from moca3d.defaults import EXPORT_HINT
        from moca3d.geometry.mesh_io import part_files, unread_models

        if part_files(path):
            return folder_record(path)
        if unread := unread_models(path, keep_own=True):
            raise InputError(f"{path}: its {', '.join(unread[:3])}{', ...' if len(unread) > 3 else ''} are in formats moca3d "
                             f"does not read: {EXPORT_HINT}")
        raise CheckpointError(f"{path}: neither a pipeline folder (model_index.json), a LoRA adapter ({ADAPTER_CONFIG}), "
                              f"a moca3d model folder (config.json of a {', '.join(COMPONENT_CLASSES)}), a training run, a "
                              "prepared dataset (manifest.jsonl) nor a folder of mesh files")
    index = read_json(path / "model_index.json")
    out = {"kind": "pipeline", "path": str(path), "saved_by": f"moca3d {index.get('_moca3d_version', '?')}", "components": {}}
    for name in ("transformer", "image_encoder", "vae"):
        out["components"][name] = component_entry(path / name, name)
    scheduler = path / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        config = read_json(scheduler)  # FlowMatch*'s shift, or UniPC / DPM-Solver's flow_shift
        out["components"]["scheduler"] = {"class": config.get("_class_name"), "shift": config.get("shift", config.get("flow_shift"))}
    channels = out["components"]["image_encoder"].get("in_channels", 3)
    out["task"] = TASKS["scene" if channels == 7 else "object"]
    out["max_components"] = out["components"]["transformer"].get("id_codebook_size")
    out["trained_components"] = index.get(TRAINED_KEY)  # None: not recorded (exported before moca3d recorded it)
    return out


def _size(count: int) -> str:
    """1234567 -> '1.2M'."""
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M" if count >= 1e5 else f"{count:,}"


def _component_line(entry: dict) -> str:
    """A model's class, weights and config essentials (`component_entry`) on one line; a VAE's latents as L x C."""
    if "num_latents" in entry and "latent_channels" in entry:
        entry = {"latents": f"{entry['num_latents']} x {entry['latent_channels']}",
                 **{k: v for k, v in entry.items() if k not in ("num_latents", "latent_channels")}}
    settings = ", ".join(f"{k} {v}" for k, v in entry.items() if k not in ("class", "parameters", "dtypes", "bytes"))
    weights = f"{_size(entry['parameters'])} parameters ({'/'.join(entry['dtypes'])}, {entry['bytes'] / 2**20:.1f} MiB); " \
        if "parameters" in entry else ""
    return f"{entry['class']}: {weights}{settings}"


def _echo_run(report: dict) -> None:
    """A training run's newest step, last logged loss, start, and the model folders to use (`run_report`)."""
    step, steps, limit, elapsed = report["step"], report["steps"], report.get("time_limit_s"), report.get("elapsed_s")
    if step is None:
        step = "no checkpoint yet"
    elif steps and step > steps:  # resumed with fewer --steps than it had run
        step = f"trained to step {step} (newest checkpoint): finished (its recipe now asks for {steps})"
    elif steps and step == steps:
        step = f"trained to step {step} of {steps} (newest checkpoint): finished"
    elif limit and elapsed is not None and elapsed >= limit:
        step = f"trained to step {step}{f' of {steps}' if steps else ''} (newest checkpoint): finished, its time limit of {limit:.0f} s reached"
    else:
        time = f", {elapsed / 60:.1f} of its {limit / 60:.1f} min" if limit and elapsed is not None else ""
        step = f"trained to step {step}{f' of {steps}' if steps else ''} (newest checkpoint{time})"
    logged = report["last_logged"]
    loss = f"; last logged loss {logged['loss']:.4f} (step {logged.get('step', '?')})" if logged else ""
    typer.echo(f"  {step}{loss}")
    task = f"; task: {report['task']}" if "task" in report else ""
    typer.echo(f"  started from: {report['init_from'] or 'scratch (no init_from)'}{task}")
    for name, folder in report["exports"].items():
        if name in report.get("incomplete", []):
            typer.echo(f"  {RUN_EXPORTS[name]}: {folder} is incomplete (cut off while written): the same command writes it again")
        else:
            typer.echo(f"  {RUN_EXPORTS[name]}: {folder} (moca3d info {folder})")
    if not report["exports"]:
        typer.echo("  nothing exported yet: the run writes its model folders (pipeline/, vae/, ...) at its end; of a train / "
                   "train-scene run, --export-only writes pipeline/ from the newest checkpoint")


def _echo_dataset(report: dict) -> None:
    """A prepared dataset's assets, components, categories and cached latents (`dataset_report`)."""
    splits = ", ".join(f"{n} {split}" for split, n in report["splits"].items())
    kinds = f" ({', '.join(plural(n, kind) for kind, n in report['kinds'].items())})" if report["kinds"] else ""
    counts = report["components"]
    spread = f"; {counts['min']}-{counts['max']} components (median {counts['median']})" if counts else ""
    drawn = f" (splits {report['splits_drawn']})" if report.get("splits_drawn") else ""
    typer.echo(f"  {plural(report['assets'], 'asset')}{kinds}: {splits or 'none'}{drawn}{spread}")
    if report["unreadable_lines"]:
        typer.echo(f"  {plural(report['unreadable_lines'], 'manifest line')} unreadable: re-run `moca3d prepare` on it")
    categories = list(report["categories"].items())
    more = f", ... ({len(categories) - 8} more)" if len(categories) > 8 else ""
    if categories:
        typer.echo("  categories: " + ", ".join(f"{name} {n}" for name, n in categories[:8]) + more)
    for made in report["latents"]:
        made = {k: '?' if v is None else v for k, v in made.items()}  # a file without encode-dataset's record
        typer.echo(f"  latents of {made['assets']} of {report['assets']}: model {made['model']} (encoder {made['encoder']}), "
                   f"L {made['num_latents']}, {made['num_points']} points, {made['token_order']} order")
    if report["without_latents"]:
        same = " --model <the VAE that made the others>" if report["latents"] else ""  # (its record holds a hash, not a path)
        typer.echo(f"  {plural(report['without_latents'], 'asset')} without latents: `moca3d encode-dataset {report['path']}{same}` "
                   "caches them")
    typer.echo("  used by: moca3d train-vae / encode-dataset / train / train-scene / cache-latents / evaluate-model / evaluate-scenes")


def echo(report: dict) -> None:
    """Print `describe`'s report for a reader."""
    if report["kind"] == "training checkpoint":  # the models to use are its run's (exported from the newest checkpoint)
        typer.echo(f"{report['path']}: training checkpoint (step {report['step']}) of the run {report['run']['path']}")
        return _echo_run(report["run"])
    typer.echo(f"{report['path']}: {report['kind']}")
    if report["kind"] == "training run":
        return _echo_run(report)
    if report["kind"] == "prepared dataset":
        return _echo_dataset(report)
    if report["kind"] == "folder of mesh files" and not report["files"]:
        typer.echo("  no readable mesh file")
    elif report["kind"] == "folder of mesh files":  # whole objects, or several generations: no one record
        typer.echo(f"  {plural(len(report['files']), 'mesh file')}: "
                   + ", ".join(f"{name} ({plural(n, 'component')})" for name, n in report["files"].items()))
        typer.echo("  (a folder of part files holds one component a file, of one generation; `moca3d info FILE` reads one)")
    if report.get("unreadable"):
        typer.echo(f"  unreadable: {', '.join(report['unreadable'])}")
    if report["kind"] == "folder of mesh files":
        return
    if report["kind"] in ("generated file", "mesh file", "folder of generated parts", "folder of part files"):
        empty = f" ({len(report['empty'])} empty: {', '.join(report['empty'])})" if report["empty"] else ""
        typer.echo(f"  {plural(len(report['components']), 'component')}{empty}: {', '.join(report['components'])}")
        made, generator = dict(report["settings"]), report["generator"]
        sources = made.pop(INSTANCE_MASKS, None)
        elsewhere = f"; written by {generator}" if generator and not generator.startswith(("moca3d", TRIMESH_GENERATOR)) else ""
        made = {k: v for k, v in made.items() if v is not None}  # e.g. lora None: generated without an adapter
        typer.echo("  made with: " + (", ".join(f"{k} {v}" for k, v in made.items()) if made else
                                      f"no record (moca3d's generate, generate-scene and reconstruct write one){elsewhere}"))
        if isinstance(sources, list) and len(sources) == len(report["components"]):
            typer.echo("  masks: " + ", ".join(f"{name} {source}" for name, source in zip(report["components"], sources)))
        return
    if "component" in report:  # a lone model folder
        typer.echo(f"  {_component_line(report['model'])}")
        if report["used_by"]:
            typer.echo(f"  used by: {report['used_by']}")
        return
    if report["kind"] == "LoRA adapter":
        weights = report["weights"] or {}
        typer.echo(f"  task: {report['task']}")
        typer.echo(f"  rank {report['rank']}, alpha {report['alpha']}, {plural(report['adapted_layers'], 'adapted layer')}; "
                   f"trained in full: {', '.join(report['trained_in_full'] or [])}")
        if "image_encoder" in report:
            encoder = report["image_encoder"]
            widened = f"widened to 7 channels ({encoder['widen_init']})" if encoder["widen_init"] else "7 channels from the start"
            whole = f"; held whole (from {encoder['held_whole_from']})" if encoder["held_whole_from"] else ""
            full = ", ".join(encoder["trained_in_full"] or []) or "none"
            typer.echo(f"  image encoder: LoRA rank {encoder['rank']}, alpha {encoder['alpha']}, "
                       f"{plural(encoder['adapted_layers'], 'adapted layer')}; trained in full: {full}; {widened}{whole}")
        typer.echo(f"  base: {report['base']}")
        typer.echo(f"  weights: {_size(weights.get('parameters', 0))} parameters, {weights.get('bytes', 0) / 2**20:.1f} MiB")
        return
    trained = f" (trained on up to {report['trained_components']})" if report.get("trained_components") else ""
    typer.echo(f"  task: {report['task']}, up to {report['max_components']} components{trained}; saved by {report['saved_by']}")
    for name, entry in report["components"].items():
        typer.echo(f"  {name:<13} {_component_line(entry)}")


def register(app: typer.Typer) -> None:
    """Add `info`."""

    @app.command("info")
    def info(
        path: Optional[Path] = typer.Argument(None, callback=shipped, help="A pipeline folder (e.g. runs/dit/pipeline), a LoRA adapter folder (OUT/lora), a model folder (e.g. a VAE: src/moca3d/weights/vae), a training run folder or one of its checkpoints (where it stands, what it exported), a prepared dataset (its assets, splits, categories, cached latents), or a generated .glb / .obj or folder of part files (how it was made). Default: the built-in model."),
        json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    ) -> None:
        """Show what a pipeline, LoRA adapter or model folder holds (task, sizes, dtypes, settings; no model is loaded), where a training run stands, what a prepared dataset holds, or how a generated GLB / OBJ (or folder of parts) was made."""
        report = describe(path if path is not None else DEFAULT_MODEL_DIR)
        if json_out:
            typer.echo(json.dumps(report, indent=2))
        else:
            echo(report)
