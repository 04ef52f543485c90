"""LoRA fine-tuning of any of our models (peft): inject low-rank adapters, train them, fold them back.

One definition for the scene encoder (DESIGN.md §4: LoRA on the widened image encoder) and the MoCA
transformer (fine-tuning a large prior such as TripoSG on one GPU: the base weights get no gradients
and no optimizer state). After `add_lora` only the adapters and the modules named in `train_full`
train; `merge_lora` folds the adapters into their base layers, so the model saves and loads as a
plain one. `save_adapter` / `read_adapter` keep what a fine-tune changed apart from its base (megabytes
beside TripoSG's 6 GB), for `MoCAPipeline.from_pretrained(base, lora=folder)`: an object fine-tune's transformer
adapters, or a scene fine-tune's (`condition` "scene"), which also widen and adapt the base's encoder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

from torch import nn

from moca3d.defaults import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from moca3d.errors import CheckpointError, ConfigError

LORA_ADAPTER = "default"
LORA_SPEC = ("rank", "alpha", "target_modules", "train_full")  # how LoRA was injected into a module: `add_lora`'s arguments
# the adapter folders of each condition, and what writes them
ADAPTER_SOURCES = {"object": "`moca3d train --lora-rank`", "scene": "`moca3d train-scene --lora-rank`"}


def within(path: str, names: Iterable[str]) -> bool:
    """True when the module at `path` is, or is inside, a module named in `names`: a full attribute path
    ("blocks.0.attn1") or the tail of one ("attn1.router", "router": every block's router)."""
    parts = path.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(p == n or p.endswith("." + n) for n in names for p in prefixes)


def linear_layers(module: nn.Module, skip: Iterable[str] = ()) -> list[str]:
    """Names of the module's nn.Linear layers, except those `within` a module named in `skip`."""
    skip = list(skip)
    return [name for name, m in module.named_modules() if isinstance(m, nn.Linear) and not within(name, skip)]


def add_lora(module: nn.Module, rank: int, alpha: Optional[float] = None, dropout: float = 0.0,
             target_modules: Optional[list[str]] = None, train_full: Iterable[str] = ()) -> nn.Module:
    """Inject LoRA adapters into `target_modules` (default: every nn.Linear outside `train_full`), in place.

    Afterwards only the adapters (lora_A starts random, lora_B at zero: the output is unchanged) and
    the parameters `within` the submodules named in `train_full` (e.g. "router": every block's
    router) require gradients.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ConfigError(f"LoRA rank must be >= 1, got {rank}")
    if alpha is not None and alpha <= 0:
        raise ConfigError(f"LoRA alpha must be positive, got {alpha}")
    if not 0 <= dropout < 1:
        raise ConfigError(f"LoRA dropout must be in [0, 1), got {dropout}")
    full = list(train_full)
    targets = target_modules or linear_layers(module, skip=full)
    if not targets:
        raise ConfigError(f"{type(module).__name__} has no linear layers to adapt with LoRA")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                        target_modules=targets, bias="none")
    inject_adapter_in_model(config, module, adapter_name=LORA_ADAPTER)
    for name, param in module.named_parameters():
        param.requires_grad_(is_lora_parameter(name) or within(name, full))
    return module


def is_lora_parameter(name: str) -> bool:
    """True for the parameters peft's LoRA adds (lora_A / lora_B / lora_embedding_*)."""
    return any(part.startswith("lora_") for part in name.split("."))


def has_lora(module: nn.Module) -> bool:
    """True when LoRA adapters are injected somewhere in `module`."""
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in module.modules())


def merge_lora(module: nn.Module) -> int:
    """Fold every LoRA adapter into its base layer and remove the wrappers, in place; returns how many.

    The result has the plain layer names again, so it saves and loads as an ordinary model.
    """
    if not any(is_lora_parameter(name) for name, _ in module.named_parameters()):
        return 0  # nothing to fold, and no peft import (seconds) on every export of a full fine-tune
    from peft.tuners.lora import LoraLayer

    wrapped = [name for name, m in module.named_modules() if isinstance(m, LoraLayer)]
    for name in wrapped:
        layer = module.get_submodule(name)
        layer.merge(adapter_names=[LORA_ADAPTER])
        parent_path, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_path) if parent_path else module
        setattr(parent, child, layer.get_base_layer())
    return len(wrapped)


def trainable_summary(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ----------------------------------------------------------------------------------------------
# Adapter folders: what a LoRA fine-tune changed, applied later to the base it was trained from
# ----------------------------------------------------------------------------------------------



def lora_targets(module: nn.Module) -> list[str]:
    """Names of the layers of `module` that carry LoRA adapters."""
    from peft.tuners.lora import LoraLayer

    return [name for name, m in module.named_modules() if isinstance(m, LoraLayer)]


def lora_spec(module: nn.Module, rank: int, alpha: Optional[float], train_full: Iterable[str]) -> dict:
    """How LoRA was injected into `module`, the `LORA_SPEC` of an adapter config: `add_lora(base, **spec)` repeats it."""
    return dict(zip(LORA_SPEC, (rank, alpha or rank, lora_targets(module), list(train_full))))


def save_adapter(folder: Path, module: nn.Module, config: dict, whole: Iterable[str] = ()) -> Path:
    """Write `module`'s trainable tensors (adapters and fully trained parts), every tensor `within` the submodules
    named in `whole` (a part the base lacks), and `config`; the config last, so a folder with it is complete."""
    from moca3d.training.checkpoints import atomic_save_tensors, atomic_write_json

    folder = Path(folder)
    (folder / ADAPTER_CONFIG).unlink(missing_ok=True)  # over an earlier export: incomplete until the end
    whole = list(whole)
    tensors = {name: p.detach() for name, p in module.named_parameters() if p.requires_grad or within(name, whole)}
    atomic_save_tensors(tensors, folder / ADAPTER_WEIGHTS)
    atomic_write_json(config, folder / ADAPTER_CONFIG)
    return folder


def read_adapter(folder: Path) -> tuple[dict, dict]:
    """(config, tensors) of an adapter folder written by `save_adapter`; CheckpointError when it is not one."""
    from moca3d.training.checkpoints import load_tensors

    config = read_adapter_config(folder)
    return config, load_tensors(Path(folder) / ADAPTER_WEIGHTS)


def adapter_condition(config: dict) -> str:
    """What an adapter's fine-tune conditions on: "object" (`moca3d train`; adapters from before scene ones say
    nothing) or "scene" (`moca3d train-scene`: the encoder widened to 7 channels and adapted too)."""
    return config.get("condition", "object")


def read_adapter_config(folder: Path, condition: Optional[str] = None) -> dict:
    """The config of an adapter folder, checked (cheap: a wrong --lora is refused before its base model loads);
    with `condition`, an adapter of the other kind is refused too."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such LoRA adapter folder")
    if not (folder / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"{folder}: not a LoRA adapter folder ({ADAPTER_CONFIG} missing)")
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG}: corrupt JSON ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{folder / ADAPTER_CONFIG}: not a moca3d LoRA adapter (not a JSON object)")
    missing = [k for k in (*LORA_SPEC, "base_fingerprint") if k not in config]
    kind = adapter_condition(config)
    if not isinstance(kind, str) or kind not in ADAPTER_SOURCES:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG}: adapter of an unknown condition {kind!r} (known: {', '.join(ADAPTER_SOURCES)})")
    if kind == "scene":  # the encoder's LoRA and widening, beside the transformer's
        encoder = config.get("image_encoder")
        missing += [f"image_encoder.{k}" for k in (*LORA_SPEC, "widen_init") if not isinstance(encoder, dict) or k not in encoder]
    if missing:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG}: not a moca3d LoRA adapter (no {', '.join(missing)})")
    if condition is not None and kind != condition:
        raise CheckpointError(f"{folder}: a LoRA adapter for {kind}s (OUT/lora of {ADAPTER_SOURCES[kind]}); this needs one for "
                              f"{condition}s (OUT/lora of {ADAPTER_SOURCES[condition]})")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{folder}: {ADAPTER_WEIGHTS} missing beside {ADAPTER_CONFIG}")
    return config
