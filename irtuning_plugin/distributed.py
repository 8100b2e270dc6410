"""The few collective operations the engine and strategies need (no-ops in a single process).

Under DDP the gradients are already all-reduced when the engine scores them; signals a strategy
computes itself (IST's damped forward passes, SALF's calibration pass) are per rank and must be
combined before the choice, so every rank chooses from the same numbers.
"""

from __future__ import annotations

import torch


def world() -> tuple[int, int]:
    """(world size, rank); (1, 0) outside torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _comm_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_over_ranks(values: list[float]) -> list[float]:
    """Element-wise mean of ``values`` over all ranks (fp64)."""
    size, _ = world()
    if size == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    torch.distributed.all_reduce(t)
    return (t / size).cpu().tolist()
