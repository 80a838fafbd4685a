"""The stability metric (method.md section 3), checked against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llm_streamline.evaluate.stability import confidence, softmax, stability


def row(task: str, doc_id: int, ppls: list[float], ntok: list[int], correct: bool) -> dict:
    """A harness row whose options have the given per-token perplexities (loglik = -n ln p)."""
    lls = [-n * math.log(p) for p, n in zip(ppls, ntok)]
    pred = int(np.argmax(lls))
    return {"task": task, "doc_id": doc_id, "gold": pred if correct else 1 - pred,
            "loglikelihoods": lls, "num_tokens": ntok, "prediction": pred, "correct": correct}


# Per-token perplexities chosen so that the population std is exact: [1, 3] -> 1, [2, 2] -> 0,
# [1, 5] -> 2. Token counts differ per option so that a sequence-level perplexity would differ.
DENSE = [
    row("piqa", 0, [1.0, 3.0], [2, 3], True),
    row("piqa", 1, [2.0, 2.0], [4, 1], False),
    row("piqa", 2, [1.0, 5.0], [1, 5], True),
]
S = [1.0, 0.0, 2.0]
W = [math.exp(s) / sum(math.exp(x) for x in S) for s in S]


def flipped(rows: list[dict], which: set[int]) -> list[dict]:
    return [{**r, "correct": (not r["correct"]) if r["doc_id"] in which else r["correct"]} for r in rows]


def test_confidence_is_population_std_of_per_token_perplexity():
    assert [confidence(r) for r in DENSE] == pytest.approx(S, abs=1e-12)


def test_identical_rows_give_one():
    out = stability(DENSE, DENSE)
    assert out["tasks"]["piqa"]["stability"] == pytest.approx(1.0)
    assert out["tasks"]["piqa"]["agreement"] == 1.0
    assert out["average"]["stability"] == pytest.approx(1.0)
    assert out["average"]["agreement"] == 1.0


def test_effective_items_tells_a_one_hot_weighting():
    spread = [{"task": "t", "doc_id": i, "gold": 0, "loglikelihoods": [-1.0, -1.0 - 5.0 * i],
               "num_tokens": [1, 1], "prediction": 0, "correct": True} for i in range(4)]
    out = stability(spread, spread)["tasks"]["t"]
    assert out["effective_items"] == pytest.approx(1.0, abs=1e-3)  # item 3's spread dwarfs the others
    flat = [dict(r, loglikelihoods=[-1.0, -1.5]) for r in spread]
    assert stability(flat, flat)["tasks"]["t"]["effective_items"] == pytest.approx(4.0)


@pytest.mark.parametrize("i", [0, 1, 2])
def test_one_flip_costs_exactly_its_weight(i):
    out = stability(DENSE, flipped(DENSE, {i}))["tasks"]["piqa"]
    assert out["stability"] == pytest.approx(1.0 - W[i], abs=1e-12)
    assert out["agreement"] == pytest.approx(2 / 3)


def test_not_the_authors_prefix_sum():
    # Flipping the heaviest item (doc 2): the formula gives 1 - w_2 = w_0 + w_1; the authors'
    # sum(w[:M]) with M = 2 gives the same number only by accident of file order. Flip doc 0 instead:
    # the formula gives w_1 + w_2, sum(w[:2]) would still give w_0 + w_1.
    out = stability(DENSE, flipped(DENSE, {0}))["tasks"]["piqa"]["stability"]
    assert out == pytest.approx(W[1] + W[2])
    assert out != pytest.approx(W[0] + W[1])


def test_order_of_rows_does_not_matter():
    a = stability(DENSE, flipped(DENSE, {2}))
    b = stability(DENSE[::-1], flipped(DENSE, {2})[::-1])
    assert a == b


def test_large_confidence_does_not_overflow():
    # per-token perplexities up to ~4001: s = 1000 and 2000, exp(s) overflows a naive softmax
    dense = [row("boolq", 0, [1.0, 2001.0], [3, 2], True),
             row("boolq", 1, [1.0, 4001.0], [1, 4], True),
             row("boolq", 2, [7.0, 7.0], [2, 2], False)]
    s = [confidence(r) for r in dense]
    assert s == pytest.approx([1000.0, 2000.0, 0.0])
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.exp(2000.0))
    w = softmax(s)
    assert np.all(np.isfinite(w)) and w.sum() == pytest.approx(1.0)
    out = stability(dense, flipped(dense, {1}))["tasks"]["boolq"]["stability"]
    assert out == pytest.approx(0.0, abs=1e-300)  # docs 0 and 2 kept: weight ~e^-1000, all on doc 1
    assert stability(dense, flipped(dense, {0}))["tasks"]["boolq"]["stability"] == pytest.approx(1.0)


def test_mmlu_is_unweighted_mean_over_subjects():
    a = [row("mmlu_anatomy", i, [1.0, 3.0 + i], [2, 2], True) for i in range(4)]
    b = [row("mmlu_astronomy", i, [1.0, 2.0], [1, 1], True) for i in range(2)]
    pruned = flipped(a, {0}) + b  # anatomy loses one item, astronomy keeps everything
    out = stability(a + b, pruned)
    anat = out["mmlu_subjects"]["mmlu_anatomy"]["stability"]
    s = np.array([np.std([1.0, 3.0 + i]) for i in range(4)])
    assert anat == pytest.approx(1.0 - softmax(s)[0])
    assert out["mmlu_subjects"]["mmlu_astronomy"]["stability"] == pytest.approx(1.0)
    assert out["tasks"]["mmlu"]["stability"] == pytest.approx((anat + 1.0) / 2)  # not size-weighted
    assert out["tasks"]["mmlu"]["agreement"] == pytest.approx((3 / 4 + 1.0) / 2)
    assert set(out["tasks"]) == {"mmlu"}


def test_average_over_tasks():
    other = [row("boolq", 0, [1.0, 2.0], [1, 1], True), row("boolq", 1, [1.0, 2.0], [1, 1], False)]
    out = stability(DENSE + other, flipped(DENSE, {0}) + flipped(other, {1}))
    assert out["tasks"]["boolq"]["stability"] == pytest.approx(0.5)
    assert out["average"]["stability"] == pytest.approx((1 - W[0] + 0.5) / 2)
    assert out["average"]["agreement"] == pytest.approx((2 / 3 + 0.5) / 2)


def test_mismatched_rows_raise():
    with pytest.raises(ValueError, match="different doc_ids"):
        stability(DENSE, DENSE[:2])
    with pytest.raises(ValueError, match="task sets differ"):
        stability(DENSE, [{**r, "task": "arc_easy"} for r in DENSE])
    with pytest.raises(ValueError, match="duplicate"):
        stability(DENSE + DENSE[:1], DENSE)
