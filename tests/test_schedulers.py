"""Replacing the pipeline's scheduler the diffusers way: flow-matching ones sample (and survive save/load), others are
refused at assignment; the shift goes to the key the scheduler reads; generate_latents checks what __call__ does."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler, UniPCMultistepScheduler

from moca3d import MoCAPipeline, flow
from moca3d.errors import CheckpointError, ConfigError, InputError

CHAIR = Path(__file__).resolve().parents[1] / "examples" / "chair.png"
FAST = dict(num_parts=2, steps=3, resolution=16, show_progress=False)


@pytest.fixture()
def pipe(object_pipeline):
    return MoCAPipeline.from_pretrained(str(object_pipeline))


def unipc(pipe, **kw):
    """UniPC on the flow's sigmas, built from the default scheduler's config as a diffusers user would."""
    return UniPCMultistepScheduler.from_config(pipe.scheduler.config, use_flow_sigmas=True, prediction_type="flow_prediction", **kw)


def test_schedulers_of_other_predictions_are_refused_where_they_are_set(pipe):
    """An epsilon scheduler ran and gave latents off by hundreds; one without a shift died after decoding."""
    for scheduler in (DDIMScheduler(), EulerDiscreteScheduler(), "euler"):
        with pytest.raises(ConfigError, match="flow-matching scheduler|must be a diffusers scheduler"):
            pipe.scheduler = scheduler
    with pytest.raises(ConfigError, match="not a flow-matching scheduler"):
        MoCAPipeline(pipe.vae, pipe.transformer, pipe.image_encoder, scheduler=DDIMScheduler())


def test_the_shift_goes_to_the_key_the_scheduler_reads(pipe):
    """UniPC built from FlowMatchEuler's config carries an unread `shift`: shift=3 changed nothing and was recorded."""
    pipe.scheduler = unipc(pipe)
    assert flow.shift_key(pipe.scheduler) == "flow_shift" and flow.shift_key(flow.make_scheduler()) == "shift"
    plain, shifted = pipe(CHAIR, **FAST), pipe(CHAIR, shift=3.0, **FAST)
    assert shifted.settings["shift"] == 3.0 and plain.settings["shift"] == 1.0
    assert shifted.settings["scheduler"] == "UniPCMultistepScheduler" and "scheduler" not in pipe.__class__(
        pipe.vae, pipe.transformer, pipe.image_encoder)(CHAIR, **FAST).settings  # the default is not named
    assert not torch.allclose(plain.latents, shifted.latents, atol=1e-3)
    assert flow.scheduler_shift(pipe.scheduler) == 1.0  # the pipeline's own scheduler is untouched (a copy samples)


def test_a_replaced_scheduler_survives_save_and_load(pipe, tmp_path):
    """model_index.json named UniPC and from_pretrained loaded FlowMatchEuler: other samples, without a word."""
    pipe.scheduler = unipc(pipe, flow_shift=2.0)
    before = pipe(CHAIR, **FAST).latents
    pipe.save_pretrained(tmp_path / "p")
    saved = json.loads((tmp_path / "p" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "UniPCMultistepScheduler" and "shift" not in saved  # only its class's own keys
    again = MoCAPipeline.from_pretrained(tmp_path / "p")
    assert type(again.scheduler) is UniPCMultistepScheduler and flow.scheduler_shift(again.scheduler) == 2.0
    # the same weights; loaded ones may differ in memory layout, hence float reassociation (observed 6e-5)
    assert torch.allclose(again(CHAIR, **FAST).latents, before, atol=1e-3)
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    for name in ("DDIMScheduler", "NotAScheduler", "AutoencoderKL"):
        (tmp_path / "p" / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", name]}))
        with pytest.raises(CheckpointError, match="scheduler"):
            MoCAPipeline.from_pretrained(tmp_path / "p")


def test_a_multi_stage_scheduler_reports_each_model_evaluation(pipe):
    """Heun evaluates the model twice per step (once at the last): progress counts evaluations, not steps."""
    pipe.scheduler = FlowMatchHeunDiscreteScheduler()
    seen = []
    pipe.generate_latents(pipe.encode_image(CHAIR), 2, steps=3, progress=lambda i, n: seen.append((i, n)))
    assert seen == [(i, 5) for i in range(1, 6)]
    assert pipe(CHAIR, shift=2.0, **FAST).settings["shift"] == 2.0  # Heun's `shift`


def test_a_scheduler_without_a_shift_refuses_one_and_dynamic_shifting_is_refused(pipe):
    """Dynamic shifting needs an image-size mu the sampler lacks: it died mid-call with diffusers' 'mu must be passed'."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    with pytest.raises(ConfigError, match="use_dynamic_shifting=True is not supported"):
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)

    class Unshifted(FlowMatchHeunDiscreteScheduler):  # a flow scheduler whose config has no shift
        def __init__(self, num_train_timesteps: int = 1000):
            super().__init__(num_train_timesteps=num_train_timesteps)

    pipe.scheduler = Unshifted()
    assert flow.shift_key(pipe.scheduler) is None and flow.scheduler_shift(pipe.scheduler) is None
    with pytest.raises(ConfigError, match="Unshifted has no timestep shift: leave shift unset"):
        pipe(CHAIR, shift=2.0, **FAST)


def test_generate_latents_checks_what_call_checks(pipe):
    """numpy's seed was a TypeError, steps=0 returned noise, guidance=-5 ran, None was refused, a 2-D cond was blamed on B=2."""
    cond = pipe.encode_image(CHAIR)
    assert torch.equal(pipe.generate_latents(cond, 2, steps=2, seed=np.int64(3)), pipe.generate_latents(cond, 2, steps=2, seed=3))
    assert pipe.generate_latents(cond, 2, steps=1, seed=None).shape[:2] == (1, 2)
    for kw, message in ((dict(steps=0), "steps must be >= 1"), (dict(guidance=-5), "guidance must be >= 0"),
                        (dict(seed=True), "seed must be a whole number"), (dict(shift=0.0), "shift must be positive")):
        with pytest.raises((ConfigError, InputError), match=message):
            pipe.generate_latents(cond, 2, **kw)
    with pytest.raises(InputError, match=r"cond must be \(1, M, \d+\) or \(1, N, M, \d+\) .*got \(\d+, \d+\)"):
        pipe.generate_latents(cond[0], 2)

