"""Data parallel under torchrun: which rank this is and sums over the ranks. The one home of these for every
stage the ranks share (the similarity profile, SLEB's search, training); an `accelerate.Accelerator` (made by
`recipes.common` when WORLD_SIZE > 1) or None for one process."""

from __future__ import annotations

from collections.abc import Callable

import torch


def ranks(accelerator) -> tuple[int, int]:
    """(processes, this process's index) of a data-parallel job; (1, 0) without an accelerator."""
    return (accelerator.num_processes, accelerator.process_index) if accelerator is not None else (1, 0)


def mine(k: int, accelerator) -> bool:
    """Whether batch k is this rank's: batch k goes to rank k mod P (every rank when alone)."""
    world, rank = ranks(accelerator)
    return k % world == rank


def sum_over_ranks(accelerator) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A float64 tensor summed over the data-parallel ranks (on the rank's card for NCCL, back on the CPU); every
    rank gets the same sums. None in one process."""
    if ranks(accelerator)[0] == 1:
        return None

    def reduce(x: torch.Tensor) -> torch.Tensor:
        return accelerator.reduce(x.to(accelerator.device, torch.float64), "sum").cpu()

    return reduce
