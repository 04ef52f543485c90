"""Rectified flow (DESIGN.md §5): Z_t = (1 - t) Z_0 + t eps, velocity target eps - Z_0.

Training draws one t per sample (shared by its components); sampling integrates
dZ/dt = v from t = 1 to 0 with diffusers' FlowMatchEulerDiscreteScheduler (whose sigma is our
t, and whose Euler step Z + (t_next - t) v is exactly ours), with classifier-free guidance.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from moca3d.defaults import GUIDANCE, STEPS, check_shift

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


def scheduler_with_shift(scheduler: FlowMatchEulerDiscreteScheduler, shift: Optional[float]) -> FlowMatchEulerDiscreteScheduler:
    """A fresh copy of `scheduler`, with `shift` (checked) unless None: sampling sets the copy's timesteps, so
    concurrent calls on one pipeline never share them."""
    if shift is None:
        return type(scheduler).from_config(scheduler.config)
    return type(scheduler).from_config(scheduler.config, shift=check_shift(shift))


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
    scheduler: Optional[FlowMatchEulerDiscreteScheduler] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    **model_kwargs,
) -> torch.Tensor:
    """Integrate from noise (t = 1) to data (t = 0): returns Z_0 of `shape` (B, N, L, C).

    `shift` None keeps the scheduler's own (1 for a new one); a value overrides it on a copy. A model with component
    IDs (`sample_ids`) given none in `model_kwargs` gets one draw from `generator`, for every step and both guidance
    halves (the model would draw new ones each call), before the noise: as `MoCAPipeline.generate_latents` draws them.
    """
    device = cond.device
    scheduler = scheduler_with_shift(scheduler or make_scheduler(), shift)
    scheduler.set_timesteps(steps, device=device)
    if "ids" not in model_kwargs and hasattr(model, "sample_ids"):
        model_kwargs["ids"] = model.sample_ids(shape[0], shape[1], generator, device)  # (B, N)
    z = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)  # the state stays fp32 (a model casts)
    B = shape[0]
    for i, ts in enumerate(scheduler.timesteps):
        t = (ts / scheduler.config.num_train_timesteps).expand(B).to(device)
        v = guided_velocity(model, z, t, cond, uncond, guidance, **model_kwargs)
        z = scheduler.step(v, ts, z, return_dict=False)[0]
        if progress is not None:
            progress(i + 1, steps)
    return z
