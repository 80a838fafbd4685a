"""Run directories are never overwritten: a run or an evaluation into a directory holding a finished run is
refused with one line (exit 2) before Hydra writes anything. (A failed run leaving no plot behind:
`tests/test_faults.py::test_diverging_training_stops_with_stage_step_and_cause`.)"""

from __future__ import annotations

import os
import subprocess
import sys
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

