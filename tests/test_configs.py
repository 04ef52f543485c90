"""Every shipped recipe in configs/ parses strictly (unknown keys and bad values are errors) and builds its models."""

import json
import re
from pathlib import Path

import pytest

from moca3d.training.pretrain_encoder import EncoderPretrainConfig
from moca3d.training.train_dit import DiTTrainConfig
from moca3d.training.train_vae import VAETrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_RECIPES = ["default.json", "default_cpu.json", "smoke.json"]  # train-default recipes: dataset size + each training stage's config


def recipe_kind(path: Path) -> str:
    """'vae', 'dit' or 'default' from a recipe file's keys."""
    keys = json.loads(path.read_text()).keys()
    if "vae_config" in keys:
        return "default"
    if "grid_resolution" in keys:
        return "encoder"
    if "freeze_encoder" in keys or "num_query_points" in keys:
        return "vae"
    return "dit" if "transformer" in keys or "init_from" in keys else "vae"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.json")), ids=lambda p: p.name)
def test_recipe_parses(path):
    kind = recipe_kind(path)
    if kind == "default":
        spec = json.loads(path.read_text())
        VAETrainConfig.from_json(CONFIGS / spec["vae_config"])
        DiTTrainConfig.from_json(CONFIGS / spec["dit_config"])
        assert spec["objects"] > 0 and 0 <= spec["val_fraction"] + spec["test_fraction"] < 1
        known = {"objects", "seed", "num_surface", "num_queries", "val_fraction", "test_fraction", "encoder_points",
                 "vae_config", "dit_config", "dit_extra_objects", "dit_extra_num_queries", "vae_finetune_config",
                 "dit_continue_config", "encoder_pretrain_config"}
        assert set(spec) <= known, f"unknown recipe keys {set(spec) - known}"
        if spec.get("vae_finetune_config"):  # train-default points it at its own first VAE
            assert VAETrainConfig.from_json(CONFIGS / spec["vae_finetune_config"]).freeze_encoder
        from moca3d.commands.default import continue_stages, stage_config

        for name, start in continue_stages(spec):  # train-default points each at the previous stage's pipeline
            stage = stage_config(name, start, Path("runs/previous/pipeline"))
            if start == "encoder":  # a new transformer from the recipe's own config, on the previous encoder
                assert stage.image_encoder_from == "runs/previous/pipeline/image_encoder" and not stage.init_from
                assert DiTTrainConfig.from_json(CONFIGS / name).transformer
            else:
                assert stage.init_from == "runs/previous/pipeline" and not stage.image_encoder_from
        if spec.get("encoder_pretrain_config"):  # its encoder replaces the DiT recipe's own
            EncoderPretrainConfig.from_json(CONFIGS / spec["encoder_pretrain_config"])
        if spec.get("dit_extra_objects"):
            assert spec["dit_extra_num_queries"] > 0
    elif kind == "encoder":
        from moca3d.training.pretrain_encoder import build_predictor

        build_predictor(EncoderPretrainConfig.from_json(path))
    elif kind == "vae":
        from moca3d.models.vae import VecSetVAE

        cfg = VAETrainConfig.from_json(path)
        cfg.check()
        if cfg.init_from:  # a fine-tuning recipe starts from a folder of this repository (the shipped VAE)
            assert (CONFIGS.parent / cfg.init_from / "config.json").is_file(), cfg.init_from
        VecSetVAE(**cfg.model)
    else:
        cfg = DiTTrainConfig.from_json(path)
        if cfg.image_encoder_from and cfg.init_from:  # a scene recipe: the pre-trained encoder replaces init_from's
            assert cfg.condition == "scene" and Path(cfg.image_encoder_from).name == "image_encoder"
        elif cfg.image_encoder_from:  # the output folder of `moca3d pretrain-encoder` (not in a clean clone)
            from moca3d.models.image_encoder import ImageEncoder
            from moca3d.training.pretrain_encoder import BUILTIN_ENCODER
            from moca3d.training.train_dit import build_models

            assert Path(cfg.image_encoder_from).name == "image_encoder" and not cfg.image_encoder
            build_models(cfg, (16, 4), encoder=ImageEncoder(**BUILTIN_ENCODER))  # the transformer config builds
        elif not cfg.init_from:
            from moca3d.training.train_dit import build_models

            build_models(cfg, (16, 4))


def test_default_recipes_exist():
    for name in DEFAULT_RECIPES:
        assert recipe_kind(CONFIGS / name) == "default"


def test_continue_stages_are_one_stage_or_a_list():
    from moca3d.commands.default import continue_stages

    assert continue_stages({}) == [] and continue_stages({"dit_continue_config": None}) == []
    assert continue_stages({"dit_continue_config": "a.json"}) == [("a.json", "pipeline")]
    assert continue_stages({"dit_continue_config": ["a.json", {"config": "b.json", "start": "encoder"}, {"config": "c.json"}]}) \
        == [("a.json", "pipeline"), ("b.json", "encoder"), ("c.json", "pipeline")]
    from moca3d.errors import ConfigError

    for bad in ({"a": 1}, ["a.json", 2], 3, {"config": "a.json", "start": "vae"}, {"config": "a.json", "extra": 1}):
        with pytest.raises(ConfigError, match="dit_continue_config must be"):
            continue_stages({"dit_continue_config": bad})


def test_builtin_transformer_is_what_the_default_recipe_builds():
    """The shipped transformer's shape is the one of configs/default.json's last transformer (the recipe reproduces it)."""
    from moca3d.commands.default import continue_stages
    from moca3d.pipeline import DEFAULT_MODEL_DIR

    spec = json.loads((CONFIGS / "default.json").read_text())
    last = spec["dit_config"]
    for name, start in continue_stages(spec):
        if start == "encoder":  # a stage that starts a new transformer
            last = name
    recipe = DiTTrainConfig.from_json(CONFIGS / last).transformer
    shipped = json.loads((DEFAULT_MODEL_DIR / "transformer" / "config.json").read_text())
    assert recipe and {k: shipped[k] for k in recipe} == recipe


def test_dit_recipe_rejects_bad_timestep_settings():
    from moca3d.errors import ConfigError

    DiTTrainConfig(timestep_mean=1.0, timestep_std=0.5).check()  # a shifted logit-normal is valid
    with pytest.raises(ConfigError, match="timestep_std"):
        DiTTrainConfig(timestep_std=0.0).check()
    with pytest.raises(ConfigError, match="timestep_distribution"):
        DiTTrainConfig(timestep_distribution="beta").check()


OPTIMIZER_CASES = [
    ("grad_clip", 0.0, "grad_clip must be positive"),  # 0 zeroes the gradients, a negative value reverses them
    ("grad_clip", -1.0, "grad_clip must be positive"),
    ("weight_decay", float("nan"), "weight_decay must be >= 0"),
    ("betas", (0.9, 1.5), "betas must be two numbers in"),
    ("ema_decay", 1.0, "ema_decay must be in"),
    ("keep_checkpoints", -1, "keep_checkpoints must be >= 0"),
]


@pytest.mark.parametrize("recipe, key, value, words", [
    (recipe, *case) for recipe in (VAETrainConfig, DiTTrainConfig, EncoderPretrainConfig) for case in OPTIMIZER_CASES
    if hasattr(recipe(), case[0])], ids=lambda x: getattr(x, "__name__", None))
def test_optimizer_settings_that_would_train_wrongly_are_refused(recipe, key, value, words):
    """Values AdamW, clipping or the EMA would take without a word (or fail on deep inside): one line naming them."""
    from moca3d.errors import ConfigError

    with pytest.raises(ConfigError, match=words):
        recipe(**{key: value}).check()


@pytest.mark.parametrize("key, value, words", [
    ("mixed_precision", "fp8", "mixed_precision must be one of"), ("validate_every", -1, "validate_every must be >= 0"),
    ("time_limit_s", float("nan"), "time_limit_s"), ("timestep_mean", float("nan"), "timestep_mean finite"),
    ("transformer_lora_alpha", float("nan"), "transformer_lora_alpha must be positive"),
])
def test_dit_recipe_refuses_values_that_fail_later_or_silently(key, value, words):
    from moca3d.errors import ConfigError

    with pytest.raises(ConfigError, match=words):
        DiTTrainConfig(**{key: value}).check()


@pytest.mark.parametrize("recipe", [VAETrainConfig, DiTTrainConfig, EncoderPretrainConfig], ids=lambda c: c.__name__)
def test_recipe_values_of_the_wrong_type_are_named(recipe, tmp_path):
    from moca3d.errors import ConfigError

    path = tmp_path / "recipe.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="config must be a JSON object of keys and values, got list"):
        recipe.from_json(path)
    for bad, message in [({"steps": "ten"}, "key 'steps' must be an integer, got \"ten\""),
                         ({"steps": 10.5}, "key 'steps' must be an integer, got 10.5"),
                         ({"steps": True}, "key 'steps' must be an integer, got true"),
                         ({"lr": "fast"}, "key 'lr' must be a number"),
                         ({"init_from": 3}, "key 'init_from' must be a string or null, got 3")]:
        path.write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=message):
            recipe.from_json(path)
    assert recipe.from_dict({"lr": 1, "init_from": None}).lr == 1  # an int is a number; null an absent option


def test_recipe_lists_and_objects_are_checked_too():
    from moca3d.errors import ConfigError

    assert DiTTrainConfig.from_dict({"betas": [0.9, 0.95]}).betas == (0.9, 0.95)
    for bad, message in [({"betas": 0.9}, "key 'betas' must be a list"), ({"betas": [0.9]}, "'betas' must be a list of 2 values"),
                         ({"betas": [0.9, "x"]}, "'betas' must be a list of 2 values, each a number"),
                         ({"transformer": [1]}, "key 'transformer' must be a JSON object"),
                         ({"gradient_checkpointing": 1}, "key 'gradient_checkpointing' must be true or false"),
                         ({"condition": 1}, "key 'condition' must be a string")]:
        with pytest.raises(ConfigError, match=message):
            DiTTrainConfig.from_dict(bad)


def test_cli_train_reports_a_bad_recipe_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from moca3d.cli import app
    from moca3d.errors import ConfigError

    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "ten.json").write_text('{"steps": "ten"}')
    for name, message in [("list.json", "must be a JSON object"), ("ten.json", "key 'steps' must be an integer")]:
        result = CliRunner().invoke(app, ["train", str(tmp_path / "data"), "--config", str(tmp_path / name), "-o", str(tmp_path / "run")])
        assert isinstance(result.exception, ConfigError) and message in str(result.exception), result.output
    assert not (tmp_path / "run").exists()


def test_recipes_find_the_shipped_models_from_any_folder(tmp_path, monkeypatch):
    """"src/moca3d/weights/..." in a recipe means the package's copy when run outside the repository."""
    monkeypatch.chdir(tmp_path)
    for name, config in (("dit_scene_small_continue.json", DiTTrainConfig), ("vae_small_freespace.json", VAETrainConfig),
                         ("encoder_pretrain_scene.json", EncoderPretrainConfig)):
        init = Path(config.from_json(CONFIGS / name).init_from)
        assert init.is_absolute() and init.is_dir() and any(init.glob("*.json")), name
    assert DiTTrainConfig.from_dict({"init_from": "runs/mine/pipeline"}).init_from == "runs/mine/pipeline"  # users' paths as given


# configs/README.md: the catalogue a newcomer picks a recipe from. Each table row starts "| `NAME.json` | `VERB` |".
CATALOGUE_ROW = re.compile(r"^\|\s*`([^`/]+\.json)`\s*\|\s*`([a-z-]+)`\s*\|")


def catalogue() -> dict[str, tuple[str, str]]:
    """configs/README.md's rows: recipe file name -> (verb, the whole row); a name listed twice is an error."""
    rows: dict[str, tuple[str, str]] = {}
    for line in (CONFIGS / "README.md").read_text().splitlines():
        match = CATALOGUE_ROW.match(line)
        if match:
            name, verb = match.groups()
            assert name not in rows, f"configs/README.md lists {name} twice"
            rows[name] = (verb, line)
    return rows


def test_catalogue_lists_every_recipe():
    """Every configs/*.json has a row in configs/README.md, and every row names a file that exists."""
    listed, present = set(catalogue()), {p.name for p in CONFIGS.glob("*.json")}
    assert not present - listed, f"recipes missing from configs/README.md: {sorted(present - listed)}"
    assert not listed - present, f"configs/README.md lists recipes that do not exist: {sorted(listed - present)}"


def test_catalogue_verbs_load_their_recipes():
    """The verb the catalogue names for a recipe reads it (each loader is strict, so another verb's recipe fails on
    its unknown keys), and a model path a fresh clone lacks (one not under src/moca3d/weights/) is named in its row."""
    from moca3d.commands.default import read_recipe
    from moca3d.defaults import SHIPPED_PREFIX
    from moca3d.training.recipe import PATH_KEYS

    def dit(condition):
        def load(path):
            cfg = DiTTrainConfig.from_json(path)
            assert cfg.condition == condition, f"condition {cfg.condition!r}"
        return load

    loaders = {"train-default": read_recipe, "train-vae": VAETrainConfig.from_json,
               "pretrain-encoder": EncoderPretrainConfig.from_json, "train": dit("object"), "train-scene": dit("scene")}
    problems = []
    for name, (verb, row) in sorted(catalogue().items()):
        if verb not in loaders:
            problems.append(f"{name}: unknown verb {verb!r}")
            continue
        try:
            loaders[verb](CONFIGS / name)
        except Exception as err:  # ConfigError, or the condition above (AssertionError)
            problems.append(f"{name} does not load as `{verb}`: {err}")
        spec = json.loads((CONFIGS / name).read_text())
        for key in PATH_KEYS:
            value = spec.get(key)
            if value and not value.startswith(SHIPPED_PREFIX) and f"`{value}`" not in row:
                problems.append(f"{name}: its {key} {value} is not in the repository; its row should say so")
    assert not problems, "\n".join(problems)
