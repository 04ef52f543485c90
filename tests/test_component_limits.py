"""Component counts beyond a model's ID codebook are refused before any work, not at the batch or asset that has them."""

from pathlib import Path
from types import SimpleNamespace

import pytest

import moca3d.training.train_dit as train_dit
from conftest import tiny_dit_recipe
from moca3d.data.dataset import read_manifest
from moca3d.errors import ConfigError
from moca3d.evaluation import check_model_fits, evaluate_pipeline
from moca3d.training.checkpoints import latest_checkpoint


def _most_parts(root) -> int:
    return max(r["num_components"] for r in read_manifest(root, "train"))


def test_training_data_with_more_parts_than_ids_is_refused_before_the_first_step(object_dataset, tmp_path):
    """max_components above id_codebook_size trained until a batch drew such an asset ("60 components exceed the
    model's limit of 50", no checkpoint, the asset unnamed; a resume drew the same batch): one line before step 1."""
    root, vae_dir = object_dataset
    counts = [r["num_components"] for r in read_manifest(root, "train")]
    most, least = max(counts), min(counts)
    assert most > least
    net = dict(width=32, num_layers=2, num_heads=4, compression=4, id_codebook_size=least)
    with pytest.raises(ConfigError, match=rf"has {most} components, more than the transformer's {least} IDs: lower max_components to {least}"):
        train_dit.train(root, tmp_path / "run", tiny_dit_recipe(transformer=net), vae_dir=vae_dir, device="cpu", progress=False)
    assert latest_checkpoint(tmp_path / "run") is None
    fits = tiny_dit_recipe(max_components=least, steps=1, transformer=net)  # the larger assets left out: it trains
    train_dit.train(root, tmp_path / "run2", fits, vae_dir=vae_dir, device="cpu", progress=False)
    assert latest_checkpoint(tmp_path / "run2") is not None


def test_validation_reads_val_assets_up_to_the_model_limit_not_32(object_dataset, tmp_path, monkeypatch):
    """The val split was read with 1-32 components whatever the recipe and model took: 40-part val assets were 'no assets'."""
    root, vae_dir = object_dataset
    seen = []

    def stop(data_dir, split, count, low, high, kind=None):
        seen.append((split, low, high))
        raise KeyboardInterrupt  # enough: the range is what is checked

    monkeypatch.setattr(train_dit, "select_records", stop)
    for codebook, max_components, high in ((64, 40, 40), (36, 40, 36)):  # the recipe's range, within the model's IDs
        net = dict(width=32, num_layers=2, num_heads=4, compression=4, id_codebook_size=codebook)
        cfg = tiny_dit_recipe(validate_every=1, max_components=max_components, transformer=net)
        with pytest.raises(KeyboardInterrupt):
            train_dit.train(root, tmp_path / f"run{codebook}", cfg, vae_dir=vae_dir, device="cpu", progress=False)
        assert seen.pop() == ("val", 1, high)


def test_evaluation_refuses_records_beyond_the_model_before_generating(object_dataset):
    """evaluate-model --max-parts 64 with a 50-ID model generated the smaller assets, then failed at the first larger
    one: nothing printed, nothing written. Now one line first, naming the largest and the flag."""
    root, _ = object_dataset
    most = _most_parts(root)
    calls = []

    class Pipe:  # a pipeline of 2 IDs that records any generation asked of it
        transformer = SimpleNamespace(max_components=2)

        def __call__(self, *args, **kwargs):
            calls.append(args)

    pipe = Pipe()
    with pytest.raises(ConfigError, match=rf"more components than the model's limit of 2 \(the most: .+, {most}\): lower --max-parts"):
        evaluate_pipeline(pipe, root, "train", progress=False)
    assert not calls
    records = [{"id": "s1", "num_components": 40}, {"id": "s2", "num_components": 8}]
    with pytest.raises(ConfigError, match=r"1 of the 2 selected records .+ \(the most: s1, 40\): lower --max-instances to 32"):
        check_model_fits(SimpleNamespace(transformer=SimpleNamespace(max_components=32)), records, "scenes", "--max-instances")
    check_model_fits(None, records, "scenes", "--max-instances")  # no transformer (a round trip, read predictions): no limit


def test_a_fine_tune_grows_the_id_codebook_of_its_base(object_dataset, object_pipeline, tmp_path):
    """More components than a shipped model's IDs had no route but a new transformer: the recipe's larger
    transformer.id_codebook_size now keeps every base weight and adds the new IDs at their init."""
    import torch

    from moca3d.models.transformer import MoCATransformer
    from moca3d.training.train_dit import DiTTrainConfig, load_transformer

    base = MoCATransformer.from_pretrained(f"{object_pipeline}/transformer")
    size = base.config.id_codebook_size
    grown = load_transformer(Path(object_pipeline), DiTTrainConfig(transformer={"id_codebook_size": size + 8}), None)
    assert grown.max_components == size + 8
    assert torch.equal(grown.id_embedding.weight[:size], base.id_embedding.weight)
    kept = {k: v for k, v in base.state_dict().items() if k != "id_embedding.weight"}
    assert all(torch.equal(grown.state_dict()[k], v) for k, v in kept.items())
    with pytest.raises(ConfigError, match="no longer loads"):  # fewer IDs would drop trained ones: still refused
        load_transformer(Path(object_pipeline), DiTTrainConfig(transformer={"id_codebook_size": size - 1}), None)
    root, _ = object_dataset  # and it trains: a step with the grown codebook
    recipe = tiny_dit_recipe(steps=1, init_from=str(object_pipeline), transformer={"id_codebook_size": size + 8}, image_encoder={})
    train_dit.train(root, tmp_path / "grown", recipe, device="cpu", progress=False)
    assert latest_checkpoint(tmp_path / "grown") is not None
