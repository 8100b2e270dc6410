"""The few collective operations the engine and strategies need (no-ops in a single process).

Under DDP the gradients are already all-reduced when the engine scores them; signals a strategy
computes itself (IST's damped forward passes, SALF's calibration pass) are per rank and must be
combined before the choice, so every rank chooses from the same numbers.

Under FSDP2 (``fully_shard``) every parameter and gradient is a DTensor of which each rank holds a shard:
the engine sums squares over the local shards and adds them up over ranks with one all_reduce, so the
per-tensor norms are exact and the same on every rank without gathering a gradient.
"""

from __future__ import annotations

import contextlib

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


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of ``values`` over all ranks, in fp64, returned on CPU (one all_reduce)."""
    out = values.detach().to(torch.float64)
    if world()[0] == 1:
        return out.cpu()
    out = out.to(_comm_device())
    torch.distributed.all_reduce(out)
    return out.cpu()


def mean_of_measured(scores: torch.Tensor, measured: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer: the mean of ``scores`` over the ranks that measured the layer, and whether any did.

    For scores computed from each rank's own batch (``ir``'s hidden-state cosine), so every rank ranks the
    layers by the same numbers; one all_reduce of 2 L floats."""
    size, _ = world()
    if size == 1:
        return scores.double(), measured.bool()
    L = measured.numel()
    both = torch.cat([torch.where(measured, scores.double(), torch.zeros((), dtype=torch.float64)),
                      measured.double()])
    total = sum_over_ranks(both)
    counts = total[L:]
    seen = counts > 0
    return torch.where(seen, total[:L] / counts.clamp(min=1), scores.double()), seen


# ---- FSDP2 (DTensor parameters) --------------------------------------------------------------------
def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor: nothing can be sharded
        return None
    return DTensor


def is_sharded(t: torch.Tensor) -> bool:
    """True for a DTensor (an FSDP2 ``fully_shard`` parameter or its gradient)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def local_part(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this rank holds: a DTensor's local shard (possibly empty), else ``t`` itself."""
    return t.to_local() if is_sharded(t) else t


def copies_over_ranks(params: list[torch.Tensor], names: list[str]) -> torch.Tensor:
    """For each parameter, on how many ranks each of its elements lies (fp64 [n]).

    Summing every rank's local sums of squares and dividing by this count gives the exact full-tensor
    sum. A ``fully_shard`` parameter on a 1-D mesh lies once (Shard(0)); a replicated mesh dimension
    (HSDP) multiplies the count; a plain tensor in a sharded model is taken as a copy on every rank.
    The mesh must span every rank, and a partial placement is refused (its shards do not add up to the
    tensor's square sum)."""
    size, _ = world()
    out = torch.full((len(params),), float(size), dtype=torch.float64)
    for k, (p, name) in enumerate(zip(params, names, strict=True)):
        if not is_sharded(p):
            continue
        mesh = p.device_mesh
        if mesh.size() != size:
            raise ValueError(f"parameter '{name}' is sharded over a device mesh of {mesh.size()} ranks, but "
                             f"the process group has {size}: irtuning needs the mesh to span every rank")
        copies = 1
        for dim, placement in enumerate(p.placements):
            if placement.is_replicate():
                copies *= mesh.size(dim)
            elif not placement.is_shard():
                raise ValueError(f"parameter '{name}' has placement {placement} on mesh dimension {dim}: "
                                 f"irtuning scores Shard or Replicate placements only")
        out[k] = float(copies)
    return out


@contextlib.contextmanager
def unsharded_root(model: torch.nn.Module):
    """Within the block, the parameters of the outermost FSDP2 module (embeddings, final norm, LM head:
    those no ``fully_shard``-ed decoder layer owns) are whole tensors on every rank, for code that reads
    them outside the model's forward (SALF's calibration reads the LM head). Collective: every rank must
    enter it. Does nothing for a model that is not FSDP2-sharded."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        FSDPModule = ()  # noqa: N806
    root = next((m for m in model.modules() if isinstance(m, FSDPModule)), None)
    if root is None:
        yield
        return
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


def frobenius_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """‖t‖_F of each tensor (fp64 [n]); FSDP2-sharded ones from the local shards' sums of squares and one
    all_reduce of n floats (every rank must call it), so each rank gets the whole tensors' norms."""
    sq = torch.tensor([float(local_part(t).detach().double().square().sum()) for t in tensors], dtype=torch.float64)
    if any(is_sharded(t) for t in tensors):
        sq = sum_over_ranks(sq / copies_over_ranks(list(tensors), [f"tensor {i}" for i in range(len(tensors))]))
    return sq.sqrt()
