"""What every training recipe shares: JSON round trip with strict keys, and the LR schedule."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, TypeVar

from moca3d.errors import ConfigError

R = TypeVar("R", bound="Recipe")


class Recipe:
    """Mixin for recipe dataclasses: `from_dict` / `from_json` reject unknown keys, then `check()`."""

    recipe_name = "training"

    @classmethod
    def from_dict(cls: type[R], d: dict[str, Any]) -> R:
        """Build from a dict, rejecting unknown keys; JSON lists become tuples where the field is one."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"unknown {cls.recipe_name} config keys: {', '.join(unknown)}")
        d = {k: (tuple(v) if isinstance(v, list) and "tuple" in str(known[k].type) else v) for k, v in d.items()}
        cfg = cls(**d)
        cfg.check()
        return cfg

    @classmethod
    def from_json(cls: type[R], path: str | Path) -> R:
        """Read a JSON recipe."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: invalid JSON ({err})") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def check(self) -> None:
        """Raise ConfigError for values out of range (subclasses extend)."""

    def check_positive(self, *names: str) -> None:
        """ConfigError unless every named field is > 0."""
        for name in names:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")


def lr_at(step: int, cfg) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at cfg.steps (step from 0)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
