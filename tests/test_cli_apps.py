"""Every command answers --help and --version; eval and export are Hydra apps (-m, their own help); an ad-hoc
-m sweep is one W&B group with accuracy in each run's summary."""

from __future__ import annotations

import sys
import time

import pytest

from llm_streamline import __version__, cache, cli, export, report


def _call(monkeypatch, entry, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", [entry.__name__, *args])
    try:
        entry()
    except SystemExit as e:
        assert e.code in (0, None)


COMMANDS = {"llm-streamline": cli.main, "llm-streamline-eval": cli.eval_main, "llm-streamline-export": export.main,
            "llm-streamline-report": report.main, "llm-streamline-cache": cache.cache_main}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_answers_version_and_help(name, monkeypatch, capsys):
    _call(monkeypatch, COMMANDS[name], "--version")
    assert capsys.readouterr().out.strip() == f"llm-streamline {__version__}"  # not Hydra's version
    _call(monkeypatch, COMMANDS[name], "--help")
    out = capsys.readouterr().out
    assert name in out and "powered by Hydra" not in out
    if name == "llm-streamline-eval":  # its own page: what an eval job reads, not the training groups' keys
        assert "checkpoint=<dir>" in out and "eval.perplexity=true" in out and "train:" not in out.split("==")[2]
    if name == "llm-streamline":  # the method group lists its presets, not the typed schemas they extend
        methods = next(line for line in out.splitlines() if line.startswith("method: "))
        assert "sleb" in methods and "schema" not in methods, methods


def test_eval_takes_hydra_flags_anywhere(monkeypatch):
    assert cli.first_override(["-m", "--cfg", "job", "seed=1,2"]) == 3
    assert cli.first_override(["seed=1", "--cfg", "job"]) == 0
    assert cli.first_override(["--info", "defaults", "x=1"]) == 2


def test_an_adhoc_sweep_is_one_wandb_group_with_accuracy_in_every_run(tmp_path, monkeypatch):
    """6 jobs (3 seeds x 2 block sizes) of plain layer removal on the tiny model: ~15 s of CPU."""
    from llm_streamline.tracking import read_offline_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep = tmp_path / "sweep"
    _call(monkeypatch, cli.main, "-m", "experiment=smoke", "wandb.mode=offline", "replacement=none",
          "sparsity=layers2,layers4", "seed=0,1,2", "eval.tasks=[piqa]", "eval.limit=4", "eval.perplexity=false",
          "save=false", f"hydra.sweep.dir={sweep}")
    jobs = sorted(p.parent for p in sweep.glob("*/results.json"))
    assert len(jobs) == 6
    seen = {}
    deadline = time.monotonic() + 60  # wandb-core may append the summary after finish()
    while len(seen) < 6 and time.monotonic() < deadline:
        for job in jobs:
            (wb,) = (job / "wandb").glob("offline-run-*")
            got = read_offline_run(wb)
            if "acc/piqa" in got["summary"]:
                seen[job] = got
        time.sleep(0.5)
    assert len(seen) == 6
    assert {g["group"] for g in seen.values()} == {str(sweep)}  # one group: the sweep directory
    names = {g["name"] for g in seen.values()}
    assert len(names) == 6 and all(n.startswith("tiny-llama-streamline:none-n") for n in names)
    assert all("acc/average" in g["summary"] and "objective/stability" in g["summary"] for g in seen.values())
