"""Default sampling settings shared by the pipeline, the CLI, the evaluation and the demo (measured: README),
and the one-line checks of sampling options."""

import math
import numbers
from pathlib import Path
from typing import Any, Optional

from moca3d.errors import ConfigError, InputError

STEPS = 50  # Euler steps; 100 scored the same on the built-in object model (README, Built-in model)
GUIDANCE = 7.0  # classifier-free guidance for objects: the built-in model's best of 4, 7 and 10
SCENE_GUIDANCE = 2.0  # for scenes: the built-in scene model's best of 1, 2, 3, 4, 7 and 10 (README, scene guidance)
MIN_RESOLUTION = 16  # smallest marching-cubes grid a generation verb accepts
MAX_RESOLUTION = 1024  # largest: a 1024^3 grid of float32 field values is already 4 GiB per component
MAX_SEED = 2**63 - 1  # torch.Generator seeds are 64-bit
DEFAULT_MODEL_DIR = Path(__file__).parent / "weights" / "default"  # the built-in object model, shipped in the package
DEFAULT_SCENE_MODEL_DIR = Path(__file__).parent / "weights" / "scene"  # the built-in scene model (train-scene)
SHIPPED_PREFIX = "src/moca3d/weights/"  # how the README and the recipes in configs/ name the package's shipped models
MESH_EXTENSIONS = (".glb", ".gltf", ".obj", ".ply", ".stl", ".off")  # the mesh formats read (geometry.mesh_io)
# 3D formats moca3d does not read: a folder's files of these are named where left out (other files, e.g. textures, pass
# silently), with how to export them (EXPORT_HINT)
OTHER_3D_FORMATS = (".fbx", ".blend", ".usd", ".usda", ".usdc", ".usdz", ".dae", ".3ds", ".abc", ".x3d", ".wrl", ".step",
                    ".stp", ".iges", ".igs", ".max", ".ma", ".mb", ".c4d", ".3mf", ".dxf")
EXPORT_HINT = "export them as GLB or OBJ (Blender: File > Export > glTF 2.0)"
TRIMESH_GENERATOR = "https://github.com/mikedh/trimesh"  # glTF asset.generator of trimesh's files (moca3d's, before it named itself)
PART_FORMATS = ("glb", "obj", "ply", "stl")  # MoCAOutput.save_parts' (and --separate's) one-mesh-per-file formats
TRAINED_KEY = "_trained_components"  # model_index.json / adapter_config.json: the most components a training example held (a fine-tune: its base's too)
INSTANCE_MASKS = "instance_masks"  # a generated scene's record of each instance's mask: its label id or file name
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"  # a LoRA adapter folder's files
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # short name -> torch attribute
RESOLUTION_RULE = f"{MIN_RESOLUTION}, {2 * MIN_RESOLUTION} or a multiple of 4 from {4 * MIN_RESOLUTION} to {MAX_RESOLUTION}"


def check_part_files(ext: str, folder: Path, what: str = "parts are written as") -> str:
    """A one-file-per-component format (`PART_FORMATS`), lower case without its dot, and `folder` free to hold the
    files (no file in its place): else a one-line InputError, `what` naming who writes them."""
    ext = ext.lower().lstrip(".")
    if ext not in PART_FORMATS:
        raise InputError(f"{what} {', '.join(PART_FORMATS)}, not '{ext}'")
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} is a file, where the {ext} files of the parts go (a folder)")
    return ext


def shipped_path(value: Any) -> Any:
    """A "src/moca3d/weights/..." path (the README's, a recipe's) -> the installed package's copy when it is not there
    from the current folder (run outside the repository, or moca3d installed from a wheel); other values unchanged."""
    if isinstance(value, (str, Path)) and str(value).startswith(SHIPPED_PREFIX) and not Path(value).exists():
        return type(value)(Path(__file__).resolve().parent / "weights" / str(value)[len(SHIPPED_PREFIX):])
    return value


def check_shift(shift: float) -> float:
    """The timestep shift as a float: finite and > 0, else a one-line InputError (0 or NaN break the sampler's times)."""
    value = float(shift)
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"the timestep shift must be positive and finite, got {shift}")
    return value


def check_resolution(resolution: int, name: str = "--resolution") -> None:
    """The marching-cubes resolution meets RESOLUTION_RULE (one-line ConfigError)."""
    # geometry.extract.vae_extract_config refines a coarse grid of R, R // 2 or R // 4 cells by doublings up to R cells
    valid = isinstance(resolution, numbers.Integral) and (
        resolution in (MIN_RESOLUTION, 2 * MIN_RESOLUTION) or (4 * MIN_RESOLUTION <= resolution <= MAX_RESOLUTION and resolution % 4 == 0))
    if not valid:
        raise ConfigError(f"{name} must be {RESOLUTION_RULE}, got {resolution}")


def resolve_dtype(dtype, device="cpu"):
    """A generation's dtype: a torch dtype, a DTYPES name or its torch name, or "auto" (bf16 on a GPU that has it,
    else fp32: this project's CPUs run bf16 matmuls about 100x slower); a one-line ConfigError otherwise."""
    import torch

    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    elif dtype == "auto":
        gpu = str(device).startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        name = "bfloat16" if gpu else "float32"
    else:
        name = DTYPES.get(dtype, dtype)
    if name not in DTYPES.values():
        raise ConfigError(f"dtype must be auto, {', '.join(DTYPES)} (or float32, bfloat16, float16), got {dtype!r}")
    return getattr(torch, name)


def check_component_count(count, limit: Optional[int] = None, noun: str = "parts", option: Optional[str] = None) -> None:
    """A number of components: a whole number >= 1 within the model's `limit` (one-line InputError, for the CLI and the
    pipeline alike; `option`, e.g. "--parts", names the CLI's)."""
    if not isinstance(count, numbers.Integral) or isinstance(count, bool) or count < 1:
        raise InputError(f"{option or f'the number of {noun}'} must be a whole number >= 1, got {count!r}")
    if limit is not None and count > limit:
        raise InputError(f"{option + ': ' if option else ''}{count} {noun} exceed the model's limit of {limit}")


def check_seed(seed: int, dash: str = "--") -> None:
    """A sampling seed torch.Generator takes: a whole number in [0, MAX_SEED] (one-line ConfigError)."""
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"{dash}seed must be a whole number from 0 to 2^63 - 1, got {seed!r}")


def check_sampling_args(steps: int, guidance: float, resolution: Optional[int], shift: Optional[float] = None, dash: str = "--",
                        seed: Optional[int] = None) -> None:
    """Sampling options of the CLI and the pipeline: steps, guidance, resolution, shift, seed (one-line ConfigErrors, names
    after `dash`; None: not given)."""
    if seed is not None:
        check_seed(seed, dash)
    if not isinstance(steps, numbers.Integral) or steps < 1:
        raise ConfigError(f"{dash}steps must be >= 1 (a whole number), got {steps}")
    if not isinstance(guidance, numbers.Real) or not math.isfinite(guidance):
        raise ConfigError(f"{dash}guidance must be a finite number, got {guidance!r}")
    if guidance < 0:
        raise ConfigError(f"{dash}guidance must be >= 0 (1 = no guidance), got {guidance}")
    if resolution is not None:
        check_resolution(resolution, f"{dash}resolution")
    if shift is not None:
        check_shift(shift)
