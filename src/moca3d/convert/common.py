"""Shared checkpoint plumbing for the converters: strict folder reading, layout checks, assembly.

Every converter follows the same contract (issue 8): the source folder's tensors are checked
against a written layout (first missing / mis-shaped / unexpected key is the error), every
source key is consumed by the mapping, and every parameter of the target model is filled,
either from the source or by an explicit, documented initialisation. No partial loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, Iterable, Mapping, Optional, Tuple, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from moca3d.errors import CheckpointError, one_line
from moca3d.training.checkpoints import check_finite

StateDict = Dict[str, torch.Tensor]
Layout = Dict[str, Tuple[int, ...]]


def read_config(folder: Path, name: str = "config.json") -> dict:
    """The JSON object of a model folder's config file; clear error when missing or unreadable."""
    path = Path(folder) / name
    if not path.is_file():
        raise CheckpointError(f"{folder}: {name} missing")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err.msg})") from None
    except (UnicodeDecodeError, OSError) as err:
        raise CheckpointError(f"{path}: unreadable ({one_line(err, 120)})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def read_safetensors_folder(folder: Path) -> StateDict:
    """All tensors of a model folder: one `*.safetensors` file, or the shards named by an index."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: folder missing")
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        weight_map = read_config(folder, index[0].name).get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index[0]}: 'weight_map' must map tensor names to shard file names")
        outside = next((f for f in weight_map.values() if Path(f).is_absolute() or ".." in Path(f).parts), None)
        if outside is not None:
            raise CheckpointError(f"{index[0]}: shard '{outside}' is outside the folder; shards must sit beside the index")
        files = sorted({folder / f for f in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
        if len(files) > 1:
            raise CheckpointError(f"{folder}: {len(files)} .safetensors files and no index; expected one")
    if not files:
        raise CheckpointError(f"{folder}: no .safetensors weights (pickled checkpoints are not loaded)")
    state: StateDict = {}
    shard_of: dict[str, str] = {}  # tensor name -> the shard it was read from
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"{folder}: shard {path.name} named by the index is missing")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: unreadable safetensors file, truncated or corrupt ({one_line(err, 120)})") from None
        check_finite(tensors, str(path))  # a converted folder would be refused at load anyway
        twice = next((key for key in sorted(tensors) if key in shard_of), None)
        if twice is not None:  # one would silently replace the other; a real index names each tensor once
            raise CheckpointError(f"{folder}: key '{twice}' is in two shards, {shard_of[twice]} and {path.name}; "
                                  "expected each tensor in one shard")
        shard_of.update(dict.fromkeys(tensors, path.name))
        state.update(tensors)
    return state


def source_dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The one floating dtype of a source state dict (float32 when it mixes several): the dtype kept by `dtype=None`."""
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def check_layout(state: Mapping[str, torch.Tensor], layout: Layout, where: Union[str, Path],
                 optional: Iterable[str] = ()) -> None:
    """Raise on the first missing or mis-shaped key of `layout` (in its order), then on the first unexpected key."""
    optional = set(optional)
    for key, shape in layout.items():
        if key not in state:
            raise CheckpointError(f"{where}: key '{key}' missing (expected shape {list(shape)})")
        if tuple(state[key].shape) != tuple(shape):
            raise CheckpointError(f"{where}: key '{key}' has shape {list(state[key].shape)}, expected {list(shape)}")
    extra = [k for k in state if k not in layout and k not in optional]
    if extra:
        raise CheckpointError(f"{where}: unexpected key '{sorted(extra)[0]}' ({len(extra)} unexpected in all); "
                              "not a checkpoint of this architecture/config")


class Consumer:
    """A source state dict that records which keys the mapping read; `finish` fails on leftovers."""

    def __init__(self, state: Mapping[str, torch.Tensor], where: Union[str, Path]):
        self.state, self.where, self.used = dict(state), where, set()

    def __call__(self, key: str) -> torch.Tensor:
        """The tensor under `key`, marked consumed."""
        if key not in self.state:
            raise CheckpointError(f"{self.where}: key '{key}' missing")
        self.used.add(key)
        return self.state[key]

    def finish(self) -> None:
        """Every source key must have been read exactly by the mapping."""
        left = sorted(set(self.state) - self.used)
        if left:
            raise CheckpointError(f"{self.where}: key '{left[0]}' was not consumed by the mapping ({len(left)} in all)")


def split_per_head(weight: torch.Tensor, heads: int, parts: int) -> Tuple[torch.Tensor, ...]:
    """Un-interleave a fused projection whose rows are grouped per head.

    TripoSG computes cat([q, k, v]) (or cat([k, v])) and views it as (heads, parts * d): the rows
    of head h of projection j are rows [h * parts * d + j * d, ... + d) of the concatenation.
    weight: (parts * D, Din) -> `parts` tensors (D, Din).
    """
    rows, din = weight.shape
    d = rows // (parts * heads)
    grouped = weight.reshape(heads, parts, d, din)  # (H, parts, d, Din)
    return tuple(grouped[:, j].reshape(heads * d, din).contiguous() for j in range(parts))


def assemble(model_cls, config: dict, tensors: StateDict, dtype: Optional[torch.dtype] = None,
             where: Union[str, Path] = "checkpoint"):
    """Build `model_cls(**config)` on the meta device and load `tensors`, which must fill every parameter.

    Meta-device construction allocates no memory for the random init, so a 1.5B model costs one
    copy of its weights (in `dtype` when given, e.g. torch.bfloat16; every tensor is cast, so the
    model holds one dtype, and a cast that overflows, e.g. to float16, is refused).
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = model_cls(**config)
    expected = model.state_dict()
    for key, ref in expected.items():
        if key not in tensors:
            raise CheckpointError(f"{where}: target parameter '{key}' was not filled by the conversion")
        if tuple(tensors[key].shape) != tuple(ref.shape):
            raise CheckpointError(f"{where}: target '{key}' got shape {list(tensors[key].shape)}, expected {list(ref.shape)}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise CheckpointError(f"{where}: conversion produced unknown target key '{extra[0]}'")
    cast: Callable[[torch.Tensor], torch.Tensor] = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    tensors = {k: cast(v.contiguous()) for k, v in tensors.items()}
    for key, tensor in tensors.items() if dtype is not None else ():  # the source was finite: only a cast overflows
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{where}: '{key}' overflows {str(dtype).replace('torch.', '')}; convert to bf16 or fp32")
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()
