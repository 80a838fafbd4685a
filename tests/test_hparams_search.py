"""Optuna hyper-parameter search (conf/hparams_search/): the preset's direction follows the objective, a direction
set against it stops the sweep in one line, and a two-trial study on the tiny model returns each run's recorded
perplexity to Optuna and writes the best trial to optimization_results.yaml."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper",
                    reason="hydra-optuna-sweeper is not installed (pip install -e '.[tune]')")

from llm_streamline.cli import CONF_DIR  # noqa: E402  (after the skip: it registers the resolver the preset uses)

SEARCHED = {"train.lr", "train.epochs", "train.min_lr"}

# Runs the CLI as `python -m llm_streamline` would, keeping the study that Optuna creates so the test can read
# every trial's value (the in-memory study is otherwise gone when the process ends).
DRIVER = """
import json, sys
import optuna
studies = []
def keep(*args, _create=optuna.create_study, **kwargs):
    studies.append(_create(*args, **kwargs))
    return studies[-1]
optuna.create_study = keep
out = sys.argv.pop(1)
from llm_streamline.cli import main
try:
    main()
finally:
    trials = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params}
              for s in studies for t in s.trials]
    json.dump({"directions": [d.name for s in studies for d in s.directions], "trials": trials}, open(out, "w"))
"""


def _sweep(tmp_path, *overrides: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", LLM_STREAMLINE_STAGES=str(tmp_path / "stages"))
    env.pop("HYDRA_FULL_ERROR", None)
    study_file = tmp_path / "study.json"
    res = subprocess.run([sys.executable, "-c", DRIVER, str(study_file), "-m", "experiment=smoke",
                          "hparams_search=ffn_optuna", f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    return res, json.loads(study_file.read_text()) if study_file.exists() else {}


@pytest.mark.parametrize("objective,direction", [("ppl", "minimize"), ("avg_acc", "maximize"),
                                                 ("stability", "maximize")])
def test_preset_direction_follows_the_objective(objective, direction):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hparams_search=ffn_optuna", f"objective={objective}",
                                                       "seed=7"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == direction
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == 7
    assert set(sweeper.params) == SEARCHED and cfg.replacement.type == "ffn"


def test_direction_against_the_objective_stops_the_sweep_in_one_line(tmp_path):
    res, study = _sweep(tmp_path, "hydra.sweeper.direction=maximize", "hydra.sweeper.n_trials=2")
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == (
        "llm-streamline: error: hydra.sweeper.direction=maximize but objective=ppl needs minimize: set "
        "hydra.sweeper.direction=minimize (the hparams_search presets follow the objective)")
    assert "Traceback" not in res.stderr
    assert not list((tmp_path / "sweep").glob("*/results.json")) and not (tmp_path / "stages").exists()


def test_two_trial_study_returns_each_runs_perplexity_and_records_the_best(tmp_path):
    res, study = _sweep(tmp_path, "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert study["directions"] == ["MINIMIZE"]
    trials = study["trials"]
    assert [t["number"] for t in trials] == [0, 1] and {t["state"] for t in trials} == {"COMPLETE"}
    for t in trials:  # trial n is job n: what Optuna was told is the run's recorded pruned perplexity
        [job] = (tmp_path / "sweep").glob(f"{t['number']}-ffn-n2")
        results = json.loads((job / "results.json").read_text())
        assert t["value"] == results["perplexity"]["pruned"]["ppl"]
        assert set(t["params"]) == SEARCHED
        ran = OmegaConf.load(job / ".hydra" / "config.yaml")  # (PyYAML would read 1e-05 as a string)
        assert ran["train"]["lr"] == t["params"]["train.lr"] and ran["train"]["epochs"] == t["params"]["train.epochs"]
        assert ran["train"]["min_lr"] == t["params"]["train.min_lr"] and ran["objective"] == "ppl"
    assert trials[0]["params"] != trials[1]["params"]
    best = min(trials, key=lambda t: t["value"])
    recorded = OmegaConf.to_container(OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml"))
    assert recorded["name"] == "optuna" and recorded["best_value"] == best["value"]
    assert recorded["best_params"] == best["params"]
