"""Faults: numerical ones found in a run, disk ones met while writing, and injected ones for the tests.

NumericalFault  NaN/inf where a number must be finite (a training loss, a log-likelihood, a perplexity
                batch). The message names the stage, the step or item, and the cause: the first module whose
                output is not finite, or the parameters that are not.
Disk errors     an OSError whose errno says the disk is full, read-only or refuses the file; the CLI turns
                it into one line naming the stage and the file (`disk_errno`).
Injection       `LLM_STREAMLINE_KILL_AT=<point>` makes the process SIGKILL itself when it reaches that point
                (e.g. `train:step:2`, `eval_pruned`), the way a cluster pre-emption or an OOM killer would.
                `LLM_STREAMLINE_KILL_SIGNAL=INT|TERM` sends Ctrl-C's or a pre-emption notice's signal instead.
                Unset in normal use: one environment lookup per call, nothing else.
"""

from __future__ import annotations

import errno
import re

import torch
from torch import nn

from llm_streamline import stages
from llm_streamline.models.devices import input_device

DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


class NumericalFault(RuntimeError):
    def __init__(self, stage: str, where: str, what: str, cause: str):
        self.stage, self.where, self.what, self.cause = stage, where, what, cause
        super().__init__(f"{stage}: {what} at {where}; cause: {cause}")


kill_point = stages.kill_point  # defined with the stage writer, which models/ may import (saving has one)


def disk_errno(e: BaseException) -> int | None:
    """The errno of a disk failure (full, read-only, refused), or None. safetensors reports its I/O errors
    as `SafetensorError("... I/O error: File too large (os error 27)")`, not as OSError: read it from there."""
    if isinstance(e, OSError):
        return e.errno if e.errno in DISK_ERRNOS else None
    if type(e).__name__ == "SafetensorError":
        m = re.search(r"\(os error (\d+)\)", str(e))
        if m and int(m.group(1)) in DISK_ERRNOS:
            return int(m.group(1))
    return None


def nonfinite_parameters(modules: list[nn.Module] | nn.Module, limit: int = 3) -> list[str]:
    """Names of parameters holding NaN/inf (at most `limit`)."""
    named = modules.named_parameters() if isinstance(modules, nn.Module) else (
        (f"{j}.{n}", p) for j, m in enumerate(modules) for n, p in m.named_parameters())
    return [n for n, p in named if not torch.isfinite(p).all()][:limit]


@torch.no_grad()
def first_nonfinite_output(model: nn.Module, input_ids: torch.Tensor) -> str | None:
    """Run `model` on `input_ids` and name the first module (in execution order) whose output is not finite.

    Forward hooks fire when a module returns, children before their parents, so the first hit is the
    innermost module where the NaN/inf appears."""
    found: list[str] = []

    def hook(name):
        def fn(module, args, output):
            t = output[0] if isinstance(output, (tuple, list)) else output
            if not found and isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
                found.append(f"{name} ({type(module).__name__})")
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        model(input_ids=input_ids.to(input_device(model)), use_cache=False)  # the probe comes from the CPU data
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def diagnose(model: nn.Module, input_ids: torch.Tensor | None) -> str:
    """The cause of a non-finite result in `model`'s output, as one phrase."""
    bad = nonfinite_parameters(model)
    if bad:
        return f"non-finite weights in {', '.join(bad)}"
    if input_ids is not None:
        where = first_nonfinite_output(model, input_ids)
        if where:
            return f"first non-finite output at {where}"
        return "not reproduced on a probe input: an overflow on this item's input (try model.dtype=float32)"
    return "unknown (no probe input)"


def check_loglikelihoods(rows: list[dict], stage: str, model: nn.Module, probe_ids: torch.Tensor | None) -> None:
    """Stop with a NumericalFault if any per-option log-likelihood of an evaluation is NaN/inf."""
    for row in rows:
        if "loglikelihoods" not in row:  # a generative item: no options scored
            continue
        lls = torch.tensor(row["loglikelihoods"], dtype=torch.float64)
        if not torch.isfinite(lls).all():
            raise NumericalFault(stage, f"task {row['task']} doc {row['doc_id']}",
                                 f"log-likelihoods {row['loglikelihoods']}", diagnose(model, probe_ids))
