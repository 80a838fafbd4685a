"""A killed run loses nothing that finished: SIGKILL mid-training and mid-evaluation, then a rerun resumes
from the last finished stage and ends with results identical to an uninterrupted run. Corrupt inputs fail
with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

COMPARED = ("layers", "params", "eval", "stability", "perplexity", "train")


@pytest.mark.parametrize("kill_at", ["train:step:2", "eval_pruned"])
def test_sigkill_then_rerun_resumes_and_matches(kill_at, uninterrupted, smoke_cli, tmp_path):
    stages = tmp_path / "stages"
    killed = smoke_cli(tmp_path / "killed", stages, kill_at=kill_at)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "killed" / "results.json").exists()
    assert not list(stages.glob("*.partial")) and not list(stages.glob(".tmp*"))
    finished = {p.name.split("-")[0] for p in stages.iterdir()}
    assert {"profile", "eval_dense"} <= finished  # stages before the kill were kept
    resumed = smoke_cli(tmp_path / "resumed", stages)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    again = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert again["cache"]["dense_eval_reused"]
    if kill_at == "eval_pruned":  # training had finished: it is reused, not redone
        assert "train" not in again["timings"]
    for key in COMPARED:
        assert again[key] == uninterrupted[key], key


def test_corrupt_checkpoint_fails_with_one_line(tmp_path, uninterrupted):
    import shutil

    ckpt = tmp_path / "model"
    shutil.copytree(uninterrupted["checkpoint"], ckpt)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "llm_streamline", "experiment=smoke", "mode=eval",
                          f"checkpoint={ckpt}", f"hydra.run.dir={tmp_path / 'out'}"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("llm-streamline: error:") and "safetensors" in last


def test_missing_asset_offline_fails_with_one_line(tmp_path):
    env = dict(os.environ, WANDB_MODE="disabled", LLM_STREAMLINE_CACHE=str(tmp_path / "empty-cache"),
               LLM_STREAMLINE_OFFLINE="1")
    res = subprocess.run([sys.executable, "-m", "llm_streamline", f"hydra.run.dir={tmp_path / 'out'}"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert "not cached" in last and "offline" in last
