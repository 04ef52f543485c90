"""MoCAPipeline: image (+ instance masks) -> N component meshes in one frame (DESIGN.md §1).

A diffusers-style folder holds the pipeline:
    model_index.json, vae/, transformer/, image_encoder/, scheduler/
each model folder being `save_pretrained` output (config.json + safetensors).
"""

from __future__ import annotations

import copy
import json
import numbers
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Union

import numpy as np
import torch
import trimesh
from diffusers import FlowMatchEulerDiscreteScheduler

from moca3d import flow
from moca3d.data.images import ImageLike, check_image, load_image, preprocess_image
from moca3d.data.scene import MasksLike, conditions_layout, read_masks, scene_conditions, warn_exif_turn
from moca3d.defaults import (ADAPTER_CONFIG, DEFAULT_MODEL_DIR, DEFAULT_SCENE_MODEL_DIR, GUIDANCE, INSTANCE_MASKS, MAX_SEED, PART_FORMATS, SCENE_GUIDANCE, STEPS, TRAINED_KEY,  # noqa: F401
                             check_component_count, check_part_files, check_sampling_args, check_shift, shipped_path,
                             resolve_dtype)
from moca3d.errors import CheckpointError, ConfigError, InputError, MoCA3DError, one_line, warn_input
from moca3d.geometry.extract import ExtractConfig, evaluate_grid, mesh_from_grid, vae_extract_config
from moca3d.geometry.mesh_io import component_names, components_scene
from moca3d.geometry.simplify import check_faces, simplify_components
from moca3d.models.image_encoder import SCENE_CHANNELS, ImageEncoder, encode_views, input_channels
from moca3d.models.dino import is_dino, load_image_encoder
from moca3d.models.transformer import MoCATransformer
from moca3d.models.vae import VecSetVAE
from moca3d.progress import on_terminal

COMPONENTS = {"vae": VecSetVAE, "transformer": MoCATransformer, "image_encoder": ImageEncoder}




@dataclass
class MoCAOutput:
    """Generated components: meshes in the shared normalised frame, their names and a GLB-ready scene."""

    meshes: List[trimesh.Trimesh]
    names: List[str]
    latents: torch.Tensor  # (N, L, C)
    kind: str = "component"  # what one mesh is: "part" or "instance"
    settings: dict = field(default_factory=dict)  # how it was made (model, seed, steps, ...): written into the file

    @property
    def scene(self) -> trimesh.Scene:
        """The components as one trimesh.Scene: a named node each, in distinct colours (what `save` writes as GLB)."""
        return components_scene(self.meshes, self.names)

    def __len__(self) -> int:
        return len(self.meshes)

    def __iter__(self) -> Iterator[trimesh.Trimesh]:
        return iter(self.meshes)

    def __getitem__(self, index: int) -> trimesh.Trimesh:
        return self.meshes[index]

    def __repr__(self) -> str:
        empty = sum(1 for m in self.meshes if len(m.faces) == 0)
        return (f"MoCAOutput({len(self.meshes)} {self.kind}{'s' if len(self.meshes) != 1 else ''}, {empty} empty, "
                f"{sum(len(m.faces) for m in self.meshes):,} triangles, seed {self.settings.get('seed')})")

    def save(self, path: Union[str, Path]) -> Path:
        """Write a GLB (one named node per component) or an OBJ (one `o` object per component), by the suffix (atomic);
        InputError, and no file, for another suffix or when every mesh is empty."""
        from moca3d.geometry.mesh_io import check_mesh_format, save_components

        check_mesh_format(path)
        if not any(len(m.faces) for m in self.meshes):
            raise InputError(f"all {len(self.meshes)} {self.kind}s decoded empty: nothing to write (try more steps or another seed)")
        return save_components(path, self.meshes, self.names, metadata=self.settings)

    def save_parts(self, folder: Union[str, Path], ext: str = "glb") -> List[Path]:
        """One file per component into `folder`, named after it (part_00.glb, ...; glb, obj, ply or stl) and in its
        colour in the whole, for a tool that takes one mesh per file; glb and obj keep the node name, material, normals
        and how it was made (`moca3d info`), ply the colour and normals. An empty component is not written. The folder
        then holds this output alone: files of an earlier one named as components (part_07.obj, part_07.mtl, ...) are
        removed. `moca3d evaluate` and the metrics read the folder back as the components, in name order."""
        from moca3d.geometry.mesh_io import mtl_path, save_separate

        folder = Path(folder)
        ext = check_part_files(ext, folder)
        if not any(len(m.faces) for m in self.meshes):
            raise InputError(f"all {len(self.meshes)} {self.kind}s decoded empty: nothing to write (try more steps or another seed)")
        paths = save_separate(folder, self.meshes, self.names, ext=ext, metadata=self.settings)
        written = {p.name for p in paths} | ({mtl_path(p).name for p in paths} if ext == "obj" else set())
        earlier = re.compile(rf"{re.escape(self.kind)}_\d+\.({'|'.join(PART_FORMATS)}|mtl)", re.IGNORECASE)
        for stale in folder.iterdir():  # an earlier output's parts would be read back with these
            if stale.is_file() and earlier.fullmatch(stale.name) and stale.name not in written:
                stale.unlink()
        return paths


def _check_finite(model: torch.nn.Module, where: Path) -> None:
    """Every weight of `model` (loaded from the folder `where`) present, stored as floating point and finite; a one-line
    CheckpointError naming the first that is not."""
    state = model.state_dict()
    for name, tensor in state.items():
        if tensor.is_meta:  # diffusers leaves a tensor missing from the file uninitialised, on the meta device
            raise CheckpointError(f"{where}: tensor '{name}' is missing from the weights")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{where}: tensor '{name}' contains NaN or Inf")
    from safetensors import safe_open

    # a DINOv2 folder's names are transformers' stored ones, which it renames on loading (attention.query -> q_proj):
    # every tensor it stores is a floating-point weight
    dino = is_dino(model)
    for file in sorted(Path(where).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as stored:
            for name in stored.keys():
                kind = stored.get_slice(name).get_dtype()  # "F32", "BF16", "I32", ...
                floating = dino or (name in state and state[name].is_floating_point())
                if floating and not kind.startswith(("F", "BF")):
                    raise CheckpointError(f"{file}: tensor '{name}' is stored as {kind}, not floating point")


VAE_ENCODER_KEY = "vae_encoder"  # model_index.json: the fingerprint (`encoder_id`) of the VAE encoder saved with the pipeline
VAE_ENCODER_DTYPE = torch.float16  # ... of its tensors at fp16: the same for a pipeline saved in fp16 and loaded in fp32


def _check_vae_encoder(recorded: Optional[str], vae: VecSetVAE, root: Path) -> None:
    """A pipeline's vae/ is the one it was saved with, up to its decoder (`recorded`: model_index.json's VAE_ENCODER_KEY;
    None for a folder saved before it was recorded): a VAE of another encoder makes latents its transformer never saw."""
    if recorded is None:
        return
    from moca3d.training.train_vae import encoder_id

    if encoder_id(vae, VAE_ENCODER_DTYPE) != recorded:
        raise CheckpointError(f"{root / 'vae'}: not the VAE this pipeline was saved with (another encoder than {recorded}): its "
                              "transformer's latents would decode wrong; put the pipeline's own vae/ back (a decoder "
                              "fine-tune of it, which keeps the encoder, fits)")


class MoCAPipeline:
    """Generate part (or instance) meshes from one image with a MoCA transformer."""

    def __init__(self, vae: VecSetVAE, transformer: MoCATransformer, image_encoder: ImageEncoder, scheduler=None):
        if image_encoder.out_dim != transformer.config.cond_dim:
            raise CheckpointError(
                f"image encoder width {image_encoder.out_dim} does not match the transformer's cond_dim {transformer.config.cond_dim}"
            )
        if vae.config.latent_channels != transformer.config.in_channels:
            raise CheckpointError(
                f"VAE latent channels {vae.config.latent_channels} do not match the transformer's in_channels {transformer.config.in_channels}"
            )
        self.vae = vae.eval()
        self.transformer = transformer.eval()
        self.image_encoder = image_encoder.eval()
        self.scheduler = scheduler or flow.make_scheduler()  # checked: a flow-matching diffusers scheduler
        self.source = {"model": None, "lora": None}  # where from_pretrained read it (recorded in generated files)
        # the most components a training example of the transformer (or of its base, for a fine-tune) held (model_index.json's
        # TRAINED_KEY; None: unknown):
        # more can be asked, up to max_components, and get a warning
        self.trained_components: Optional[int] = None
        self._warned_counts: set[tuple[str, int]] = set()  # counts beyond trained_components warned of already

    @property
    def scheduler(self):
        """The diffusers scheduler that integrates the flow (FlowMatchEulerDiscreteScheduler unless replaced); settable
        with another flow-matching one, as in diffusers (`pipe.scheduler = X.from_config(pipe.scheduler.config)`)."""
        return self._scheduler

    @scheduler.setter
    def scheduler(self, scheduler) -> None:
        flow.check_flow_scheduler(scheduler)
        self._scheduler = scheduler

    # -- persistence -----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: Union[str, Path, None] = None, device: Union[str, torch.device] = "cpu",
                        lora: Union[str, Path, None] = None, torch_dtype: Union[torch.dtype, str, None] = None) -> "MoCAPipeline":
        """Load a pipeline folder; `None` loads the built-in default model shipped with the package.

        `device`: cpu, cuda, cuda:N, mps or "auto" (cuda when available); one torch lacks is a one-line ConfigError.
        `lora`: an adapter folder (OUT/lora of `moca3d train --lora-rank`, or of `moca3d train-scene --lora-rank`: then
        a scene pipeline) trained from this very pipeline, folded into its weights.
        `torch_dtype`: the transformer's and image encoder's dtype (torch.bfloat16, "bf16", "auto": bf16 on a GPU that
        has it, else fp32; None: fp32); the VAE stays fp32, its field is meshed at 1/128 of a cell and more.
        """
        device = _checked_device(device)
        dtype = None if torch_dtype is None else resolve_dtype(torch_dtype, device)
        if path is not None and not str(path).strip():
            raise CheckpointError("an empty path: give a pipeline folder, or None for the built-in model")
        root = Path(shipped_path(str(path))).expanduser() if path is not None else DEFAULT_MODEL_DIR  # the README's src/moca3d/weights/...
        if root.name == "model_index.json" and root.is_file():  # the index file itself: its folder is the pipeline
            root = root.parent
        if path is not None and not root.exists():
            raise CheckpointError(f"{root}: no such pipeline folder")
        if not (root / "model_index.json").is_file():
            hint = " (the built-in model is not installed)" if path is None else ""
            if (root / "pipeline" / "model_index.json").is_file():  # a training run's folder
                hint = f" (a training run: its pipeline is {root / 'pipeline'})"
            elif (root / ADAPTER_CONFIG).is_file():
                hint = " (a LoRA adapter: give it as the adapter, --lora or lora=, beside the pipeline it was trained from)"
            raise CheckpointError(f"{root}: not a moca3d pipeline folder, model_index.json missing{hint}")
        try:
            index = json.loads((root / "model_index.json").read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{root / 'model_index.json'}: corrupt JSON ({err})") from None
        if not isinstance(index, dict):
            raise CheckpointError(f"{root / 'model_index.json'}: not a pipeline index (a JSON object of components)")
        if lora is not None:  # a wrong adapter folder is refused before a (gigabytes) base model loads
            from moca3d.models.lora import read_adapter_config

            lora = Path(lora).expanduser()
            adapter = read_adapter_config(lora)
        parts = {}
        for name, klass in COMPONENTS.items():
            sub = root / name
            if not sub.is_dir():
                raise CheckpointError(f"{root}: component folder '{name}/' missing")
            if not any(sub.glob("*.safetensors")):
                raise CheckpointError(f"{sub}: no weights (*.safetensors) in the component folder")
            try:
                model = load_image_encoder(sub) if name == "image_encoder" else klass.from_pretrained(sub)
            except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:  # corrupt config, weights or shapes
                reason = one_line(err).split(". If you want")[0]  # not diffusers' advice to load random weights instead
                raise CheckpointError(f"{sub}: cannot load the {name} ({reason})") from None
            _check_finite(model, sub)
            parts[name] = model
        _check_vae_encoder(index.get(VAE_ENCODER_KEY), parts["vae"], root)
        if lora is not None:
            try:
                parts["transformer"], parts["image_encoder"] = apply_lora(root, parts["transformer"], parts["image_encoder"], Path(lora))
            except (CheckpointError, ConfigError) as err:  # most often: the adapter given with another base than its own
                base = adapter.get("base")
                if not base or Path(base).resolve() == root.resolve():
                    raise
                where = f"pass that pipeline, --model {base}" if Path(base).is_dir() else f"it is no longer at {base}"
                raise CheckpointError(f"{one_line(err)}: {where}") from None
        scheduler = _load_scheduler(root / "scheduler", index.get("scheduler")) if (root / "scheduler").is_dir() else None
        pipe = cls(scheduler=scheduler, **parts).to(device, dtype)
        pipe.source = {"model": _model_name(root), "lora": None if lora is None else str(lora)}
        trained = adapter.get(TRAINED_KEY) if lora is not None else index.get(TRAINED_KEY)  # an adapter: its run's (base included)
        pipe.trained_components = trained if isinstance(trained, int) and not isinstance(trained, bool) else None
        return pipe

    def save_pretrained(self, path: Union[str, Path], torch_dtype: Union[torch.dtype, str, None] = None) -> Path:
        """Write every component and model_index.json (the index last, so a folder with it is complete).

        `torch_dtype` (e.g. torch.float16, "fp16"): the transformer's and image encoder's stored dtype (half the size of
        fp32, as the built-in model ships; loaded back as fp32 unless asked otherwise); None: as they are. The VAE is
        stored as it is, its field is meshed finely."""
        dtype = None if torch_dtype is None else resolve_dtype(torch_dtype)  # ("auto": fp32, as on the CPU)
        root = Path(path).expanduser()
        if root.exists() and not root.is_dir():
            raise ConfigError(f"{root} is a file: save_pretrained writes a folder")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"cannot make the folder {root} ({err.strerror or err})") from None
        (root / "model_index.json").unlink(missing_ok=True)  # over an earlier export: incomplete until the end
        from moca3d.training.train_vae import encoder_id

        index = {"_class_name": "MoCAPipeline", "_moca3d_version": _version(), VAE_ENCODER_KEY: encoder_id(self.vae, VAE_ENCODER_DTYPE)}
        if self.trained_components is not None:
            index[TRAINED_KEY] = int(self.trained_components)
        for name, klass in COMPONENTS.items():
            part = getattr(self, name)
            if dtype is not None and name != "vae" and next(part.parameters()).dtype != dtype:
                part = torch.nn.Module.to(copy.deepcopy(part), dtype)  # a copy: this pipeline keeps its weights
            part.save_pretrained(root / name)
            index[name] = ["transformers", type(part.model).__name__] if is_dino(part) else ["moca3d", klass.__name__]
        flow.scheduler_with_shift(self.scheduler, None).save_config(root / "scheduler")  # its class's own config keys
        index["scheduler"] = ["diffusers", type(self.scheduler).__name__]
        tmp = root / "model_index.json.tmp"
        tmp.write_text(json.dumps(index, indent=2))
        os.replace(tmp, root / "model_index.json")
        return root

    def to(self, device: Union[str, torch.device, torch.dtype, None] = None,
           dtype: Union[torch.dtype, str, None] = None) -> "MoCAPipeline":
        """Move every component to `device` and/or cast the transformer and image encoder to `dtype`, as
        `from_pretrained(torch_dtype=)` does (the VAE stays fp32); `pipe.to(torch.bfloat16)` casts only.

        A device torch lacks or an unknown dtype is a one-line ConfigError.
        """
        if isinstance(device, torch.dtype):  # nn.Module.to's positional dtype
            device, dtype = dtype, device
        if device is not None:
            device = _checked_device(device)
        if dtype is not None:
            dtype = resolve_dtype(dtype, device or self.device)
        for name in COMPONENTS:
            model = getattr(self, name)
            if device is not None:
                model.to(device)
            if dtype is not None and name != "vae":  # nn.Module's: diffusers' own `to` warns of fp32 modules none of ours has
                torch.nn.Module.to(model, dtype)
        if dtype is not None and dtype != torch.float32 and self.device.type == "cpu":
            warn_input(f"{str(dtype).removeprefix('torch.')} on the CPU is slower than float32 there (bfloat16 matmuls about "
                       "100x on cores without AMX) and its meshes are no smaller: keep float32 on a CPU (--dtype auto)")
        return self

    def enable_sequential_cpu_offload(self, device: Union[str, torch.device] = "cuda") -> "MoCAPipeline":
        """Keep weights in CPU memory and move each submodule to `device` only while it runs (accelerate hooks).

        Lets a 1.5B-parameter transformer run on a GPU smaller than its weights, at the cost of speed.
        """
        from accelerate import cpu_offload

        device = torch.device(_checked_device(device))
        for name in COMPONENTS:
            cpu_offload(getattr(self, name), execution_device=device)
        self._execution_device = device
        return self

    @property
    def device(self) -> torch.device:
        """Where generation runs (the execution device under CPU offload)."""
        return getattr(self, "_execution_device", None) or next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The transformer's and image encoder's dtype (the VAE stays float32)."""
        return self.transformer.dtype

    def __repr__(self) -> str:
        task = "scene" if self.is_scene_model else "object"
        return (f"MoCAPipeline(model={self.source.get('model')!r}, task={task}, up to {self.transformer.max_components} components, "
                f"device={self.device}, dtype={str(self.dtype).removeprefix('torch.')})")

    # -- generation ------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_image(self, image: ImageLike) -> torch.Tensor:
        """Image -> condition tokens (1, M, D)."""
        if self.is_scene_model:
            raise InputError("this is a scene model (7-channel image encoder): it needs instance masks (generate_scene, `moca3d generate-scene`)")
        if is_dino(self.image_encoder):  # DINOv2: its own preprocessing (resize 256, crop 224, ImageNet norm)
            picture = load_image(image)
            check_image(picture)  # a blank image is refused by every pipeline (and by the CLI before loading)
            return self.image_encoder.encode(picture).to(self.device)
        pixels = preprocess_image(image, self.image_encoder.image_size).to(self.device)
        return self.image_encoder(pixels[None])

    @torch.no_grad()
    def generate_latents(
        self, cond: torch.Tensor, num_parts: int, steps: int = STEPS, guidance: float = GUIDANCE, seed: Optional[int] = 0,
        shift: Optional[float] = None, progress: Optional[Callable[[int, int], None]] = None,
        layout: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Sample (1, N, L, C) latents for `num_parts` components under `cond` (1, M, D) or (1, N, M, D) (`encode_image`'s,
        `encode_scene`'s); steps, guidance, seed (None: a random one) and shift as for `__call__`.

        `layout` (1, N, F): per-component features for a transformer with `layout_features` (`scene_condition`'s).
        """
        cfg = self.transformer.config
        check_component_count(num_parts, self.transformer.max_components)
        seed = random.SystemRandom().randrange(MAX_SEED + 1) if seed is None else seed
        check_sampling_args(steps, guidance, None, shift, dash="", seed=seed)
        if not isinstance(cond, torch.Tensor) or cond.dim() not in (3, 4) or cond.shape[0] != 1 or cond.shape[-1] != cfg.cond_dim:
            got = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise InputError(f"cond must be (1, M, {cfg.cond_dim}) or (1, N, M, {cfg.cond_dim}) (encode_image's or encode_scene's), got {got}")
        g = torch.Generator().manual_seed(int(seed))  # e.g. numpy's integers, which torch.Generator refuses
        ids = self.transformer.sample_ids(1, num_parts, g, self.device)
        uncond = torch.zeros_like(cond)
        extra = {} if layout is None else {"layout": layout.to(self.device)}  # kept in the unconditional pass, as in training
        latents = flow.sample(
            self.transformer, cond, (1, num_parts, cfg.num_latents, cfg.in_channels), uncond=uncond, steps=steps,
            guidance=guidance, shift=shift, generator=g, scheduler=self.scheduler, progress=progress, ids=ids, **extra,
        )
        if not torch.isfinite(latents).all():
            raise CheckpointError(f"the model sampled NaN or Inf latents (its weights overflow in {next(self.transformer.parameters()).dtype}?)")
        return latents

    @staticmethod
    def extract_config(resolution: int = 128) -> ExtractConfig:
        """How generated latents become meshes: the grid, refinement band and floater filter of `decode_latents`."""
        return vae_extract_config(resolution)

    @staticmethod
    def component_latents(latents: torch.Tensor) -> torch.Tensor:
        """(N, L, C) latents, or `generate_latents`' (1, N, L, C) -> (N, L, C); one-line InputError for other shapes."""
        if latents.dim() == 4 and latents.shape[0] == 1:
            return latents[0]
        if latents.dim() != 3:
            raise InputError(f"latents must be (N, L, C) or (1, N, L, C) (one object's components), got {tuple(latents.shape)}")
        return latents

    @torch.no_grad()
    def latent_grids(self, latents: torch.Tensor, resolution: int = 128) -> Iterator[np.ndarray]:
        """(N, L, C) (or (1, N, L, C)) sampled latents -> each component's VAE field on the extraction grid, one at a time."""
        config = self.extract_config(resolution)
        for z in self.component_latents(latents):
            z = self.vae.denormalize_latents(z[None].to(self.device))  # sampled (unit-scale) -> VAE latents
            yield evaluate_grid(self.vae.field(z), config, device=self.device)

    def decode_latents(
        self, latents: torch.Tensor, resolution: int = 128, progress: Optional[Callable[[int, int], None]] = None
    ) -> List[trimesh.Trimesh]:
        """(N, L, C) (or `generate_latents`' (1, N, L, C)) latents -> one mesh per component (marching cubes on the VAE field)."""
        config = self.extract_config(resolution)
        latents, meshes = self.component_latents(latents), []
        for i, grid in enumerate(self.latent_grids(latents, resolution)):
            meshes.append(mesh_from_grid(grid, config))
            if progress is not None:
                progress(i + 1, len(latents))
        return meshes

    @torch.no_grad()
    def reconstruct(self, components: Union[str, Path, trimesh.Trimesh, trimesh.Scene, List[trimesh.Trimesh]], points: int = 512,
                    resolution: int = 128, seed: int = 0) -> List[trimesh.Trimesh]:
        """Components (a mesh file or folder, one mesh, a trimesh.Scene or a list) encoded and decoded by this pipeline's VAE, in their
        own frame and order (an empty one stays empty): the ceiling of any transformer on this VAE, as `moca3d
        reconstruct`. `points`: surface samples per component fed to the encoder (at least its latent tokens)."""
        from moca3d.defaults import check_resolution
        from moca3d.geometry.mesh_io import as_components, read_components
        from moca3d.training.train_vae import reconstruct_components

        check_resolution(resolution, "resolution")
        if not isinstance(points, numbers.Integral) or points < self.vae.config.num_latents:
            raise ConfigError(f"points must be a whole number >= the VAE's {self.vae.config.num_latents} latent tokens, got {points!r}")
        if isinstance(components, (str, Path)):
            parts, names = read_components(components)
        else:
            parts = as_components(components)
            names = component_names("part", len(parts))
        return reconstruct_components(parts, names, self.vae, int(points), self.extract_config(resolution), seed=seed,
                                      label=str(components) if isinstance(components, (str, Path)) else "components")

    def __call__(
        self, image: ImageLike, num_parts: int = 4, steps: int = STEPS, guidance: float = GUIDANCE, seed: Optional[int] = 0,
        shift: Optional[float] = None, resolution: int = 128, show_progress: bool = True, faces: Optional[int] = None, *,
        num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
    ) -> MoCAOutput:
        """Image -> `num_parts` part meshes, with rich progress bars over sampling and decoding.

        `image`: a path, PIL image, (H, W[, 3 or 4]) uint8 or 0..1 float array or (3|4, H, W) tensor; an object on a
        white or transparent background; one image per call (one object: loop for several). `steps`: Euler steps of the flow sampler. `guidance`: classifier-free guidance
        scale (1: the conditional prediction alone; 0: the unconditional one). `seed`: the same seed gives the same
        output (None: a random one, recorded in the output's settings). `shift`: the sampler's timestep shift (None:
        the scheduler's). `resolution`: marching-cubes grid per part. `faces`: a triangle budget for all parts together
        (quadric decimation, `geometry/simplify.py`; None: marching cubes' full meshes).

        diffusers' names are accepted too: `num_inference_steps` (= steps), `guidance_scale` (= guidance) and
        `generator` (a torch.Generator: its next draw is the seed, recorded in the output's settings).
        """
        steps, guidance, seed = diffusers_arguments(steps, guidance, seed, num_inference_steps, guidance_scale, generator,
                                                    GUIDANCE)
        # before the image is encoded (None would mean "one per condition" inside: the count of image tokens, not parts)
        check_component_count(num_parts, self.transformer.max_components)
        return self._generate(lambda: (self.encode_image(image), None), num_parts, "part", steps, guidance, seed, shift, resolution,
                              show_progress, {"image": image}, faces)

    def _generate(self, encode, num: Optional[int], prefix: str, steps, guidance, seed, shift, resolution, show_progress,
                  inputs: dict, faces: Optional[int] = None) -> MoCAOutput:
        """Condition and layout (from `encode()`) -> sampled latents -> meshes named `{prefix}_XX`; N from the condition if None.
        The output's settings record how it was made, with the file names of the `inputs` given as paths."""
        from rich.progress import Progress

        seed = random.SystemRandom().randrange(MAX_SEED + 1) if seed is None else seed
        check_sampling_args(steps, guidance, resolution, shift, dash="", seed=seed)  # all before the image is encoded
        seed = int(seed)  # e.g. numpy's integers, which torch.Generator refuses
        check_faces(faces, num, dash="")
        scheduler = flow.scheduler_with_shift(self.scheduler, shift)  # a replaced scheduler without a shift refuses one
        shown = show_progress and on_terminal()  # elsewhere (a pipe, a log file) a transient bar leaves a blank line
        with Progress(disable=not shown, transient=True) as bar:
            cond, layout = encode()  # cond (1, M, D) shared, or (1, N, M, D) per component; layout None or (1, N, F)
            num = cond.shape[1] if num is None else num
            num = int(num) if isinstance(num, numbers.Integral) and not isinstance(num, bool) else num  # numpy's: JSON
            check_faces(faces, num, dash="")  # a scene's count is known once its masks are read
            beyond = self.trained_components is not None and self.trained_components < num <= self.transformer.max_components
            if beyond and (prefix, num) not in self._warned_counts:  # once per pipeline and count (a folder of images)
                self._warned_counts.add((prefix, num))
                warn_input(f"{num} {prefix}s: this model was trained on at most {self.trained_components}; beyond that its "
                           f"{prefix}s may come out worse (up to {self.transformer.max_components} are allowed)")
            task = bar.add_task("sampling", total=steps)
            latents = self.generate_latents(
                cond, num, steps, guidance, seed, shift, progress=lambda i, n: bar.update(task, completed=i, total=n), layout=layout
            )[0]
            task = bar.add_task("decoding", total=num)
            meshes = simplify_components(self.decode_latents(latents, resolution, progress=lambda i, n: bar.update(task, completed=i)),
                                         faces)
        names = component_names(prefix, num)
        settings = {**self.source, "moca3d": _version(), f"{prefix}s": num, "steps": int(steps), "guidance": float(guidance), "seed": int(seed),
                    "shift": flow.scheduler_shift(scheduler), "resolution": int(resolution),
                    **({} if type(scheduler) is FlowMatchEulerDiscreteScheduler else {"scheduler": type(scheduler).__name__}),
                    "dtype": str(self.transformer.dtype).removeprefix("torch."),
                    **({"faces": int(faces)} if faces is not None else {}),
                    **{k: Path(v).name for k, v in inputs.items() if isinstance(v, (str, Path))}}
        return MoCAOutput(meshes=meshes, names=names, latents=latents.cpu(), kind=prefix, settings=settings)

    # -- scenes (issue 7) --------------------------------------------------------------------------

    @property
    def is_scene_model(self) -> bool:
        """True when the image encoder takes per-instance 7-channel stacks (a scene fine-tune)."""
        return input_channels(self.image_encoder) == SCENE_CHANNELS

    @torch.no_grad()
    def scene_condition(self, image: ImageLike, masks: MasksLike) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Scene image and instance masks -> per-instance condition tokens (1, N, views * M, D) and, for a transformer
        with `layout_features`, the masks' layout (1, N, 8) (else None).

        `masks`: a label map (path or (H, W) int array, 0 = background), a folder of binary masks,
        or a list / (N, H, W) stack of binary masks; see moca3d.data.scene for order and overlaps.
        """
        return self._scene_condition(image, masks)[:2]

    def _scene_condition(self, image: ImageLike, masks: MasksLike) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[list]]:
        """`scene_condition`, with each instance's mask source (`read_masks`)."""
        if not self.is_scene_model:
            raise InputError("this model has an object image encoder (3 channels): scenes need a scene model (recipe condition "
                             "'scene'); the built-in one: omit --model (Python: "
                             "MoCAPipeline.from_pretrained(moca3d.defaults.DEFAULT_SCENE_MODEL_DIR))")
        warn_exif_turn(image)  # a square photo turned upright by its EXIF tag: its masks may fit its stored pixels
        im = load_image(image)
        masks, sources = read_masks(masks, image_size=im.size, max_instances=self.transformer.max_components)  # (N, H, W)
        views = self.transformer.config.instance_views
        pixels = scene_conditions(im, masks, self.image_encoder.image_size, views=views).to(self.device)  # (N, 7 * views, S, S)
        layout = conditions_layout(pixels[None]) if self.transformer.config.layout_features else None  # (1, N, 8)
        return encode_views(self.image_encoder, pixels)[None], layout, sources  # (1, N, views * M, D)

    def encode_scene(self, image: ImageLike, masks: MasksLike) -> torch.Tensor:
        """Scene image and instance masks -> per-instance condition tokens (1, N, views * M, D) (see `scene_condition`)."""
        return self.scene_condition(image, masks)[0]

    def generate_scene(
        self, image: ImageLike, masks: MasksLike, steps: int = STEPS, guidance: float = SCENE_GUIDANCE, seed: Optional[int] = 0,
        shift: Optional[float] = None, resolution: int = 128, show_progress: bool = True, faces: Optional[int] = None, *,
        num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
    ) -> MoCAOutput:
        """Scene image + one mask per instance -> one mesh per instance (node `instance_XX`), in one frame; `faces`: a
        triangle budget for all instances together (None: marching cubes' full meshes). The output's settings record
        each instance's mask ("instance_masks": its label id or file name) when the masks say it. The other arguments,
        diffusers' names among them, are `__call__`'s."""
        steps, guidance, seed = diffusers_arguments(steps, guidance, seed, num_inference_steps, guidance_scale, generator,
                                                    SCENE_GUIDANCE)
        sources = []

        def encode():
            cond, layout, named = self._scene_condition(image, masks)
            sources.extend(named or [])
            return cond, layout

        out = self._generate(encode, None, "instance", steps, guidance, seed, shift, resolution, show_progress,
                             {"image": image, "masks": masks}, faces)
        if sources:
            out.settings[INSTANCE_MASKS] = sources
        return out


def diffusers_arguments(steps, guidance, seed, num_inference_steps, guidance_scale, generator,
                        default_guidance: float) -> tuple:
    """(steps, guidance, seed) from ours and diffusers' names for them; one-line InputError where both say different things."""
    if num_inference_steps is not None:
        if steps not in (STEPS, num_inference_steps):
            raise InputError(f"steps={steps} and num_inference_steps={num_inference_steps} disagree: give one of them")
        steps = num_inference_steps
    if guidance_scale is not None:
        if guidance not in (default_guidance, guidance_scale):
            raise InputError(f"guidance={guidance} and guidance_scale={guidance_scale} disagree: give one of them")
        guidance = guidance_scale
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise InputError(f"generator must be a torch.Generator (or give seed=<int>), got {type(generator).__name__}")
        if seed != 0:  # 0 is the default: a seed given on purpose and a generator are two seeds
            raise InputError(f"give seed={seed} or a generator, not both")
        seed = int(torch.randint(0, MAX_SEED, (1,), generator=generator, device=generator.device))  # recorded: reproducible
    return steps, guidance, seed


def apply_lora(root: Path, transformer: MoCATransformer, image_encoder, folder: Path) -> tuple[MoCATransformer, object]:
    """The base pipeline `root`'s transformer and encoder with the adapter `folder` folded in (`models/lora.py`); a scene
    adapter's encoder is widened to 7 channels and adapted as its `moca3d train-scene` run did: a scene pipeline."""
    from moca3d.models.image_encoder import widen_input_channels
    from moca3d.models.lora import LORA_SPEC, adapter_condition, add_lora, merge_lora, read_adapter
    from moca3d.training.checkpoints import frozen_fingerprint, state_dict_mismatch
    from moca3d.training.train_dit import DiTTrainConfig, Generator, load_transformer

    config, tensors = read_adapter(folder)
    trained_on = config.get("base") or "another pipeline"
    if config.get("transformer_overrides"):  # the fine-tune's architecture changes (e.g. a longer latent set)
        transformer = load_transformer(root, DiTTrainConfig(transformer=config["transformer_overrides"]), None)
    specs = {"transformer": config}  # each adapted module: how LoRA was injected into it (`lora_spec`)
    if adapter_condition(config) == "scene":
        spec = specs["image_encoder"] = config["image_encoder"]
        if spec.get("config"):  # the run's encoder was not the base's (image_encoder_from): the adapter holds it whole
            image_encoder = ImageEncoder.from_config(spec["config"])
        elif input_channels(image_encoder) != (wanted := 3 if spec["widen_init"] else SCENE_CHANNELS):
            raise CheckpointError(f"{folder}: this scene adapter was fine-tuned from a {wanted}-channel image encoder ({trained_on}), "
                                  f"{root}'s takes {input_channels(image_encoder)} channels")
        elif spec["widen_init"]:
            widen_input_channels(image_encoder, SCENE_CHANNELS, spec["widen_init"])
    model = Generator(transformer, image_encoder)  # the names and the order the fine-tune saved its tensors in
    for part, spec in specs.items():
        layers = dict(getattr(model, part).named_modules())
        absent = [t for t in spec["target_modules"] if not isinstance(layers.get(t), torch.nn.Linear)]
        if absent:
            raise CheckpointError(f"{folder}: this adapter was trained on another architecture than {root} (no linear layer "
                                  f"'{absent[0]}' in the {part})")
        add_lora(getattr(model, part), **{k: spec[k] for k in LORA_SPEC})
    if "image_encoder" not in specs:
        for name, param in model.image_encoder.named_parameters():
            param.requires_grad_(f"image_encoder.{name}" in tensors)  # trained in full, or frozen with the base
    missing = sorted({name for name, p in model.named_parameters() if p.requires_grad} - set(tensors))
    problem = state_dict_mismatch(model, {**model.state_dict(), **tensors})
    problem = problem or (f"{len(missing)} trained tensors missing (e.g. '{missing[0]}')" if missing else "")
    if problem:
        raise CheckpointError(f"{folder}: the adapter does not fit {root}: {problem}")
    model.load_state_dict(tensors, strict=False)  # the trained tensors (and an encoder held whole): the frozen base stays
    if frozen_fingerprint(model) != config["base_fingerprint"]:
        raise CheckpointError(f"{folder}: this adapter was trained on other base weights ({trained_on}), not on {root}")
    merge_lora(model)
    model.requires_grad_(True)  # as any loaded model
    return model.transformer, model.image_encoder


def _load_scheduler(folder: Path, recorded) -> object:
    """The scheduler of a pipeline folder: the diffusers class model_index.json names (FlowMatchEulerDiscreteScheduler
    when it names none), a flow-matching one with a valid shift, else a one-line CheckpointError."""
    import diffusers

    name = recorded[1] if isinstance(recorded, list) and len(recorded) == 2 and recorded[0] == "diffusers" else "FlowMatchEulerDiscreteScheduler"
    klass = getattr(diffusers, str(name), None)
    if not (isinstance(klass, type) and issubclass(klass, diffusers.SchedulerMixin)):
        raise CheckpointError(f"{folder}: model_index.json names the scheduler {name!r}, which is not a diffusers scheduler")
    try:
        scheduler = klass.from_pretrained(folder)
        flow.check_flow_scheduler(scheduler)
        shift = flow.scheduler_shift(scheduler)
        if shift is not None:
            check_shift(shift)
    except (OSError, ValueError, MoCA3DError) as err:
        raise CheckpointError(f"{folder}: cannot load the scheduler ({one_line(err)})") from None
    return scheduler


def _checked_device(device: Union[str, torch.device]) -> str:
    """`device` checked as the CLI's --device (one-line ConfigError, not torch's AssertionError, for a missing CUDA or MPS)."""
    from moca3d.commands.common import resolve_device

    return resolve_device(str(device))


def _model_name(root: Path) -> str:
    """How generated files record pipeline folder `root`: its path, or the shipped model's name, never its install path."""
    shipped = {DEFAULT_MODEL_DIR: "built-in", DEFAULT_SCENE_MODEL_DIR: "built-in scene"}
    return next((name for folder, name in shipped.items() if root.resolve() == folder.resolve()), str(root))


def _version() -> str:
    from moca3d import __version__

    return __version__
