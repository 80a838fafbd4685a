"""One line on stderr and a documented exit code for every failure class (see `errors`' docstring): Hydra's
own composition errors (2), interrupts (130 for SIGINT, 143 for SIGTERM, naming the stage), W&B online
without a key or a server (offline, warned, within seconds), and sweeps that go on past a failing job."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from llm_streamline.config import WandbConfig
from llm_streamline.tracking import Tracker


def cli(*args: str, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "llm_streamline", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("override,line", [
    ("sparsity.layer=3", "unknown key sparsity.layer: did you mean sparsity.layers?"),
    ("train.lr=abc", "Error merging override train.lr=abc: Value 'abc' of type 'str' could not be converted to Float"),
    ("model=nope", "In 'config': Could not find 'model/nope'; available: hub, "),
])
def test_hydra_errors_exit_2_with_one_line(override, line, tmp_path):
    res = cli("experiment=smoke", override, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    [only] = res.stderr.strip().splitlines()
    assert only.startswith(f"llm-streamline: error: {line}"), only


@pytest.mark.parametrize("signal_name,code", [("INT", 130), ("TERM", 143)])
def test_interrupt_exits_130_or_143_naming_the_stage_and_keeps_finished_stages(signal_name, code, smoke_cli,
                                                                                 tmp_path):
    stages = tmp_path / "stages"
    res = smoke_cli(tmp_path / "run", stages, kill_at="train:step:2",
                    env_extra={"LLM_STREAMLINE_KILL_SIGNAL": signal_name})
    assert res.returncode == code, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == \
        "llm-streamline: error: interrupted during stage train; finished stages are kept"
    assert "Traceback" not in res.stderr
    log = res.stdout + res.stderr  # the interrupted stage is never logged as done
    assert "== train done" not in log and "== train interrupted after" in log, log[-3000:]
    kept = {p.name.split("-")[0] for p in stages.iterdir()}
    assert {"profile", "eval_dense", "teacher"} <= kept and "train" not in kept
    assert not list(stages.glob("*.partial")) and not list(stages.glob(".tmp*"))


def test_a_sweep_runs_past_a_failing_job_and_exits_nonzero_listing_it(tmp_path):
    sweep = tmp_path / "sweep"
    res = cli("-m", "experiment=smoke", "sparsity.layers=9,2", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert lines[-1] == "llm-streamline: error: 1 sweep job(s) failed (listed above)"
    assert lines[-2].startswith(f"llm-streamline: failed job {sweep / '0-layer-n9'} (exit 2): sparsity.layers=9")
    assert "only 8 layers" in lines[-2]
    assert (sweep / "1-layer-n2" / "results.json").exists()  # the valid job ran after the failing one


@pytest.mark.parametrize("env", [{"WANDB_API_KEY": ""}, {"WANDB_API_KEY": "x" * 40,
                                                         "WANDB_BASE_URL": "http://127.0.0.1:9"}],
                         ids=["no key", "no server"])
def test_wandb_online_without_key_or_server_falls_back_to_offline_quickly(env, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc key
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    t0 = time.perf_counter()
    tracker = Tracker(WandbConfig(mode="online"), tmp_path, config={}, name="t", job_type="run")
    try:
        assert tracker.mode == "offline" and tracker.run is not None
    finally:
        tracker.finish()
    assert time.perf_counter() - t0 < 60
    assert any("W&B online is not possible" in r.getMessage() for r in caplog.records)


def test_a_stage_that_raises_is_logged_as_failed_or_interrupted_never_done(caplog):
    from llm_streamline.recipes.common import Timings

    timings = Timings()
    for stage, exc in (("eval_dense", KeyboardInterrupt()), ("perplexity_dense", RuntimeError("no network"))):
        with caplog.at_level("INFO", logger="llm_streamline"), pytest.raises(type(exc)):
            with timings.stage(stage):
                raise exc
    with caplog.at_level("INFO", logger="llm_streamline"), timings.stage("speed"):
        pass
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("== ")]
    assert [line.rsplit(" after ", 1)[0].rsplit(" in ", 1)[0] for line in lines] == [
        "== eval_dense", "== eval_dense interrupted", "== perplexity_dense", "== perplexity_dense failed",
        "== speed", "== speed done"], lines
