"""The stability metric (method.md section 3), checked against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llm_streamline.evaluate.harness import option_mean_nll
from llm_streamline.evaluate.stability import confidence, softmax, stability


def row(task: str, doc_id: int, mean_nll: list[float], ntok: list[int], correct: bool,
        ctx: tuple[float, int] = (0.0, 0)) -> dict:
    """A harness row whose options have the given mean NLL over context + option. ``ctx`` = (summed NLL
    of the context's scored tokens, their number); the option log-likelihoods are derived from it."""
    lls = [ctx[0] - m * (ctx[1] + n) for m, n in zip(mean_nll, ntok)]
    pred = int(np.argmax(lls))
    return {"task": task, "doc_id": doc_id, "gold": pred if correct else 1 - pred,
            "loglikelihoods": lls, "num_tokens": ntok, "prediction": pred, "correct": correct,
            "option_mean_nll": [option_mean_nll(ll, n, ctx) for ll, n in zip(lls, ntok)]}


# Mean NLLs chosen so that the population std is exact: [1, 3] -> 1, [2, 2] -> 0, [1, 5] -> 2.
DENSE = [
    row("piqa", 0, [1.0, 3.0], [2, 3], True, ctx=(7.5, 5)),
    row("piqa", 1, [2.0, 2.0], [4, 1], False, ctx=(3.0, 2)),
    row("piqa", 2, [1.0, 5.0], [1, 5], True),
]
S = [1.0, 0.0, 2.0]
W = [math.exp(s) / sum(math.exp(x) for x in S) for s in S]


def test_option_mean_nll_is_context_plus_option_nll_over_their_tokens():
    # context: 4 scored tokens with NLL 6.0 in all; option: 2 tokens with log-likelihood -3.0
    assert option_mean_nll(-3.0, 2, (6.0, 4)) == pytest.approx((6.0 + 3.0) / 6)
    assert DENSE[0]["option_mean_nll"] == pytest.approx([1.0, 3.0])


def test_confidence_is_population_std_of_option_mean_nll():
    assert [confidence(r) for r in DENSE] == pytest.approx(S, abs=1e-12)


def test_rows_without_option_mean_nll_are_refused():
    old = {k: v for k, v in DENSE[0].items() if k != "option_mean_nll"}
    with pytest.raises(ValueError, match="no option_mean_nll"):
        stability([old], [old])


def test_the_old_definition_degenerates_and_the_new_one_does_not():
    """Two-option items with long shared contexts, as on ARC/PIQA: the option-only per-token perplexity
    exp(-loglik/n) of a 1-token option spreads over orders of magnitude (s up to ~e^12), so its softmax is
    one-hot; the mean NLL over context + option moves by a fraction of a nat and the weights stay smooth."""
    rows = []
    for i in range(20):
        ctx = (3.0 * 30, 30)  # 30 context tokens at 3 nats each
        lls = [-1.0 - 0.6 * i, -2.0]  # option 0 gets less likely item by item
        rows.append({"task": "arc_easy", "doc_id": i, "gold": 1, "loglikelihoods": lls, "num_tokens": [1, 1],
                     "prediction": int(np.argmax(lls)), "correct": int(np.argmax(lls)) == 1,
                     "option_mean_nll": [option_mean_nll(ll, 1, ctx) for ll in lls]})
    old_s = [float(np.std(np.exp(-np.asarray(r["loglikelihoods"])))) for r in rows]
    old_w = softmax(old_s)
    assert 1.0 / np.sum(old_w ** 2) < 1.01  # the old weights rest on one item
    new = stability(rows, rows)["tasks"]["arc_easy"]
    assert new["effective_items"] > 0.9 * len(rows)
    flipped_one = [{**r, "correct": not r["correct"]} if r["doc_id"] == 19 else r for r in rows]
    old_stab = 1.0 - old_w[19]
    new_stab = stability(rows, flipped_one)["tasks"]["arc_easy"]["stability"]
    assert old_stab == pytest.approx(0.0, abs=1e-6)  # one flip of the heaviest item: the old metric says 0
    assert 0.9 < new_stab < 1.0  # the new one: one item of 20, weighted by its (larger) confidence
    s = np.array([confidence(r) for r in rows])
    assert new_stab == pytest.approx(1.0 - softmax(s)[19], abs=1e-12)


def flipped(rows: list[dict], which: set[int]) -> list[dict]:
    return [{**r, "correct": (not r["correct"]) if r["doc_id"] in which else r["correct"]} for r in rows]


def test_identical_rows_give_one():
    out = stability(DENSE, DENSE)
    assert out["tasks"]["piqa"]["stability"] == pytest.approx(1.0)
    assert out["tasks"]["piqa"]["agreement"] == 1.0
    assert out["average"]["stability"] == pytest.approx(1.0)
    assert out["average"]["agreement"] == 1.0


def test_effective_items_tells_a_one_hot_weighting():
    spread = [row("t", i, [1.0, 1.0 + 20.0 * i], [1, 1], True) for i in range(4)]
    out = stability(spread, spread)["tasks"]["t"]
    assert out["effective_items"] == pytest.approx(1.0, abs=1e-3)  # item 3's spread dwarfs the others
    flat = [row("t", i, [1.0, 1.5], [1, 1], True) for i in range(4)]
    assert stability(flat, flat)["tasks"]["t"]["effective_items"] == pytest.approx(4.0)
    assert stability(flat, flat)["average"]["min_effective_fraction"] == pytest.approx(1.0)


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
    # s = 1000 and 2000: exp(s) overflows a naive softmax
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
