"""What the trainers share to run data-parallel under a launcher (`accelerate launch`, torchrun: WORLD_SIZE > 1).

Each process takes its rows of every global batch, DistributedDataParallel averages the gradients, and the
first process alone writes; one process (no launcher) runs as before, with no process group at all.
"""

from __future__ import annotations

import os

import torch

from moca3d.errors import ConfigError


def launched_processes(device: str):
    """(accelerate's PartialState, this process's device) when launched as several processes (`accelerate launch`,
    torchrun: WORLD_SIZE > 1), else (None, `device`)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None, torch.device(device)
    from accelerate import PartialState  # not an Accelerator: its mixed precision would bind the DiT run after this one

    state = PartialState(cpu=torch.device(device).type == "cpu")
    return state, state.device


def batch_rows(batch_size: int, rank: int, world: int) -> slice:
    """Process `rank`'s rows of a global batch split over `world` processes (rank*B/world ...); a one-line
    ConfigError when the processes do not divide the batch."""
    if batch_size % world:
        raise ConfigError(f"batch_size {batch_size} must be divisible by the {world} processes")
    local = batch_size // world
    return slice(rank * local, (rank + 1) * local)


def process_mean(stats: dict[str, float], processes, device: torch.device) -> dict[str, float]:
    """The processes' mean of each statistic (`stats` itself without a launcher); a collective: every process calls it."""
    if not processes:
        return stats
    values = torch.tensor(list(stats.values()), device=device)
    torch.distributed.all_reduce(values)
    return dict(zip(stats, (values / processes.num_processes).tolist()))


def process_max(value: float, processes, device: torch.device) -> float:
    """The largest of the processes' `value`s (`value` itself without a launcher): one number they all act on,
    e.g. the elapsed seconds a time limit and its LR schedule read; a collective: every process calls it."""
    return process_maxima([value], processes, device)[0]


def process_maxima(values: list[float], processes, device: torch.device) -> list[float]:
    """`process_max` of several numbers in one collective (`values` themselves without a launcher)."""
    if not processes:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()
