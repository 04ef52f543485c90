"""What every training recipe shares: JSON round trip with strict keys, and the LR schedule."""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar, Union, get_args, get_origin, get_type_hints

from moca3d.defaults import shipped_path
from moca3d.errors import ConfigError

R = TypeVar("R", bound="Recipe")
_NoneType = type(None)


def type_error(hint: Any, value: Any) -> str | None:
    """What a JSON value of a field annotated `hint` should be, or None when it fits.

    int, float (an int is accepted), bool, str, dict, list, tuple[...] (a JSON list) and Optional[...]
    (null) are checked; a bool is not accepted as a number.
    """
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union:
        if value is None and _NoneType in args:
            return None
        kinds = [a for a in args if a is not _NoneType]
        if any(type_error(a, value) is None for a in kinds):
            return None
        return " or ".join(type_error(a, value) for a in kinds) + (" or null" if _NoneType in args else "")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return "a list"
        items = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(items) != len(value):
            return f"a list of {len(items)} values"
        wrong = next((e for a, v in zip(items, value) if (e := type_error(a, v)) is not None), None)
        return None if wrong is None else f"a list of {len(items)} values, each {wrong}"
    base = origin or hint
    if base is bool:
        return None if isinstance(value, bool) else "true or false"
    if base is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if base is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if base is str:
        return None if isinstance(value, str) else "a string"
    if base is dict:
        return None if isinstance(value, dict) else "a JSON object"
    if base is list:
        return None if isinstance(value, list) else "a list"
    return None  # Any and other annotations: not checked


PATH_KEYS = ("init_from", "image_encoder_from")  # recipe keys naming a model folder


def read_json(path: str | Path, missing: str = "config file not found: {path}") -> Any:
    """The JSON value of a config file: a one-line ConfigError (`missing`, or invalid JSON) otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(missing.format(path=path))
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON ({err})") from None


class Recipe:
    """Mixin for recipe dataclasses: `from_dict` / `from_json` reject unknown keys, then `check()`."""

    recipe_name = "training"
    # a nested model config's key -> its model class, whose defaults fill a key left out (a VAE's "model"; not the
    # DiT's: its transformer and image encoder configs lay over an init pipeline's or the data's)
    nested_models: dict[str, type] = {}

    @classmethod
    def from_dict(cls: type[R], d: dict[str, Any]) -> R:
        """Build from a dict, rejecting unknown keys and values of the wrong type; JSON lists become tuples where the field is one."""
        if not isinstance(d, dict):
            raise ConfigError(f"a {cls.recipe_name} config must be a JSON object of keys and values, got {type(d).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"unknown {cls.recipe_name} config keys: {', '.join(unknown)}")
        hints = get_type_hints(cls)
        for key, value in d.items():
            expected = type_error(hints[key], value)
            if expected is not None:
                raise ConfigError(f"{cls.recipe_name} config key '{key}' must be {expected}, got {json.dumps(value)[:60]}")
        d = {k: (tuple(v) if isinstance(v, list) and "tuple" in str(known[k].type) else shipped_path(v) if k in PATH_KEYS else v)
             for k, v in d.items()}
        cfg = cls(**d)
        cfg.check()
        return cfg

    @classmethod
    def from_json(cls: type[R], path: str | Path) -> R:
        """Read a JSON recipe."""
        return cls.from_dict(read_json(path))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def spent(self, step: int, elapsed_s: float) -> bool:
        """A run at `step` after `elapsed_s` training seconds has used up its steps or its time limit (if it has one)."""
        return step >= self.steps or 0 < getattr(self, "time_limit_s", 0.0) <= elapsed_s

    def check(self) -> None:
        """Raise ConfigError for values out of range (subclasses extend)."""

    def check_positive(self, *names: str) -> None:
        """ConfigError unless every named field is > 0 (and finite)."""
        for name in names:
            value = getattr(self, name)
            if not value > 0 or value == math.inf:  # NaN fails `> 0`
                raise ConfigError(f"{name} must be positive, got {value}")

    def check_schedule(self) -> None:
        """The LR schedule's fields (lr_at): lr > 0, warmup_steps >= 0, min_lr_ratio in [0, 1] (ConfigError)."""
        self.check_positive("lr")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def check_optimizer(self) -> None:
        """The AdamW, clipping, EMA and checkpoint fields a recipe has (ConfigError; NaN fails every check): grad_clip > 0
        (0 would zero the gradients, a negative one reverse them), weight_decay >= 0, betas and ema_decay in [0, 1),
        keep_checkpoints >= 0 (0: every one)."""
        self.check_positive("grad_clip")
        if not 0 <= self.weight_decay < math.inf:
            raise ConfigError(f"weight_decay must be >= 0 and finite, got {self.weight_decay}")
        betas = getattr(self, "betas", (0.0, 0.0))
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(0 <= b < 1 for b in betas)):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {betas}")
        if not 0 <= getattr(self, "ema_decay", 0.0) < 1:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not getattr(self, "keep_checkpoints", 0) >= 0:
            raise ConfigError(f"keep_checkpoints must be >= 0 (0: keep every one), got {self.keep_checkpoints}")

    def check_model_keys(self, name: str, model_class: type) -> None:
        """ConfigError for keys of the nested model config `name` that `model_class` does not take."""
        params = inspect.signature(model_class.__init__).parameters
        unknown = sorted(set(getattr(self, name) or {}) - set(params) - {"_class_name", "_diffusers_version"})
        if unknown:
            raise ConfigError(f"unknown {name} config keys: {', '.join(unknown)}")


RESUMABLE_KEYS = ("steps", "time_limit_s", "num_threads", "log_every", "checkpoint_every", "keep_checkpoints",
                  "validate_every")  # a run may resume with these changed; any other change is refused


def _absolute(value: str | Path) -> str:
    """A path as the current folder reads it: absolute, symbolic links resolved."""
    return str(Path(value).expanduser().resolve())


def origin_path(config_path: Path) -> Path:
    """The file beside a run's recipe (`record_run_config`) saying where the run folder was when the recipe was recorded,
    and where its paths (PATH_KEYS) then pointed: what lets a moved run folder, or a path spelled another way, resume."""
    return config_path.with_name(config_path.stem + ".origin.json")


def _origin(config_path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """What `origin_path` holds for `record` recorded now in `config_path`."""
    return {"run_folder": _absolute(config_path.parent),
            "paths": {k: [v, _absolute(v)] for k in PATH_KEYS if isinstance(v := record.get(k), str) and v}}


def record_run_config(config_path: Path, record: dict[str, Any]) -> None:
    """Write a run's recipe (`record`, JSON-ready) to `config_path`, and beside it where it was and what its paths meant."""
    from moca3d.training.checkpoints import atomic_write_json

    atomic_write_json(record, config_path)
    atomic_write_json(_origin(config_path, record), origin_path(config_path))


def _read_origin(config_path: Path) -> dict[str, Any]:
    """`origin_path`'s contents, or {} for a run recorded without it (or an unreadable one)."""
    try:
        origin = json.loads(origin_path(config_path).read_text())
    except (OSError, ValueError):
        return {}
    return origin if isinstance(origin, dict) else {}


def recorded_recipe(config_path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """A run's recorded recipe `record` as a resume from the current folder reads it: a relative path (PATH_KEYS) that
    does not exist from here, but did from where the run was recorded (`origin_path`), made that absolute path."""
    recipe, paths = dict(record), _read_origin(config_path).get("paths") or {}
    for key, value in recipe.items():
        spelled = paths.get(key)
        if key in PATH_KEYS and isinstance(value, str) and value and not Path(value).expanduser().exists() \
                and isinstance(spelled, list) and len(spelled) == 2 and spelled[0] == value and Path(spelled[1]).exists():
            recipe[key] = spelled[1]
    return recipe


def _same_path(key: str, old: Any, new: Any, origin: dict[str, Any], run_folder: Path) -> bool:
    """Recorded path value `old` and `new` name the same folder: the same once made absolute (relative paths from the
    current folder, or as the recipe's origin recorded them), or the same place inside the folder that holds the run
    folder (a work folder of runs), where that folder was then and where it is now: a work folder moved as a whole."""
    if old == new:
        return True
    if not (isinstance(old, str) and isinstance(new, str) and old and new):
        return False
    recorded = (origin.get("paths") or {}).get(key)
    was = Path(recorded[1] if isinstance(recorded, list) and len(recorded) == 2 and recorded[0] == old else _absolute(old))
    now = Path(_absolute(new))
    if was == now:
        return True
    if not isinstance(origin.get("run_folder"), str):
        return False  # where the run was is not known: a moved run folder cannot be told from another path
    work_was, work_now = Path(origin["run_folder"]).parent, Path(_absolute(run_folder)).parent
    return was.is_relative_to(work_was) and now.is_relative_to(work_now) \
        and was.relative_to(work_was) == now.relative_to(work_now)


def recipe_defaults(cls: type) -> dict[str, Any]:
    """A recipe class's field defaults, JSON-ready (tuples as lists), as `Recipe.to_dict` writes them."""
    out = {}
    for f in fields(cls):
        value = f.default_factory() if f.default_factory is not MISSING else f.default
        if value is not MISSING:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def model_defaults(cls: type) -> dict[str, dict[str, Any]]:
    """The keyword defaults of each nested model config of a recipe class (`nested_models`), JSON-ready, by recipe key:
    what a model config that leaves a key out builds with."""
    return {key: {p.name: list(p.default) if isinstance(p.default, tuple) else p.default
                  for p in inspect.signature(model.__init__).parameters.values() if p.default is not inspect.Parameter.empty}
            for key, model in getattr(cls, "nested_models", {}).items()}


def _filled(record: dict[str, Any], nested: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`record` with each nested model config completed by its model's defaults (`model_defaults`)."""
    return {k: {**nested[k], **v} if k in nested and isinstance(v, dict) else v for k, v in record.items()}


def recipe_changes(config_path: Path, record: dict[str, Any], defaults: Optional[dict[str, Any]] = None,
                   nested: Optional[dict[str, dict[str, Any]]] = None) -> list[str]:
    """The keys in which `record` (a JSON-ready recipe) differs from the run's recipe at `config_path`, sorted; a path
    (PATH_KEYS) that names the same folder (`_same_path`) is no change, nor a key added to the recipe class after the run
    was recorded whose value is its default (`defaults`, `recipe_defaults`), nor a nested model config key left out on
    one side and given its model's default on the other (`nested`, `model_defaults`)."""
    old, origin = {**(defaults or {}), **json.loads(config_path.read_text())}, _read_origin(config_path)
    old, record = _filled(old, nested or {}), _filled(record, nested or {})
    return sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k)
                  and not (k in PATH_KEYS and _same_path(k, old.get(k), record.get(k), origin, config_path.parent)))


def check_resume(config_path: Path, cfg: Recipe | dict[str, Any], say: Callable[[str], None],
                 defaults: Optional[dict[str, Any]] = None) -> Callable[[], None]:
    """Resuming the run of `config_path` (its recipe as started) with `cfg` (a recipe, or the JSON-ready record the run
    writes, then with its class's `recipe_defaults`): a change outside RESUMABLE_KEYS is a ConfigError now; the
    returned function says and records changes of those, and paths that name the same folder another way (moved with
    the run's work folder, or relative instead of absolute): the caller calls it once the resume is accepted (its
    checkpoint loaded, its data checked), so a refused resume leaves the record as it was. A key the recipe class
    gained since the run was recorded, at its default, is no change."""
    nested = {}
    if not isinstance(cfg, dict):
        defaults, nested, cfg = recipe_defaults(type(cfg)), model_defaults(type(cfg)), cfg.to_dict()
    old, new = {**(defaults or {}), **json.loads(config_path.read_text())}, cfg
    changed = recipe_changes(config_path, new, defaults, nested)
    fixed = [k for k in changed if k not in RESUMABLE_KEYS]
    if fixed:
        full_old, full_new = _filled(old, nested), _filled(new, nested)
        pairs = [pair for k in fixed for pair in _leaf_changes(k, full_old.get(k), full_new.get(k))]
        diff = ", ".join(f"{k} {json.dumps(a)[:40]} -> {json.dumps(b)[:40]}" for k, a, b in pairs[:3])
        diff += f" and {len(pairs) - 3} more" if len(pairs) > 3 else ""  # (all of them: diff the two recipe files)
        raise ConfigError(f"{config_path.parent} was started with another recipe ({diff}): resume with its own "
                          f"({config_path.name}), or train into a new output folder")
    respelled = sorted(k for k in PATH_KEYS if old.get(k) != new.get(k) and k not in changed)

    def record() -> None:
        if changed or respelled:
            said = [f"{k} {old.get(k)} -> {new.get(k)}" for k in changed]
            said += [f"{k} {new.get(k)} (recorded as {old.get(k)}: the same folder, moved with the run or spelled from here)"
                     for k in respelled]
            say("resuming with " + ", ".join(said))
            record_run_config(config_path, new)
        elif _read_origin(config_path) != _origin(config_path, new):  # recorded without one, or the run folder moved
            from moca3d.training.checkpoints import atomic_write_json

            atomic_write_json(_origin(config_path, new), origin_path(config_path))

    return record


def _leaf_changes(key: str, old: Any, new: Any) -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) of each value that differs, inside nested dicts ("transformer.width 64 -> 32", not two
    cut-off JSON objects)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [pair for k in sorted(set(old) | set(new)) for pair in _leaf_changes(f"{key}.{k}", old.get(k), new.get(k))]
    return [(key, old, new)] if old != new else []


def data_identity(ids: list[str]) -> dict[str, Any]:
    """What a run trains on, recorded in its checkpoints: the asset count and a hash of the sorted asset ids (the same
    for a split's folder and its latent cache)."""
    return {"assets": len(ids), "ids_sha1": hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()}


def check_same_data(recorded: Optional[dict[str, Any]], ids: list[str], run: Path, data_dir, restart: str = "") -> None:
    """ConfigError when a run resumes on other assets than its checkpoints recorded (`data_identity`; None: a checkpoint
    written before the record existed, accepted); `restart` says how a new run starts from its weights."""
    current = data_identity(ids)
    if recorded is None or recorded == current:
        return
    was, now = (f"{n} asset{'' if n == 1 else 's'}" for n in (recorded["assets"], current["assets"]))
    raise ConfigError(f"{run} was trained on other data ({was}) than {data_dir} gives ({now}, other ids): resume on "
                      f"its own data, or start a new run from its weights{f' ({restart})' if restart else ''}")


def lr_at(step: int, cfg) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at cfg.steps (step from 0)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
