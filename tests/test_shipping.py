"""Using a saved model the way its ecosystem does: evaluating a checkpoint in the dtype and placement the
model preset asks for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from llm_streamline import pipeline
from llm_streamline.cli import CONF_DIR, to_run_config
from llm_streamline.config import ModelConfig, ReplacementConfig
from llm_streamline.models.layers import find_decoder_stack
from llm_streamline.models.loading import load_model
from llm_streamline.models.saving import save_pruned
from llm_streamline.prune import remove_block
from llm_streamline.replace import build_replacement

START, N = 2, 3


def compose_run(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_run_config(compose(config_name="config", overrides=list(overrides)))


def save_tiny(dest: Path, rtype: str) -> Path:
    """The tiny Llama with layers [2, 5) replaced by an untrained `rtype` slot, saved as a run saves it."""
    model, tok = load_model(ModelConfig(name="tiny-llama", source="tiny", family="llama"), seed=0)
    stack = find_decoder_stack(model)
    rcfg = ReplacementConfig(type=rtype)
    slot = build_replacement(rcfg, list(stack.layers[START:START + N]), stack.config)
    remove_block(model, START, N, slot)
    record = {"method": "streamline", "replacement": rtype, "block": {"start": START, "end": START + N}}
    save_pruned(model, tok, dest, rcfg, START, record)
    return dest


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("saved")
    return {r: save_tiny(base / r, r) for r in ("none", "ffn")}


@pytest.mark.parametrize("rtype", ["none", "ffn"])  # a stock checkpoint and one only this package loads
def test_eval_of_a_checkpoint_uses_the_presets_dtype_and_batch_size(rtype, saved, tmp_path, monkeypatch):
    seen = {}
    real = pipeline.run_lm_eval

    def spy(model, tok, tasks, limit, batch_size, **kw):
        seen.update(dtypes={p.dtype for p in model.parameters()}, batch_size=batch_size)
        return real(model, tok, tasks, limit, batch_size, **kw)

    monkeypatch.setattr(pipeline, "run_lm_eval", spy)
    cfg = compose_run("experiment=smoke", "mode=eval", f"checkpoint={saved[rtype]}", "model.dtype=bfloat16",
                      "eval.batch_size=3", "eval.limit=2")
    res = pipeline.evaluate_checkpoint(cfg, tmp_path)
    assert seen == {"dtypes": {torch.bfloat16}, "batch_size": 3}
    assert res["model"]["dtype"] == "bfloat16" and res["eval_settings"]["batch_size"] == 3
    assert all(0 <= m["acc"] <= 1 for m in res["eval"].values())


def test_eval_of_a_checkpoint_honours_device_map(saved, tmp_path):
    cfg = compose_run("experiment=smoke", "mode=eval", f"checkpoint={saved['ffn']}", "model.device_map=cpu",
                      "eval.limit=2")
    res = pipeline.evaluate_checkpoint(cfg, tmp_path)
    assert res["model"]["device_map"] == "cpu" and res["model"]["device"] == "cpu"
