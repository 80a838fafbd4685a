"""Data parallel under torchrun: how many processes the launcher started, which rank this is and sums over the
ranks. The one home of these for every stage the ranks share (the similarity profile, SLEB's search, training),
for the run-directory claim and for the plan; an `accelerate.Accelerator` (made by `recipes.common` when
WORLD_SIZE > 1) or None for one process. Imports no torch: the run-directory claim reads the launch before it."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def world_size() -> int:
    """Processes of a data-parallel job (torchrun sets WORLD_SIZE); 1 when launched alone."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launch_rank() -> int | None:
    """This process's rank as the launcher set it (RANK) in a data-parallel job, else None."""
    return int(os.environ.get("RANK", "0")) if world_size() > 1 else None


def ranks(accelerator) -> tuple[int, int]:
    """(processes, this process's index) of a data-parallel job; (1, 0) without an accelerator."""
    return (accelerator.num_processes, accelerator.process_index) if accelerator is not None else (1, 0)


def mine(k: int, accelerator) -> bool:
    """Whether batch k is this rank's: batch k goes to rank k mod P (every rank when alone)."""
    world, rank = ranks(accelerator)
    return k % world == rank


def shares(count: int, accelerator, lockstep: bool = False) -> list[tuple[int, bool]]:
    """This rank's batches of `count`, as (k, counted): batch k goes to rank k mod P. `lockstep` (a sharded model,
    whose every forward is a collective: `models.sharded`): every rank runs as many forwards, a rank short of
    batches running batch 0 again with its result dropped (counted False), so the ranks' all-gathers pair up."""
    world, rank = ranks(accelerator)
    out = [(k, True) for k in range(rank, count, world)]
    if lockstep:
        out += [(0, False)] * (-(-count // world) - len(out))
    return out


def sum_over_ranks(accelerator) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A float64 tensor summed over the data-parallel ranks (on the rank's card for NCCL, back on the CPU); every
    rank gets the same sums. None in one process."""
    if ranks(accelerator)[0] == 1:
        return None

    def reduce(x: torch.Tensor) -> torch.Tensor:
        import torch

        return accelerator.reduce(x.to(accelerator.device, torch.float64), "sum").cpu()

    return reduce
