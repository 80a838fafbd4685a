"""Fault injection for the reliability tests: `LLM_STREAMLINE_KILL_AT=<point>` makes the process SIGKILL
itself when it reaches that point (e.g. `train:step:2`, `eval_pruned`), the way a cluster pre-emption or
an OOM killer would. Unset in normal use: one environment lookup per call, nothing else."""

from __future__ import annotations

import os
import signal


def checkpoint(point: str) -> None:
    if os.environ.get("LLM_STREAMLINE_KILL_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)
