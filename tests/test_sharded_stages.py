"""The stages that shard their work over torchrun's ranks give one process's results (two CPU processes, gloo,
one launch for the whole file): perplexity and block-by-perplexity scoring (float64 sums over the ranks),
lm-eval's scoring (the items split over the ranks, gathered on rank 0: the same records and metrics), LaCo's
similarities and LLM-Pruner's gradients (the same choices), the training-free fits (float64 sums), and `mode=eval`
through its recipe."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import sharded_worker  # noqa: E402
from test_distributed import _torchrun  # noqa: E402


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[dict, dict, Path]:
    """Both ranks' results of one two-process launch, and its directory."""
    import socket

    where = tmp_path_factory.mktemp("sharded")
    with socket.socket() as s:  # a free port: a fixed one collides with the same test run elsewhere on the machine
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = _torchrun(port, [str(HERE / "sharded_worker.py"), str(where)])
    assert res.returncode == 0, res.stderr[-3000:]
    return *(json.loads((where / f"rank{r}.json").read_text()) for r in (0, 1)), where


def test_perplexity_and_block_perplexities_shared_by_two_ranks_match_one_process(ranks):
    r0, r1, _ = ranks
    one = sharded_worker.perplexities()
    p0, p1 = r0["ppl"], r1["ppl"]
    assert p0["ppl"] == p1["ppl"]  # the same reduced sums on both ranks
    for key in ("ppl", "nll", "tokens"):
        assert p0["ppl"][key] == pytest.approx(one["ppl"][key], rel=1e-12, abs=0)
    assert p0["ppl"]["tokens"] == 7 * 15
    assert p0["ppl_batches"] == p1["ppl_batches"] == one["ppl_batches"] // 2 == 2  # 4 batches, 2 each
    # candidates shared (5 starts: 3 on rank 0, 2 on rank 1), each scored whole: exactly one process's values
    assert p0["block"] == p1["block"] == one["block"] and len(one["block"]) == 5
    assert (p0["block_batches"], p1["block_batches"], one["block_batches"]) == (3 * 4, 2 * 4, 5 * 4)


def test_lm_eval_scoring_shared_by_two_ranks_matches_one_process(ranks, tmp_path):
    r0, r1, where = ranks
    assert r1["lm_eval"] == {"calls": 1}  # rank 0 gathers and records; the few-shot call is rank 0's alone
    one = sharded_worker.lm_eval_scores(tmp_path)
    shared = r0["lm_eval"]
    assert shared.pop("calls") == one.pop("calls") == 2
    assert shared["metrics"] == one["metrics"]  # every metric and stderr, to the digit
    assert shared["n_samples"] == one["n_samples"]
    assert len(shared["samples"]) == len(one["samples"]) == 2 * sharded_worker.LIMIT
    for a, b in zip(shared["samples"], one["samples"]):  # one process's order
        assert (a["task"], a["doc_id"], a["gold"], a["prediction"]) == (b["task"], b["doc_id"], b["gold"],
                                                                        b["prediction"])
        assert a["num_tokens"] == b["num_tokens"]
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-6)
        assert a["option_mean_nll"] == pytest.approx(b["option_mean_nll"], abs=1e-6)
    # lm-eval's own files: the same results (but for times and dates) and the same samples
    (d_shared,), (d_one,) = (list((p / "lm_eval").glob("*")) if p == where else list(p.glob("*"))
                             for p in (where, tmp_path))
    res_shared, res_one = (json.loads(next(d.glob("results_*.json")).read_text()) for d in (d_shared, d_one))
    for key in ("results", "groups", "configs", "versions", "n-shot", "higher_is_better", "n-samples"):
        assert res_shared.get(key) == res_one.get(key), key
    for task in sharded_worker.TASKS:
        rows = [[json.loads(line) for line in next(d.glob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
                for d in (d_shared, d_one)]
        assert [r["doc_id"] for r in rows[0]] == [r["doc_id"] for r in rows[1]] == list(range(sharded_worker.LIMIT))
        for a, b in zip(*rows):
            assert len(a["resps"]) == len(b["resps"]) and all(len(x) == len(y) for x, y in zip(a["resps"],
                                                                                              b["resps"]))
            assert {k: a[k] for k in ("doc_hash", "prompt_hash", "target", "arguments", "acc", "acc_norm")} == \
                   {k: b[k] for k in ("doc_hash", "prompt_hash", "target", "arguments", "acc", "acc_norm")}
            for x, y in zip(a["resps"], b["resps"]):
                assert float(x[0][0]) == pytest.approx(float(y[0][0]), abs=1e-6)


def test_laco_and_llm_pruner_shared_by_two_ranks_choose_what_one_process_chooses(ranks):
    r0, r1, _ = ranks
    one = sharded_worker.baselines()
    b0, b1 = r0["baselines"], r1["baselines"]
    assert b0 == b1  # the same reduced similarities and gradients, the same collapses and cuts on both ranks
    assert b0["laco"]["removed"] == one["laco"]["removed"] and len(one["laco"]["removed"]) == 2
    for m0, m in zip(b0["laco"]["merges"], one["laco"]["merges"], strict=True):
        assert (m0["into"], m0["merged"], m0["fallback"]) == (m["into"], m["merged"], m["fallback"])
        assert m0["similarity"] == pytest.approx(m["similarity"], abs=1e-6)
        assert [c[0] for c in m0["candidates"]] == [c[0] for c in m["candidates"]]
    assert b0["laco"]["sha256"] == one["laco"]["sha256"]  # the same merged weights
    # the gradients summed over the ranks rank the units as one process: the same units cut, the same weights
    assert b0["llm_pruner"] == one["llm_pruner"]


def test_linear_fits_shared_by_two_ranks_match_one_process(ranks):
    """ReplaceMe's and the linear inits' normal equations and LinearPatch's scales: each rank sums its batches, the
    float64 sums are added up over the ranks; every rank fits what one process fits."""
    import numpy as np

    r0, r1, _ = ranks
    one = json.loads(json.dumps(sharded_worker.fits()))  # as the ranks wrote it
    f0, f1 = r0["fits"], r1["fits"]
    assert f0 == f1  # the same reduced sums, the same solutions on both ranks
    for key in ("replaceme_log", "linear_patch_log", "ffn_log", "layer_log"):
        for name, value in one[key].items():
            assert f0[key][name] == (pytest.approx(value, rel=1e-9) if isinstance(value, float) else value), name
    assert f0["replaceme_log"]["calibration_tokens"] == 7 * 16  # every rank's tokens counted once
    for key in ("replaceme", "linear_patch"):
        np.testing.assert_allclose(f0[key], one[key], rtol=0, atol=1e-9)
    for kind in ("ffn", "layer"):
        for name, value in one[kind].items():
            np.testing.assert_allclose(f0[kind][name], value, rtol=0, atol=1e-5, err_msg=f"{kind}.{name}")


def test_eval_mode_shared_by_two_ranks_records_what_one_process_records(ranks, tmp_path):
    r0, r1, where = ranks
    assert r1["eval_mode"] == {"rank": 1} and not (where / "eval_mode" / "rank1").exists()
    sharded_worker.eval_mode(tmp_path / "one")
    one, two = (json.loads((d / "results.json").read_text()) for d in (tmp_path / "one", where / "eval_mode"))
    assert two["eval"] == one["eval"] and two["intervals"] == one["intervals"]
    assert two["perplexity"]["model"]["nll"] == pytest.approx(one["perplexity"]["model"]["nll"], rel=1e-12)
    assert two["perplexity"]["model"]["tokens"] == one["perplexity"]["model"]["tokens"]
    rows = [[json.loads(line) for line in (d / "samples.jsonl").read_text().splitlines()]
            for d in (where / "eval_mode", tmp_path / "one")]
    assert [(r["task"], r["doc_id"], r["correct"]) for r in rows[0]] == \
           [(r["task"], r["doc_id"], r["correct"]) for r in rows[1]] and rows[1]


def test_a_call_is_shared_only_where_each_rank_gets_one_process_items():
    """lm-eval draws a task's few-shot examples per rank from one seed (a document would get other examples than in
    one process) and refuses a rank without documents: such calls are scored by rank 0 alone; a first-n sampler
    (MMLU's) takes the same examples wherever the document is scored."""
    from llm_streamline.evaluate.harness import _shardable
    from llm_streamline.evaluate.tasks import build_tasks, leaf_tasks

    built = leaf_tasks(build_tasks(["piqa", "mmlu_anatomy"], offline=True))
    piqa, mmlu = {"piqa": built["piqa"]}, {"mmlu_anatomy": built["mmlu_anatomy"]}
    assert _shardable(piqa, 5, None, 2) and _shardable(piqa, None, 0, 8)
    assert not _shardable(piqa, 5, 1, 2)  # random few-shot examples
    assert _shardable(mmlu, 5, 5, 2)  # first-n few-shot examples
    assert not _shardable(piqa, 1, None, 2)  # one document, two ranks
