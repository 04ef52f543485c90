"""Training checkpoints in safetensors + JSON (never pickle), written atomically; and an EMA.

Layout of a run directory:

    OUT/checkpoints/step_00001000/   model.safetensors, ema.safetensors (optional),
                                     optimizer.safetensors, rng.safetensors, state.json
    OUT/checkpoints/step_00002000/   ...

A run that trains only part of its model (LoRA on a large prior, a frozen encoder) passes
`frozen=frozen_fingerprint(model)`: its frozen parameters, rebuilt from the run's source weights on a
resume, are then left out of model.safetensors (a LoRA checkpoint of TripoSG holds its 2 GB of trained
state, not its 6 GB base too) and only their fingerprint is kept, so a resume onto other base weights is refused.

A checkpoint directory is built under a temporary name and renamed into place with
`os.replace`, so an interrupted write never leaves a half-written `step_*` directory; `state.json`
is written last and marks a complete checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moca3d.errors import CheckpointError, ConfigError, warn_input

CHECKPOINT_DIR = "checkpoints"
STEP_PATTERN = re.compile(r"^step_(\d{8})$")
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------
# Atomic file helpers
# ----------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    """Flush a directory entry to disk (best effort; not every platform allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError naming the first floating tensor with NaN/Inf values."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{source}: tensor '{name}' contains NaN/Inf values; refusing it")


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: Optional[dict[str, str]] = None) -> None:
    """Write a safetensors file via a temporary file and `os.replace` (all or nothing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_finite(tensors, str(path))
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # readable as any written file (mkstemp's are the owner's alone)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(path.parent)


def finite_json(obj: Any) -> Any:
    """`obj` with every NaN or infinite float replaced by None (JSON null): standard JSON, which any parser reads."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def atomic_write_json(obj: Any, path: str | Path, sort_keys: bool = True) -> None:
    """Write standard JSON (NaN and infinities as null) via a temporary file and `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide reports and configs from other users
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(finite_json(obj), fh, indent=2, sort_keys=sort_keys, allow_nan=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def state_dict_mismatch(module: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """What keeps `state` from loading strictly into `module`, as one line ('' when nothing does)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    reshaped = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors missing (e.g. '{missing[0]}')")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors unexpected (e.g. '{unexpected[0]}')")
    if reshaped:
        k = reshaped[0]
        problems.append(f"{len(reshaped)} of another shape (e.g. '{k}': {tuple(state[k].shape)}, the model has {tuple(own[k].shape)})")
    return "; ".join(problems)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file on CPU, refusing missing files and NaN/Inf values."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from err
    check_finite(tensors, str(path))
    return tensors


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file."""
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


# ----------------------------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a model's trainable floating-point parameters and its buffers.

    decay_t = min(decay, (1 + t) / (warmup + t)), so early averages follow the model closely. A frozen
    parameter (a LoRA base layer, a frozen encoder) is its own average: it is not copied, nor saved with the
    averages; `copy_to` takes it from the model (a reference to its Parameter, wherever the model moves).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: int = 10):
        if not 0.0 <= decay < 1.0:
            raise CheckpointError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.frozen = {name: p for name, p in model.named_parameters() if not p.requires_grad}
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point() and k not in self.frozen}

    def current_decay(self) -> float:
        """Decay used by the next update."""
        return min(self.decay, (1 + self.num_updates) / (self.warmup + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- d * shadow + (1 - d) * model."""
        d = self.current_decay()
        state = model.state_dict()
        names = list(self.shadow)
        if names and self.shadow[names[0]].device != state[names[0]].device:  # follow the model (e.g. onto the GPU)
            self.shadow = {k: v.to(state[k].device) for k, v in self.shadow.items()}
        averages = [self.shadow[k] for k in names]
        torch._foreach_lerp_(averages, [state[k].detach().to(a.dtype) for k, a in zip(names, averages)], 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights, and the frozen ones as they are, into `model` (e.g. a fresh one)."""
        model.load_state_dict({**{k: p.detach() for k, p in self.frozen.items()}, **self.shadow}, strict=False)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged tensors (scalars live in `scalars`)."""
        return dict(self.shadow)

    def scalars(self) -> dict[str, Any]:
        """JSON-serialisable state."""
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates}

    def load(self, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
        """Restore from `state_dict()` and `scalars()`."""
        missing = set(self.shadow) - set(tensors)
        if missing:
            raise CheckpointError(f"EMA state lacks {len(missing)} tensors, e.g. '{sorted(missing)[0]}'")
        for name in self.shadow:
            self.shadow[name].copy_(tensors[name])
        self.decay = float(scalars["decay"])
        self.warmup = int(scalars["warmup"])
        self.num_updates = int(scalars["num_updates"])


# ----------------------------------------------------------------------------------------------
# Optimizer and RNG state without pickle
# ----------------------------------------------------------------------------------------------


def optimizer_to_safetensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors ('state.<param>.<name>') and JSON scalars."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, pstate in sd["state"].items():
        for name, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{name}"] = value
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"state_scalars": scalars, "param_groups": sd["param_groups"]}


def optimizer_from_safetensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Inverse of `optimizer_to_safetensors`; loads into `optimizer`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for key, value in meta["state_scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"optimizer state does not match this model: {err}") from err


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Torch (CPU, CUDA), NumPy and Python RNG states as tensors + JSON."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    version, py_state, gauss_next = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)],
            "python": [version, list(py_state), gauss_next]}
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Inverse of `capture_rng`."""
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, py_state, gauss_next = meta["python"]
    random.setstate((version, tuple(py_state), gauss_next))


# ----------------------------------------------------------------------------------------------
# Frozen parameters: fingerprinted, not stored
# ----------------------------------------------------------------------------------------------


def frozen_names(model: nn.Module) -> list[str]:
    """Names of the model's parameters that get no gradient (a LoRA base layer, a frozen encoder)."""
    return [name for name, p in model.named_parameters() if not p.requires_grad]


def frozen_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of the frozen parameters, a tied (shared) parameter under each of its names."""
    return {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def fingerprint(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """{"tensors": count, "sha256": hash of their names, shapes, dtypes and bytes, in the dict's order} (about 1 s
    per GiB on a 2-core CPU)."""
    digest = hashlib.sha256()  # with the CPU's SHA instructions 2.5x faster than blake2b here
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().data if tensor.numel() else b"")
    return {"tensors": len(tensors), "sha256": digest.hexdigest()}


def frozen_fingerprint(model: nn.Module) -> Optional[dict[str, Any]]:
    """The `fingerprint` of the frozen parameters, or None when all train (computed once per run, and passed to
    `load_checkpoint`)."""
    params = dict(model.named_parameters())
    names = frozen_names(model)  # parameter order is the model's definition order: the same on every rebuild
    return fingerprint({name: params[name] for name in names}) if names else None


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """What `load_checkpoint` restored: the step and the caller's extra JSON state."""

    path: Path
    step: int
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """Directory of the checkpoint of `step` inside a run directory."""
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_PATTERN.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_PATTERN.match(p.name).group(1)))


def trim_log(path: Path, step: int) -> None:
    """Drop the records of a JSON-lines log past `step` (and a line cut by a kill), atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line + "\n")
        except json.JSONDecodeError:
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


RUN_LOCK = ".training"  # a run folder's record of the process training in it: {"host", "pid"}


def claim_run(run_dir: str | Path, record: bool = True) -> None:
    """Record this process as the one training in `run_dir` (RUN_LOCK); ConfigError when a live process of this host
    holds it (two jobs writing one run overwrite each other's checkpoints). A record of a process that is gone, of this
    process, or of another host (a requeued job's old node cannot be asked) is taken over. `record=False`: the check
    alone (before any loading; nothing written)."""
    lock = Path(run_dir) / RUN_LOCK
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    try:
        holder = json.loads(lock.read_text())
        pid = int(holder["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        holder, pid = None, None
    if holder and holder.get("host") == me["host"] and pid != me["pid"]:
        try:
            os.kill(pid, 0)  # no signal: only whether it exists
            alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:  # another user's
            alive = True
        if alive:
            raise ConfigError(f"{run_dir} is being trained by process {pid} on this machine: wait for it or stop it "
                              f"(a stale record? delete {lock})")
    if record:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_json(me, lock)


def release_run(run_dir: str | Path) -> None:
    """Remove this process's RUN_LOCK record of `run_dir` (another process's is left)."""
    lock = Path(run_dir) / RUN_LOCK
    try:
        if json.loads(lock.read_text()).get("pid") == os.getpid():
            lock.unlink()
    except (OSError, ValueError):
        pass


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """Most recent complete checkpoint of a run, or None; a newer step folder without its state.json is warned about
    (a kill cannot leave one: checkpoints are renamed into place whole)."""
    found = list_checkpoints(run_dir)
    newest = int(STEP_PATTERN.match(found[-1].name).group(1)) if found else -1
    root = Path(run_dir) / CHECKPOINT_DIR
    broken = sorted(p.name for p in root.iterdir() if (m := STEP_PATTERN.match(p.name)) and int(m.group(1)) > newest
                    and not (p / "state.json").is_file()) if root.is_dir() else []
    if broken:
        warn_input(f"{root}: {', '.join(broken)} left out (no state.json: incomplete or damaged); "
                   f"{'resuming from ' + found[-1].name if found else 'no complete checkpoint'}")
    return found[-1] if found else None


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    ema: Optional[EMA] = None, extra: Optional[dict[str, Any]] = None, keep_last: int = 3,
                    frozen: Optional[dict[str, Any]] = None) -> Path:
    """Write the checkpoint of `step` atomically and keep only the newest `keep_last` ones.

    With `frozen` (the run's `frozen_fingerprint(model)`, computed once) the frozen parameters are left out and
    the fingerprint recorded instead. Refuses (CheckpointError) to write tensors containing NaN/Inf.
    """
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o755)  # (mkdtemp's folders are the owner's alone)
    try:
        state: dict[str, Any] = {"format_version": FORMAT_VERSION, "step": int(step), "extra": extra or {}}
        weights = model.state_dict()
        if frozen is not None:
            count = len(frozen_names(model))
            if count != frozen["tensors"]:
                raise CheckpointError(f"the model has {count} frozen parameters, its fingerprint {frozen['tensors']}")
            left_out = frozen_keys(model)  # every name of a tied frozen parameter: none keeps a copy of the base
            weights = {k: v for k, v in weights.items() if k not in left_out}
            state["frozen"] = frozen
        atomic_save_tensors(weights, tmp / "model.safetensors")
        if ema is not None:
            atomic_save_tensors(ema.state_dict(), tmp / "ema.safetensors")
            state["ema"] = ema.scalars()
        if optimizer is not None:
            tensors, meta = optimizer_to_safetensors(optimizer)
            atomic_save_tensors(tensors, tmp / "optimizer.safetensors")
            state["optimizer"] = meta
        rng_tensors, rng_meta = capture_rng()
        atomic_save_tensors(rng_tensors, tmp / "rng.safetensors")
        state["rng"] = rng_meta
        atomic_write_json(state, tmp / "state.json")  # last: marks the checkpoint complete
        if final.exists():
            _remove_checkpoint(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            _remove_checkpoint(old)
    for debris in final.parent.iterdir():  # an older step folder without state.json: a kill cut its removal (as before)
        match = STEP_PATTERN.match(debris.name)
        if match and int(match.group(1)) < step and not (debris / "state.json").is_file():
            _remove_checkpoint(debris)
    for stale in final.parent.glob(".step_*.tmp"):  # left by a run killed while saving (one process saves at a time)
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _remove_checkpoint(folder: Path) -> None:
    """Delete a checkpoint folder: renamed to a hidden .tmp name first, so a kill midway leaves what the next save
    clears, not a step folder without its state.json."""
    trash = folder.parent / f".{folder.name}.tmp"
    try:
        os.replace(folder, trash)
    except OSError:
        trash = folder
    shutil.rmtree(trash, ignore_errors=True)


def checkpoint_extra(path: str | Path) -> dict[str, Any]:
    """The `extra` record of a checkpoint's state.json (what its run noted: vae_dir, elapsed_s, ...); {} when the file is
    missing or damaged (resuming from it, `load_checkpoint` names the damage)."""
    try:
        extra = json.loads((Path(path) / "state.json").read_text()).get("extra", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return extra if isinstance(extra, dict) else {}


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    ema: Optional[EMA] = None, restore_rng_state: bool = True,
                    frozen: Union[dict[str, Any], None, str] = "compute") -> Checkpoint:
    """Load a checkpoint directory into the given objects; refuses NaN/Inf tensors.

    `frozen`: the model's `frozen_fingerprint`, when the caller has it already (else it is computed here, if needed).
    """
    path = Path(path)
    state_file = path / "state.json"
    if not state_file.is_file():
        raise CheckpointError(f"not a complete checkpoint (no state.json): {path}")
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{state_file}: corrupt JSON ({err}); delete {path} to resume from the checkpoint before it") from err

    def read(name: str) -> dict[str, torch.Tensor]:
        """One of the checkpoint's tensor files; a damaged one says how to resume from the checkpoint before."""
        try:
            return load_tensors(path / name)
        except CheckpointError as err:
            raise CheckpointError(f"{err}; delete {path} to resume from the checkpoint before it") from None

    weights = read("model.safetensors")
    if "frozen" in state:  # left out: the model must already hold the very frozen weights the run trained beside
        mine = frozen_fingerprint(model) if frozen == "compute" else frozen
        if mine != state["frozen"]:
            have = f"{mine['tensors']} frozen tensors" if mine else "no frozen tensors"
            raise CheckpointError(f"{path}: saved without its {state['frozen']['tensors']} frozen tensors, and this model's"
                                  f" frozen weights differ from the run's ({have}; was init_from or the base model changed?)")
        left_out = frozen_keys(model)
        weights = {**{k: v for k, v in model.state_dict().items() if k in left_out}, **weights}
    problem = state_dict_mismatch(model, weights)
    if problem:
        raise CheckpointError(f"{path}: weights do not fit this model: {problem}")
    model.load_state_dict(weights, strict=True)
    if ema is not None:
        if "ema" not in state:
            raise CheckpointError(f"{path}: no EMA state in this checkpoint")
        ema.load(read("ema.safetensors"), state["ema"])
    if optimizer is not None:
        if "optimizer" not in state:
            raise CheckpointError(f"{path}: no optimizer state in this checkpoint")
        optimizer_from_safetensors(optimizer, read("optimizer.safetensors"), state["optimizer"])
    if restore_rng_state:
        restore_rng(read("rng.safetensors"), state["rng"])
    return Checkpoint(path=path, step=int(state["step"]), extra=state.get("extra", {}))
