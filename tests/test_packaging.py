"""A regular install runs: the wheel built from this repository, installed into a fresh virtual environment,
runs a tiny job from a directory outside the repository (configs come from the package, not from conf/).

Nothing is downloaded: the wheel is built without build isolation and installed without dependencies; the
fresh environment sees the test environment's packages through a .pth file (a path line in a .pth is not
itself scanned for .pth files, so the test environment's editable install of this project stays invisible).
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0", **extra}


def _run(cmd: list, cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd}: {res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def installed_venv(tmp_path_factory) -> Path:
    """A fresh venv holding only the wheel of this checkout (its dependencies via a .pth to ours)."""
    base = tmp_path_factory.mktemp("install")
    src = base / "src-copy"  # build from a copy: an in-tree build leaves build/ and *.egg-info behind
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("src", "conf"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    env = _clean_env()
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", base / "dist", "."],
         cwd=src, env=env)
    wheel = next((base / "dist").glob("llm_streamline-*.whl"))
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=base, env=env)
    py = venv / "bin" / "python"
    venv_site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], base, env)
                     .stdout.strip())
    (venv_site / "_test_env_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], cwd=base, env=env)
    return venv


@pytest.mark.install
def test_wheel_ships_configs_and_runs_outside_the_repository(installed_venv, tmp_path):
    py = installed_venv / "bin" / "python"
    env = _clean_env(LLM_STREAMLINE_STAGES=str(tmp_path / "stages"))
    where = _run([py, "-c", "import llm_streamline.cli as c; print(c.__file__); print(c.CONF_DIR)"], tmp_path, env)
    module_file, conf_dir = where.stdout.split()
    assert Path(module_file).is_relative_to(installed_venv), module_file  # the wheel, not this checkout
    assert conf_dir == "pkg://llm_streamline.conf"

    work = tmp_path / "elsewhere"
    work.mkdir()
    job = _run([installed_venv / "bin" / "llm-streamline", "model=tiny-llama", "experiment=smoke",
                "hydra.run.dir=out"], cwd=work, env=env)
    console = job.stdout.splitlines()  # the log (stderr: progress bars)
    assert console[-1].split()[:2] == ["wall", "time"]  # the run ends with its summary table, not a path
    assert any(line.startswith("tiny-llama · streamline:layer") and "layers removed [" in line for line in console)
    results = json.loads((work / "out" / "results.json").read_text())
    assert results["model"]["name"] == "tiny-llama"
    assert results["layers"]["n_removed"] == 2  # experiment=smoke's sparsity preset, read from the package
    assert results["perplexity"]["pruned"]["ppl"] > 1


@pytest.mark.install
def test_wheel_ships_the_plan_and_the_presets_architecture(installed_venv, tmp_path):
    """`llm-streamline-plan` is an entry point of the wheel and the GPU presets' config.json files are package data:
    the 7B plan is computed offline, from outside the repository."""
    env = _clean_env(LLM_STREAMLINE_STAGES=str(tmp_path / "stages"), HF_HUB_OFFLINE="1")
    res = _run([installed_venv / "bin" / "llm-streamline-plan", "model=llama2-7b", "data=slimpajama", "eval=paper",
                "plan.disk_free_gib=2048", "plan.host_ram_gib=64"], cwd=tmp_path, env=env)
    assert res.stdout.startswith("plan: llama2-7b (6.74B params, 32 layers, hidden 4096, vocab 32000, bfloat16)")
    assert "| teacher_pairs |" in res.stdout and "\nfits" in res.stdout


def _declared(package: str) -> str:
    import re

    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if re.match(rf"{package}\b", d)]
    return spec[len(package):]


def test_installed_lm_eval_is_in_the_declared_range_with_the_public_api_we_use():
    """pyproject declares lm-eval as a range; the installed version must lie in it, and every public name the
    evaluation package calls must be there (a new lm-eval that drops one fails here, not mid-run)."""
    import inspect
    from importlib.metadata import version

    import lm_eval
    from lm_eval.api.group import Group
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable
    from packaging.specifiers import SpecifierSet

    spec = SpecifierSet(_declared("lm-eval"))
    assert version("lm-eval") in spec, f"lm-eval {version('lm-eval')} is outside the declared {spec}"
    assert ">=" in str(spec) and "<" in str(spec).replace("<=", "<")  # a range, not a pin
    assert {"include_path", "include_defaults"} <= set(inspect.signature(TaskManager).parameters)
    for name in ("load", "all_tasks", "all_subtasks", "all_groups", "all_tags", "task_index"):
        assert hasattr(TaskManager, name), name
    assert {"model", "tasks", "task_manager", "limit", "log_samples", "bootstrap_iters", "random_seed",
            "fewshot_random_seed"} <= set(inspect.signature(lm_eval.simple_evaluate).parameters)
    assert hasattr(Group, "get_all_tasks") and hasattr(Group, "get_all_groups")
    assert hasattr(EvaluationTracker, "save_results_aggregated") and hasattr(EvaluationTracker, "save_results_samples")
    assert hasattr(HFLM, "_loglikelihood_tokens") and callable(handle_non_serializable)
