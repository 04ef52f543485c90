"""Rectified flow (DESIGN.md §5): Z_t = (1 - t) Z_0 + t eps, velocity target eps - Z_0.

Training draws one t per sample (shared by its components); sampling integrates
dZ/dt = v from t = 1 to 0 with diffusers' FlowMatchEulerDiscreteScheduler (whose sigma is our
t, and whose Euler step Z + (t_next - t) v is exactly ours), with classifier-free guidance.
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from moca3d.defaults import GUIDANCE, STEPS, check_shift
from moca3d.errors import ConfigError

TIMESTEP_DISTRIBUTIONS = ("uniform", "logit_normal")  # training-time samplers of sample_timesteps


def sample_timesteps(
    batch: int, distribution: str = "logit_normal", mean: float = 0.0, std: float = 1.0,
    generator: Optional[torch.Generator] = None, device=None,
) -> torch.Tensor:
    """(B,) training times in (0, 1): uniform, or logit-normal (sigmoid of a normal)."""
    if distribution == "uniform":
        t = torch.rand(batch, generator=generator)
    elif distribution == "logit_normal":
        t = torch.sigmoid(mean + std * torch.randn(batch, generator=generator))
    else:
        raise ValueError(f"unknown timestep distribution {distribution!r} ({', '.join(TIMESTEP_DISTRIBUTIONS)})")
    return t.to(device)


def interpolate(z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Z_t = (1 - t) Z_0 + t eps, with t (B,) broadcast over (B, N, L, C)."""
    t = t.view(-1, *([1] * (z0.dim() - 1))).to(z0.dtype)
    return (1 - t) * z0 + t * noise


def velocity_target(z0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The rectified-flow target eps - Z_0."""
    return noise - z0


def flow_loss(pred: torch.Tensor, z0: torch.Tensor, noise: torch.Tensor, component_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Squared error to eps - Z_0: mean over each sample's real components, then over samples.

    Weighting every asset equally (not every component) keeps the loss of a global batch equal
    to the mean of its per-process losses under data parallelism. pred: (B, N, L, C).
    """
    err = (pred.float() - velocity_target(z0, noise).float()).pow(2).mean(dim=(2, 3))  # (B, N)
    if component_mask is None:
        return err.mean()
    w = component_mask.to(err.dtype)
    return ((err * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)).mean()


def make_scheduler(shift: float = 1.0) -> FlowMatchEulerDiscreteScheduler:
    """Euler flow-matching scheduler; shift > 1 spends more steps at high noise."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=check_shift(shift))


def check_flow_scheduler(scheduler) -> None:
    """A one-line ConfigError unless `scheduler` integrates a rectified flow (the transformer predicts eps - Z_0)."""
    config = getattr(scheduler, "config", None)
    name = type(scheduler).__name__
    if config is None or not callable(getattr(scheduler, "step", None)):
        raise ConfigError(f"the scheduler must be a diffusers scheduler, got {name}")
    own = _init_config(scheduler)  # (one built from another class's config carries keys it never reads)
    if own.get("use_dynamic_shifting"):  # its timesteps need an image-size `mu` this sampler does not have
        raise ConfigError(f"{name} with use_dynamic_shifting=True is not supported: use a fixed shift (use_dynamic_shifting=False)")
    flow_match = any(c.__name__.startswith("FlowMatch") for c in type(scheduler).__mro__)  # (a subclass of one too)
    if flow_match or (own.get("prediction_type") == "flow_prediction" and own.get("use_flow_sigmas")):
        return
    raise ConfigError(f"{name} is not a flow-matching scheduler (the transformer predicts a rectified-flow velocity): use "
                      "FlowMatchEulerDiscreteScheduler (the default), another FlowMatch* one, or UniPC / DPM-Solver with "
                      "use_flow_sigmas=True, prediction_type='flow_prediction'")


def _init_config(scheduler) -> dict:
    """The entries of `scheduler`'s config its class takes (one built from another class's config carries that one's)."""
    accepted = inspect.signature(type(scheduler).__init__).parameters
    return {k: v for k, v in scheduler.config.items() if k in accepted}


def _shift_key(config: dict) -> Optional[str]:
    """The key of a scheduler config's timestep shift (of `_init_config`'s entries)."""
    return next((key for key in ("shift", "flow_shift") if key in config), None)


def shift_key(scheduler) -> Optional[str]:
    """The config key of `scheduler`'s timestep shift: FlowMatch*'s `shift`, UniPC / DPM-Solver's `flow_shift`; None."""
    return _shift_key(_init_config(scheduler))


def scheduler_shift(scheduler) -> Optional[float]:
    """The timestep shift `scheduler` samples with (None: it has none)."""
    key = shift_key(scheduler)
    return None if key is None else float(scheduler.config[key])


def scheduler_with_shift(scheduler, shift: Optional[float]):
    """A fresh copy of a flow-matching `scheduler` (checked), with `shift` (checked) unless None: sampling sets the
    copy's timesteps, so concurrent calls on one pipeline never share them."""
    check_flow_scheduler(scheduler)
    config = _init_config(scheduler)
    if shift is not None:
        key = _shift_key(config)
        if key is None:
            raise ConfigError(f"{type(scheduler).__name__} has no timestep shift: leave shift unset")
        config[key] = check_shift(shift)
    return type(scheduler).from_config(config)


def guided_velocity(
    model: Callable[..., torch.Tensor], z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
    uncond: Optional[torch.Tensor], guidance: float, **kwargs,
) -> torch.Tensor:
    """v = v_uncond + s (v_cond - v_uncond); one batched call; scale 1 is the conditional v."""
    if uncond is None or guidance == 1.0:
        return model(z, t, cond, **kwargs).float()
    B = z.shape[0]
    doubled = {k: (torch.cat([v, v]) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    v = model(torch.cat([z, z]), torch.cat([t, t]), torch.cat([cond, uncond]), **doubled).float()  # fp32 of a bf16 model
    v_cond, v_uncond = v[:B], v[B:]
    return v_uncond + guidance * (v_cond - v_uncond)


@torch.no_grad()
def sample(
    model: Callable[..., torch.Tensor],
    cond: torch.Tensor,
    shape: tuple,
    uncond: Optional[torch.Tensor] = None,
    steps: int = STEPS,
    guidance: float = GUIDANCE,
    shift: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    scheduler=None,
    progress: Optional[Callable[[int, int], None]] = None,
    **model_kwargs,
) -> torch.Tensor:
    """Integrate from noise (t = 1) to data (t = 0): returns Z_0 of `shape` (B, N, L, C).

    `scheduler`: a flow-matching diffusers scheduler (None: `make_scheduler()`); `progress(i, n)` after each of its n model
    evaluations. `shift` None keeps the scheduler's own (1 for a new one); a value overrides it on a copy. A model with component
    IDs (`sample_ids`) given none in `model_kwargs` gets one draw from `generator`, for every step and both guidance
    halves (the model would draw new ones each call), before the noise: as `MoCAPipeline.generate_latents` draws them.
    """
    device = cond.device
    scheduler = scheduler_with_shift(scheduler or make_scheduler(), shift)
    scheduler.set_timesteps(steps, device=device)
    if "ids" not in model_kwargs and hasattr(model, "sample_ids"):
        model_kwargs["ids"] = model.sample_ids(shape[0], shape[1], generator, device)  # (B, N)
    z = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)  # the state stays fp32 (a model casts)
    B, evaluations = shape[0], len(scheduler.timesteps)  # `steps`, or more for a multi-stage one (Heun: 2 per step)
    for i, ts in enumerate(scheduler.timesteps):
        t = (ts / scheduler.config.num_train_timesteps).expand(B).to(device)
        v = guided_velocity(model, z, t, cond, uncond, guidance, **model_kwargs)
        z = scheduler.step(v, ts, z, return_dict=False)[0]
        if progress is not None:
            progress(i + 1, evaluations)
    return z
