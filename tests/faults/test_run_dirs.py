"""Run directories are never overwritten: a run or an evaluation into a directory holding a finished run, or one
another live run holds, is refused with one line (exit 2) before Hydra writes anything; default names are
unique per launch; a model/ folder no run wrote there is refused, a killed save's leftovers removed.
(A failed run leaving no plot behind:
`tests/test_faults.py::test_diverging_training_stops_with_stage_step_and_cause`.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ENTRY_POINTS = {"llm-streamline": "from llm_streamline.cli import main as m",
                "llm-streamline-eval": "from llm_streamline.cli import eval_main as m"}


def cli(entry: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    code = f"import sys; {ENTRY_POINTS[entry]}; sys.argv = [{entry!r}, *sys.argv[1:]]; m()"
    env = dict(os.environ, WANDB_MODE="disabled", HYDRA_FULL_ERROR="0", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_finished_run_directory_is_refused_and_left_as_it_was(entry, tmp_path):
    run = tmp_path / "finished"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- experiment=smoke\n")
    (run / "results.json").write_text('{"eval": {}}')
    (run / "similarity_profile.png").write_bytes(b"png")
    before = snapshot(run)
    res = cli(entry, "experiment=smoke", f"hydra.run.dir={run}", cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines() == [
        f"llm-streamline: error: output directory {run} holds a finished run (results.json); "
        "give another hydra.run.dir"]
    assert snapshot(run) == before


@pytest.mark.parametrize("link_to", ["missing", "loop"])
def test_a_dangling_or_looping_symlink_run_dir_fails_in_one_line(link_to, tmp_path):
    link = tmp_path / "run"
    link.symlink_to(tmp_path / "missing" if link_to == "missing" else link)
    res = cli("llm-streamline", "experiment=smoke", f"hydra.run.dir={link}/job", cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].endswith("is a dangling symlink or a symlink loop")



# ------------------------------------------------------------------------- issue 26: one directory, one run
def smoke(run_dir: Path | None, stages: Path, *extra: str, cwd: Path, env_extra: dict | None = None):
    """`llm-streamline experiment=smoke` started in the background (its own stage cache)."""
    env = dict(os.environ, WANDB_MODE="disabled", HYDRA_FULL_ERROR="0", OMP_NUM_THREADS="1",
               LLM_STREAMLINE_STAGES=str(stages), **(env_extra or {}))
    args = [sys.executable, "-m", "llm_streamline", "experiment=smoke", *extra]
    if run_dir is not None:
        args.append(f"hydra.run.dir={run_dir}")
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_second_run_into_a_claimed_directory_is_refused_and_a_killed_save_is_cleaned_up(tmp_path):
    """A stops itself inside its save (SIGSTOP, a `.tmp-model*` half written) holding its claim; B into the same
    directory is refused in one line; A is then SIGKILLed; C reruns there: the leftover goes, the run finishes."""
    run, stages = tmp_path / "run", tmp_path / "stages"
    a = smoke(run, stages, cwd=tmp_path,
              env_extra={"LLM_STREAMLINE_KILL_AT": "save", "LLM_STREAMLINE_KILL_SIGNAL": "STOP"})
    try:
        deadline = time.monotonic() + 300
        while not list(run.glob(".tmp-model*")) and a.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert a.poll() is None and list(run.glob(".tmp-model*")), a.communicate()[1][-2000:]
        b = smoke(run, stages, cwd=tmp_path)
        _, err = b.communicate(timeout=300)
        assert b.returncode == 2, err[-2000:]
        assert err.strip().splitlines() == [
            f"llm-streamline: error: output directory {run} is in use by another run (pid {a.pid} on "
            f"{os.uname().nodename} since " + err.split(" since ", 1)[1].strip()]
    finally:
        a.kill()
        a.communicate()
    assert list(run.glob(".tmp-model*")) and not (run / "results.json").exists()
    c = smoke(run, stages, cwd=tmp_path)
    _, err = c.communicate(timeout=600)
    assert c.returncode == 0, err[-2000:]
    assert not list(run.glob(".tmp-model*")) and (run / "model" / "llm_streamline.json").exists()


def test_two_default_named_launches_in_the_same_second_get_their_own_directories(tmp_path):
    runs = [smoke(None, tmp_path / "stages", f"train.lr={lr}", cwd=tmp_path) for lr in ("1e-3", "2e-3")]
    for p in runs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    results = sorted((tmp_path / "outputs" / "runs").glob("*/*/results.json"))
    assert len(results) == 2, results
    assert sorted(json.loads(r.read_text())["train_config"]["lr"] for r in results) == [1e-3, 2e-3]
    assert all((r.parent / "model" / "llm_streamline.json").exists() for r in results)


@pytest.mark.parametrize("what", ["a user's model folder", "a model of another run copied in", "a file"])
def test_a_foreign_model_folder_in_the_run_directory_is_refused_before_any_work(what, tmp_path):
    from llm_streamline import rundir

    run = tmp_path / "run"
    model = run / "model"
    model.mkdir(parents=True)
    if what == "a file":
        model.rmdir()
        model.write_text("mine")
    else:
        (model / "model.safetensors").write_bytes(b"weights")
        if what == "a model of another run copied in":
            (model / "llm_streamline.json").write_text("{}")
    before = snapshot(run)
    earlier = rundir.claim(run)
    try:
        with pytest.raises(rundir.RunDirError, match=f"output directory {run} already holds model/, not written"):
            rundir.prepare(run, earlier, saves_model=True)
        rundir.prepare(run, earlier, saves_model=False)  # save=false / mode=eval write no model: nothing to refuse
    finally:
        rundir.release(run)
    assert {k: v for k, v in snapshot(run).items() if k != rundir.CLAIM} == before


def test_ranks_of_one_data_parallel_job_share_the_run_tag_and_rank0_holds_the_claim(tmp_path, monkeypatch):
    """torchrun's ranks are one run: the same default directory (tag from the launcher) and one claim (rank 0's);
    a later rank neither takes the lock nor removes the other ranks' half-written files."""
    from llm_streamline import rundir

    tags = []
    for rank in ("0", "1"):
        monkeypatch.setattr(rundir, "_TAG", [])
        for k, v in {"WORLD_SIZE": "2", "RANK": rank, "TORCHELASTIC_RUN_ID": "job-42"}.items():
            monkeypatch.setenv(k, v)
        tags.append(rundir.run_tag())
    assert tags[0] == tags[1]
    monkeypatch.setattr(rundir, "_TAG", [])
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-43")
    assert rundir.run_tag() != tags[0]

    monkeypatch.setenv("RANK", "0")
    assert rundir.claim(tmp_path) is False
    half_written = tmp_path / ".results.json.abcd1234.tmp"
    half_written.write_text("{")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(rundir, "_HELD", {})  # rank 1 is another process: it holds nothing yet
    assert rundir.claim(tmp_path) is True  # no BlockingIOError: rank 1 does not lock what rank 0 holds
    rundir.prepare(tmp_path, True, saves_model=True)
    assert half_written.exists()
