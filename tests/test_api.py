"""The Python API (`from llm_streamline import compose, run`): the README's example, run exactly as written there,
gives the run's typed record, the same one `results.json` holds; bad input raises the CLI's one line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llm_streamline import record
from llm_streamline.config import ConfigError, RunConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    """The first python block of the README's "Python API" section."""
    section = README.read_text().split("### Python API\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_and_returns_the_run_record(tmp_path, monkeypatch, capsys):
    code = readme_example()
    assert 'compose(overrides=["experiment=smoke"])' in code  # a tiny preset: the test stays seconds of CPU
    monkeypatch.chdir(tmp_path)  # the default run directory is relative, as the CLI's
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    cfg, result = namespace["cfg"], namespace["result"]
    assert isinstance(cfg, RunConfig) and cfg.model.name == "tiny-llama"
    assert isinstance(result, record.RunRecord)
    run_dir = Path(result.path)
    assert (tmp_path / run_dir).resolve().parent == (tmp_path / "outputs" / "runs").resolve() / run_dir.parent.name
    assert run_dir.name.endswith("-tiny-llama-layer")
    on_disk = record.read(tmp_path / run_dir)  # what the report, --compare and W&B read
    assert result.average() == on_disk.average() and result.average().ci == on_disk.average().ci
    assert result.where() == on_disk.where() and (tmp_path / run_dir / "model" / "llm_streamline.json").exists()
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed == f"{on_disk.average().text()} {on_disk.where()} {run_dir}"


def test_compose_refuses_bad_input_with_the_clis_line():
    from llm_streamline import compose

    with pytest.raises(ConfigError, match=r"^train.grad_clip=-1.0: must be > 0"):
        compose(overrides=["experiment=smoke", "train.grad_clip=-1"])
    with pytest.raises(ConfigError, match="reads no replacement"):  # as llm-streamline-eval refuses it
        compose(overrides=["experiment=smoke", "mode=eval", "checkpoint=/tmp", "replacement=ffn"])
