"""Test-wide settings: W&B off unless a test asks for offline files; a private stage cache per session
(assets such as the SmolLM2 GGUF and the benchmark wheel still come from the user's cache, fetched once)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from llm_streamline import assets


@pytest.fixture(autouse=True, scope="session")
def _isolated_stage_cache(tmp_path_factory):
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ["WANDB_SILENT"] = "true"
    os.environ["LLM_STREAMLINE_STAGES"] = str(tmp_path_factory.mktemp("stages"))
    yield


# Shared by the data and evaluation tests.
@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """SmolLM2 tokenizer parsed once from the GGUF (slow), saved as tokenizer.json (fast to reload)."""
    from transformers import AutoTokenizer

    p = assets.smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


# Shared by the reliability and fault tests: the smoke run through the real CLI in a subprocess.
def _run_smoke_cli(out: Path, stages: Path, *extra: str, kill_at: str | None = None, fsize: int | None = None,
                   env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m llm_streamline experiment=smoke replacement=ffn` with its own stage cache. kill_at: the
    process SIGKILLs itself there (`faults.kill_point`); fsize: no file may grow past that many bytes (the
    OS refuses the write with EFBIG, as a full disk refuses it with ENOSPC)."""
    env = {**os.environ, "WANDB_MODE": "disabled", "LLM_STREAMLINE_STAGES": str(stages), "OMP_NUM_THREADS": "1",
           "HYDRA_FULL_ERROR": "0", **(env_extra or {})}
    env.pop("LLM_STREAMLINE_KILL_AT", None)
    if kill_at:
        env["LLM_STREAMLINE_KILL_AT"] = kill_at

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    replacement = [] if "mode=eval" in extra else ["replacement=ffn"]  # an evaluation refuses what it does not read
    cmd = [sys.executable, "-m", "llm_streamline", "experiment=smoke", *replacement, f"hydra.run.dir={out}", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                          preexec_fn=limit_file_size if fsize else None)


@pytest.fixture(scope="session")
def smoke_cli():
    return _run_smoke_cli


@pytest.fixture(scope="session")
def uninterrupted_dir(tmp_path_factory) -> Path:
    """One uninterrupted smoke run: `<dir>/run` (its run directory) and `<dir>/stages` (its stage cache)."""
    base = tmp_path_factory.mktemp("clean")
    res = _run_smoke_cli(base / "run", base / "stages")
    assert res.returncode == 0, res.stderr[-2000:]
    return base


@pytest.fixture(scope="session")
def uninterrupted(uninterrupted_dir):
    """results.json of the uninterrupted smoke run (the reference the resumed runs must match)."""
    return json.loads((uninterrupted_dir / "run" / "results.json").read_text())
