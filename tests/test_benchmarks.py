"""The benchmark scripts run end to end at tiny sizes and write the documented JSON keys (no timing asserted)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_benchmark as load

ROOT = Path(__file__).resolve().parent.parent
KNOWN_ALLOCATION_MIB = 64
SMALL_BATCH, BIG_BATCH = 1, 8



@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_attention_benchmark_writes_required_keys(tmp_path):
    out = tmp_path / "attention.json"
    load("attention").main(["--n", "2", "4", "--L", "16", "--dim", "32", "--heads", "2", "--repeats", "1", "--device", "cpu", "--json", str(out)])
    records = json.loads(out.read_text())
    assert [r["n"] for r in records] == [2, 4]
    required = {"n", "dense_ms", "moc_ms", "routing_ms", "backend", "context_len", "fwd_bwd_dense_ms", "fwd_bwd_moc_ms"}
    for r in records:
        assert required <= set(r)
        assert r["context_len"] == r["context_len_formula"]
        assert r["dense_ms"] > 0 and r["moc_ms"] > 0
        assert r["repeats"] == 1 and r["k_fraction"] == 0.25  # the settings it ran with


def test_forward_benchmark_writes_required_keys(tmp_path):
    out = tmp_path / "forward.json"
    config = tmp_path / "cfg.json"
    # a scene model's config (layout_features): the benchmark feeds it a mask layout
    config.write_text(json.dumps({"num_latents": 16, "in_channels": 4, "width": 32, "num_layers": 2, "num_heads": 2, "cond_dim": 16, "compression": 4,
                                  "layout_features": 8}))
    load("forward").main(["--n", "2", "3", "--config", str(config), "--repeats", "1", "--device", "cpu", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["repeats"] == 1 and "threads" in result["env"]  # the settings it ran with
    records = result["records"]
    assert {(r["n"], r["mode"]) for r in records} == {(2, "moca"), (2, "dense"), (3, "moca"), (3, "dense")}
    for r in records:
        assert {"n", "mode", "local_ms", "routing_ms", "global_ms", "total_ms"} <= set(r)
        assert r["total_ms"] >= r["local_ms"] + r["global_ms"]


def test_generate_time_benchmark_times_every_stage_of_both_built_in_models(tmp_path):
    out = tmp_path / "generate_time.json"
    load("generate_time").main(["--repeats", "1", "--steps", "2", "--resolution", "16", "--json", str(out)])
    report = json.loads(out.read_text())
    by_case = {r["case"]: r for r in report["median"]}
    assert set(by_case) == {"object", "scene"} and by_case["object"]["components"] == 8
    assert by_case["scene"]["components"] == 4  # examples/scene4_masks.png
    for r in by_case.values():
        stages = [r[s] for s in ("load", "encode", "sample", "extract", "save")]
        assert all(s >= 0 for s in stages) and r["total"] >= sum(stages)


def test_generate_time_benchmark_times_the_whole_command_too(tmp_path):
    """--command: the CLI command in a new process each repeat, its wall time (start-up and imports included) beside
    the in-process stages, which it exceeds."""
    out = tmp_path / "generate_time.json"
    load("generate_time").main(["--repeats", "1", "--steps", "2", "--resolution", "16", "--cases", "object", "--command",
                                "--json", str(out)])
    (row,) = json.loads(out.read_text())["median"]
    assert row["command"] > row["sample"] + row["extract"]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_simplify_benchmark_decimates_each_generation_under_each_budget(tmp_path):
    out = tmp_path / "simplify.json"
    chair = ROOT / "examples" / "chair.png"
    load("simplify").main(["--images", str(chair), "--parts", "2", "--steps", "2", "--resolution", "32", "--budgets", "400", "40",
                           "--points", "2000", "--json", str(out)])
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    full, *budgets = report["table"]
    assert full["budget"] == "full" and [b["budget"] for b in budgets] == [400, 40]
    for b in budgets:
        kept = row[str(b["budget"])]
        assert kept["triangles"] <= min(b["budget"], row["triangles"]) and 0 <= kept["defective_parts"] <= row["parts"]
        assert kept["chamfer"] >= 0 and 0 <= kept["fscore@0.02"] <= 1


def test_cpu_peak_memory_of_a_known_allocation():
    peak_mib = load("benchkit").peak_memory_mb(lambda: torch.ones(KNOWN_ALLOCATION_MIB * 2**18), torch.device("cpu"))  # float32: 4 bytes
    assert KNOWN_ALLOCATION_MIB * 0.95 <= peak_mib <= KNOWN_ALLOCATION_MIB * 1.1


def test_memory_benchmark_writes_required_keys(tmp_path):
    out = tmp_path / "memory.json"
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"num_latents": 32, "in_channels": 8, "width": 64, "num_layers": 2, "num_heads": 2, "cond_dim": 16, "compression": 4,
                                  "layout_features": 8}))  # as the built-in scene model's: a mask layout is fed
    batches = [str(SMALL_BATCH), str(BIG_BATCH)]
    load("memory").main(["--n", "2", "--batch", *batches, "--config", str(config), "--threads", "1", "--device", "cpu", "--budget-gib", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["grad_checkpointing"] is False and result["warmup"] == 1 and result["threads"] == 1  # the settings it ran with
    records = result["records"]
    assert {(r["mode"], r["batch"]) for r in records} == {(m, b) for m in ("moca", "dense") for b in (SMALL_BATCH, BIG_BATCH)}
    peaks = {}
    for r in records:
        assert {"n", "mode", "batch", "sdpa", "peak_gib", "static_gib", "baseline_bytes", "peak_bytes", "fits"} <= set(r)
        assert r["peak_gib"] > 0 and r["static_gib"] > 0 and r["fits"] is True
        peaks[r["mode"], r["batch"]] = r["peak_gib"]
    for mode in ("moca", "dense"):
        assert peaks[mode, BIG_BATCH] > 2 * peaks[mode, SMALL_BATCH]
    assert all(r["dense_over_moca"] > 0 for r in records if r["mode"] == "moca")


def test_memory_benchmark_of_a_scene_step_feeds_per_instance_conditions(tmp_path):
    out = tmp_path / "memory.json"
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"num_latents": 16, "in_channels": 8, "width": 32, "num_layers": 2, "num_heads": 2, "cond_dim": 16, "compression": 4,
                                  "layout_features": 8}))
    load("memory").main(["--n", "3", "--batch", "2", "--config", str(config), "--scene", "--threads", "1", "--device", "cpu", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["scene"] and {r["mode"] for r in result["records"]} == {"moca", "dense"}
    assert all(r["peak_gib"] > 0 for r in result["records"]), result["records"]


def test_finetune_memory_counts_the_prior_and_measures_full_against_lora(tmp_path):
    out = tmp_path / "finetune.json"
    load("finetune_memory").main(["--ranks", "4", "--width", "384", "--layers", "2", "--heads", "4", "--latents", "32",
                                  "--n", "2", "--threads", "1", "--json", str(out)])
    full, lora = json.loads(out.read_text())["records"]
    assert (full["rank"], lora["rank"]) == (0, 4)
    assert full["prior_trainable"] == full["prior_params"] > 10**9  # TripoSG's DiT: 1.5 B, all trained
    assert 0 < lora["prior_trainable"] < full["prior_trainable"] / 10 and lora["prior_params"] > full["prior_params"]
    for r in (full, lora):
        assert r["prior_state_gib"] == pytest.approx(r["prior_trainable"] * 16 / 2**30)
    assert lora["measured_trainable"] < full["measured_trainable"] / 5
    # the full step's peak holds ~16 B per trained parameter more (gradient, AdamW, EMA): 4.6 M parameters, 70 MiB
    state_mib = (full["measured_trainable"] - lora["measured_trainable"]) * 16 / 2**20
    assert full["measured_peak_mib"] - lora["measured_peak_mib"] > 0.5 * state_mib
    # what a checkpoint holds, counted and written: all weights + 12 B per trained parameter (EMA, AdamW), but a LoRA
    # checkpoint leaves the frozen base out; its adapter holds the trained tensors alone
    assert full["prior_checkpoint_gib"] == pytest.approx(full["prior_params"] * 16 / 2**30)
    assert lora["prior_checkpoint_gib"] == pytest.approx(lora["prior_trainable"] * 16 / 2**30)
    assert lora["prior_adapter_gib"] == pytest.approx(lora["prior_trainable"] * 4 / 2**30) and full["prior_adapter_gib"] is None
    for r in (full, lora):  # the files: within 2% (+ the RNG state, JSON, buffers, safetensors headers)
        assert r["measured_checkpoint_mib"] == pytest.approx(r["measured_trainable"] * 16 / 2**20, rel=0.02)
    assert lora["measured_adapter_mib"] == pytest.approx(lora["measured_trainable"] * 4 / 2**20, rel=0.02)


def test_variants_table_merges_reports_and_training_runs(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000007").mkdir(parents=True)
    (run / "checkpoints" / "step_00000005").mkdir()
    (run / "train_config.json").write_text(json.dumps({"batch_size": 8, "time_limit_s": 60.0, "transformer": {"attention_mode": "dense"}}))
    (run / "train_log.jsonl").write_text(json.dumps({"step": 5, "loss": 0.5, "time": 59.0}) + "\n")
    reports = []
    for i, parts in enumerate([(2, 3), (12,)]):
        assets = [{"id": f"a{i}{n}", "num_parts": n, "chamfer": 0.1 * n, "fscore@0.1": 0.5, "fscore@0.05": 0.25, "self_iou": 0.01, "seconds": 2.0} for n in parts]
        reports.append(tmp_path / f"eval{i}.json")
        reports[-1].write_text(json.dumps({"assets": assets}))
    out = tmp_path / "table.json"
    records = load("variants_table").main(["--run", f"dense={run}", "--eval", f"dense={reports[0]}", "--eval", f"dense={reports[1]}", "--json", str(out)])
    (rec,) = records
    assert rec["count"] == 3 and rec["min_parts"] == 2 and rec["max_parts"] == 12
    assert rec["chamfer"] == pytest.approx(0.1 * (2 + 3 + 12) / 3), "merged asset by asset, not mean of means"
    assert rec["empty"] == 0
    assert rec["steps"] == 7 and rec["train_seconds"] == 60.0 and rec["attention_mode"] == "dense"
    assert json.loads(out.read_text())[0]["count"] == 3


def test_variants_table_leaves_an_all_empty_object_written_as_null_out_of_the_mean_cd(tmp_path):
    """evaluate-model writes strict JSON: an all-empty object's infinite Chamfer distance is null there."""
    assets = [{"id": "a", "num_parts": 2, "chamfer": 0.2, "fscore@0.1": 0.6, "fscore@0.05": 0.4, "self_iou": 0.04, "seconds": 1.0},
              {"id": "b", "num_parts": 3, "chamfer": None, "fscore@0.1": 0.0, "fscore@0.05": 0.0, "self_iou": None, "seconds": 3.0}]
    report = tmp_path / "eval.json"
    report.write_text(json.dumps({"assets": assets}))
    (rec,) = load("variants_table").main(["--eval", f"moca={report}"])
    assert rec["chamfer"] == pytest.approx(0.2) and rec["empty"] == 1
    assert rec["fscore@0.1"] == pytest.approx(0.3) and rec["seconds"] == pytest.approx(2.0)
    assert rec["self_iou"] == pytest.approx(0.04)  # b has none (no surface): left out, not a TypeError


def test_benchmark_json_is_standard_json(tmp_path):
    """An infinite mean (e.g. floater_filter's CD with an all-empty object) is written as null, not as Infinity."""
    out = tmp_path / "out.json"
    load("benchkit").write_json(str(out), {"chamfer": math.inf, "paired": math.nan, "f": 0.5})

    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    assert json.loads(out.read_text(), parse_constant=reject) == {"chamfer": None, "paired": None, "f": 0.5}


@pytest.mark.parametrize("script, argv", [
    ("attention", ["--n", "2", "--L", "16", "--dim", "32", "--heads", "2", "--device", "cpu", "--no-backward", "--repeats", "0"]),
    ("attention", ["--n", "2", "--L", "16", "--dim", "32", "--heads", "2", "--device", "cpu", "--no-backward", "--repeats", "1", "--backends", "blocksparse"]),
    ("forward", ["--n", "0", "--repeats", "1"]),
    ("instance_sizes", ["--eval", "model=report.json", "--bins", "0"]),
])
def test_bad_options_end_with_argparse_error(script, argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "report.json").write_text(json.dumps({"scenes": [{"instances": [{"mask_fraction": 0.1, "fscore@0.1": 0.5, "empty": False}]}]}))
    with pytest.raises(SystemExit) as exit_info:
        load(script).main(argv)
    assert exit_info.value.code == 2
    assert "error: " in capsys.readouterr().err


@pytest.mark.parametrize("script, argv", [
    ("instance_sizes", ["--eval", "moca=missing.json"]),  # a failed read (OSError)
    ("variants_table", ["--eval", "moca=report.json"]),  # not an evaluate-model report (moca3d's InputError)
    ("forward", ["--config", "report.json", "--n", "2"]),  # keys that are not MoCATransformer arguments
])
def test_bad_inputs_end_with_one_line_not_a_stack_trace(script, argv, tmp_path):
    (tmp_path / "report.json").write_text(json.dumps({"scenes": []}))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *argv], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and ".json" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_instance_sizes_bins_every_report_by_the_first_ones_quantiles(tmp_path):
    def report(path, scores):
        rows = [{"mask_fraction": share, "fscore@0.1": f, "empty": f == 0.0} for share, f in scores]
        path.write_text(json.dumps({"scenes": [{"instances": rows[:2]}, {"instances": rows[2:]}]}))
        return str(path)

    shares = [0.001, 0.002, 0.003, 0.004]
    model = report(tmp_path / "model.json", zip(shares, [0.0, 0.2, 0.4, 0.6]))
    ceiling = report(tmp_path / "ceiling.json", zip(shares, [0.5, 0.5, 0.7, 0.7]))
    out = tmp_path / "sizes.json"
    records = load("instance_sizes").main(["--eval", f"model={model}", "--eval", f"vae={ceiling}", "--bins", "2", "--json", str(out)])
    by = {(r["name"], r["bin"]): r for r in records}
    assert by["model", 0]["count"] == by["model", 1]["count"] == 2  # the median splits the four shares in two
    assert by["model", 0]["fscore@0.1"] == pytest.approx(0.1) and by["model", 0]["empty"] == 1
    assert by["vae", 0]["fscore@0.1"] == pytest.approx(0.5) and by["vae", 1]["fscore@0.1"] == pytest.approx(0.7)
    assert json.loads(out.read_text()) == records


def prepare_tiny_objects(root, count=2):
    """`count` prepared procedural objects (train split; 512 surface points, 64-pixel renders) in root."""
    from moca3d.data.prepare import PrepareConfig, prepare, procedural_jobs
    from moca3d.geometry.inside import QueryConfig
    from moca3d.geometry.render import RenderConfig
    from moca3d.geometry.sampling import SurfaceSamplingConfig

    cfg = PrepareConfig(surface=SurfaceSamplingConfig(num_points=512), queries=QueryConfig(num_queries=64),
                        render=RenderConfig(size=64, supersample=1), val_fraction=0.0, test_fraction=0.0)
    prepare(procedural_jobs("objects", count, seed=3), root, cfg, workers=1, progress=False)


def make_tiny_pipeline_and_data(tmp_path):
    """Two prepared procedural objects (train split) in tmp_path/data and a random tiny pipeline in tmp_path/pipe."""
    from moca3d.models.image_encoder import ImageEncoder
    from moca3d.models.transformer import MoCATransformer
    from moca3d.models.vae import VecSetVAE
    from moca3d.pipeline import MoCAPipeline
    from moca3d.training.train_vae import encode_dataset

    root = tmp_path / "data"
    prepare_tiny_objects(root)
    torch.manual_seed(0)
    vae = VecSetVAE(num_latents=16, latent_channels=4, width_encoder=32, width_decoder=32, num_attention_heads=4,
                    num_layers_encoder=1, num_layers_decoder=1, embed_frequency=4).eval()
    encode_dataset(root, vae, "test", num_points=512, progress=False)
    transformer = MoCATransformer(in_channels=4, num_latents=16, width=32, num_layers=2, num_heads=4, cond_dim=32, compression=4)
    encoder = ImageEncoder(image_size=32, patch_size=8, width=32, num_layers=1, num_heads=4)
    MoCAPipeline(vae, transformer, encoder).save_pretrained(tmp_path / "pipe")


def test_diagnose_model_measures_condition_use_sdedit_and_decoder_noise(tmp_path):
    """On a random tiny pipeline: the report has every section; SDEdit from t0 = 0 and zero decoder noise are both the
    VAE round trip, so they score the same; the zero-condition loss does not depend on the image."""
    make_tiny_pipeline_and_data(tmp_path)
    root = tmp_path / "data"
    out = tmp_path / "diag.json"
    report = load("diagnose_model").main([str(root), "--model", str(tmp_path / "pipe"), "--count", "2", "--times", "0.5",
                                          "--sdedit", "0", "0.5", "--noise", "0", "--steps", "2", "--resolution", "16", "--metric-points", "2000", "--json", str(out)])
    assert json.loads(out.read_text())["assets"] == report["assets"] and len(report["assets"]) == 2
    (loss,) = report["condition_use"]
    assert {"loss_right", "loss_zero", "loss_wrong"} <= set(loss) and all(np.isfinite(v) for v in loss.values())
    assert [r["t0"] for r in report["sdedit"]] == [0.0, 0.5]
    assert report["sdedit"][0]["per_asset"] == pytest.approx(report["decoder_noise"][0]["per_asset"])


def test_diagnose_model_reads_a_scene_model_per_instance(tmp_path):
    """The built-in scene model on one procedural scene: instance scores are reported, the wrong condition is the
    scene's own masks shifted, and SDEdit from t0 = 0 equals the undisturbed decode (both the VAE round trip)."""
    from moca3d.data.prepare import PrepareConfig, prepare, procedural_jobs
    from moca3d.geometry.inside import QueryConfig
    from moca3d.geometry.render import RenderConfig
    from moca3d.geometry.sampling import SurfaceSamplingConfig
    from moca3d.pipeline import DEFAULT_SCENE_MODEL_DIR, MoCAPipeline
    from moca3d.training.train_vae import encode_dataset

    root = tmp_path / "scenes"
    cfg = PrepareConfig(surface=SurfaceSamplingConfig(num_points=512), queries=QueryConfig(num_queries=64),
                        render=RenderConfig(size=64, supersample=1), val_fraction=0.0, test_fraction=0.0, scene_objects=(2, 3))
    prepare(procedural_jobs("scenes", 1, seed=4), root, cfg, workers=1, progress=False)
    encode_dataset(root, MoCAPipeline.from_pretrained(DEFAULT_SCENE_MODEL_DIR).vae, "train", num_points=512, progress=False)
    report = load("diagnose_model").main([str(root), "--model", str(DEFAULT_SCENE_MODEL_DIR), "--count", "1", "--times", "0.9",
                                          "--sdedit", "0", "--noise", "0", "--steps", "2", "--resolution", "16", "--metric-points", "2000"])
    assert report["scene_model"] and len(report["assets"]) == 1
    (loss,) = report["condition_use"]
    assert all(np.isfinite(v) for v in loss.values()) and loss["loss_wrong"] != loss["loss_right"]
    (sdedit,), (noise,) = report["sdedit"], report["decoder_noise"]
    assert 0.0 <= sdedit["instance_fscore@0.1"] <= 1.0
    assert sdedit["per_asset_instance"] == pytest.approx(noise["per_asset_instance"])


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_floater_filter_reference_row_is_evaluate_pipeline(tmp_path):
    """The sweep's first filter (the extraction default) scores exactly what evaluate-model scores; every filter is reported."""
    from moca3d.evaluation import evaluate_pipeline
    from moca3d.pipeline import MoCAPipeline

    make_tiny_pipeline_and_data(tmp_path)
    out = tmp_path / "floaters.json"
    report = load("floater_filter").main([str(tmp_path / "data"), "--model", str(tmp_path / "pipe"), "--split", "train", "--steps", "2",
                                          "--resolution", "16", "--metric-points", "2000", "--fractions", "0.02", "0", "0.5",
                                          "--rescue", "0", "64", "--quiet", "--json", str(out)])
    assert json.loads(out.read_text())["table"] == report["table"]
    table = report["table"]
    assert [(row["min_component_fraction"], row["rescue_vertices"]) for row in table] == [
        (0.02, 0), (0.02, 64), (0.0, 0), (0.0, 64), (0.5, 0), (0.5, 64)]
    for plain, rescued in zip(table[::2], table[1::2]):  # rescue only ever fills parts that were empty
        assert rescued["num_empty"] <= plain["num_empty"]
    expected = evaluate_pipeline(MoCAPipeline.from_pretrained(str(tmp_path / "pipe")), tmp_path / "data", split="train", steps=2,
                                 resolution=16, metric_points=2000, progress=False)
    for row, asset in zip(report["objects"], expected["assets"]):
        assert row["id"] == asset["id"]
        for key in ("fscore@0.1", "chamfer", "self_iou"):
            assert row["0.02"][key] == pytest.approx(asset[key], rel=1e-6, abs=1e-9), key


@pytest.fixture(scope="module")
def encoder_runs(tmp_path_factory):
    """One prepared object (train split) and random pretrain-encoder runs of the smoke recipe (8^3 grids), object and scene."""
    from moca3d.data.dataset import read_manifest
    from moca3d.training.checkpoints import save_checkpoint
    from moca3d.training.pretrain_encoder import EncoderPretrainConfig, build_grid_cache, build_predictor

    root = tmp_path_factory.mktemp("encoder_runs")
    prepare_tiny_objects(root / "data", count=1)
    ids = [rec["id"] for rec in read_manifest(root / "data", "train")]
    for condition in ("object", "scene"):
        run = root / condition
        run.mkdir()
        recipe = {**json.loads((ROOT / "configs" / "encoder_pretrain_smoke.json").read_text()), "condition": condition}
        (run / "pretrain_config.json").write_text(json.dumps(recipe))
        torch.manual_seed(0)
        save_checkpoint(run, 1, build_predictor(EncoderPretrainConfig.from_json(run / "pretrain_config.json")))
        build_grid_cache(root / "data", ids, 8, run / "grids8.safetensors")
    return root


def test_encoder_grid_eval_writes_its_settings_and_refuses_an_empty_split(encoder_runs, tmp_path):
    root = encoder_runs
    out = tmp_path / "grid.json"
    argv = [str(root / "data"), "--run", str(root / "object"), "--train-grids", str(root / "object" / "grids8.safetensors"), "--points", "256"]
    summary = load("encoder_grid_eval").main([*argv, "--split", "train", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["mean"] == summary and report["count"] == 1 and report["resolution"] == 8
    assert report["run"] == str(root / "object") and report["points"] == 256 and report["split"] == "train"
    with pytest.raises(SystemExit, match="no assets in the 'val' split"):  # not a table of NaN
        load("encoder_grid_eval").main([*argv, "--split", "val", "--json", str(tmp_path / "val.json")])
    assert not (tmp_path / "val.json").exists()


def test_scene_encoder_eval_refuses_a_split_without_scenes(encoder_runs, tmp_path):
    root = encoder_runs
    with pytest.raises(SystemExit, match="no scene with a visible instance"):  # not a table of NaN
        load("scene_encoder_eval").main([str(root / "data"), "--run", str(root / "scene"), "--split", "train", "--json", str(tmp_path / "s.json")])
    assert not (tmp_path / "s.json").exists()


def test_train_step_benchmark_times_every_differentiable_backend_and_marks_autos_choice(tmp_path):
    """The whole training step per backend (what CPU training pays; attention.py times the layer alone)."""
    out = tmp_path / "train_step.json"
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"num_latents": 16, "in_channels": 4, "width": 32, "num_layers": 2, "num_heads": 2, "cond_dim": 16,
                                  "compression": 4}))
    records = load("train_step").main(["--n", "2", "5", "--config", str(config), "--repeats", "1", "--device", "cpu",
                                       "--threads", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == records and [r["n"] for r in records] == [2, 5]
    for r in records:
        times = {b: r[f"{b}_ms"] for b in ("reference", "chunked", "matmul")}
        assert all(t > 0 for t in times.values()) and r["fastest"] == min(times, key=times.get)
        assert r["auto"] == "chunked" and r["auto_over_fastest"] == pytest.approx(times["chunked"] / min(times.values()))
        assert r["auto_over_fastest"] >= 1.0 and r["ratio_to_reference"]["reference"] == 1.0
        assert (r["device"], r["threads"]) == ("cpu", 1)
    with pytest.raises(SystemExit):  # no backward on the CPU: refused with argparse's one line
        load("train_step").main(["--n", "2", "--config", str(config), "--device", "cpu", "--backends", "blocksparse"])
