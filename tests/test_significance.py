"""Intervals and paired tests (evaluate/significance.py) against known values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llm_streamline.evaluate.significance import (
    average_ci,
    bootstrap_ci,
    compare_rows,
    mcnemar_exact,
    paired_average_ci,
    paired_bootstrap_ci,
)


def pairs(both: int, a_only: int, b_only: int, neither: int) -> tuple[list[int], list[int]]:
    a = [1] * both + [1] * a_only + [0] * b_only + [0] * neither
    b = [1] * both + [0] * a_only + [1] * b_only + [0] * neither
    return a, b


def test_mcnemar_exact_known_values():
    # binomial test of 1 success in 10 at p=1/2, two-sided: 2 * (1 + 10) / 2^10 (scipy.stats.binomtest gives
    # 0.021484375)
    a, b = pairs(50, 9, 1, 40)
    out = mcnemar_exact(a, b)
    assert (out["a_only"], out["b_only"]) == (9, 1)
    assert out["p"] == pytest.approx(22 / 1024, abs=1e-15)
    assert mcnemar_exact(*pairs(10, 5, 5, 3))["p"] == 1.0  # balanced discordance
    assert mcnemar_exact(*pairs(10, 0, 0, 3))["p"] == 1.0  # no discordant pair
    # 0 vs 6 discordant: 2 / 2^6
    assert mcnemar_exact(*pairs(0, 0, 6, 0))["p"] == pytest.approx(2 / 64)


def test_bootstrap_ci_matches_the_normal_interval_and_index_resampling():
    x = [1] * 200 + [0] * 200
    lo, hi = bootstrap_ci(x)
    half = 1.96 * math.sqrt(0.25 / 400)
    assert lo == pytest.approx(0.5 - half, abs=0.005) and hi == pytest.approx(0.5 + half, abs=0.005)
    # the count draw is the same distribution as resampling indices
    rng = np.random.default_rng(1)
    arr = np.array([1] * 130 + [0] * 70, dtype=float)
    naive = [arr[rng.integers(0, arr.size, arr.size)].mean() for _ in range(20000)]
    nlo, nhi = np.quantile(naive, [0.025, 0.975])
    lo, hi = bootstrap_ci(arr)
    assert lo == pytest.approx(nlo, abs=0.01) and hi == pytest.approx(nhi, abs=0.01)


def test_paired_bootstrap_ci_known_spread():
    a, b = pairs(100, 20, 40, 40)  # n = 200, diff = (40 - 20) / 200 = 0.1, var(d) = 0.3 - 0.01
    lo, hi = paired_bootstrap_ci(a, b)
    half = 1.96 * math.sqrt(0.29 / 200)
    assert lo == pytest.approx(0.1 - half, abs=0.006) and hi == pytest.approx(0.1 + half, abs=0.006)
    assert paired_bootstrap_ci(a, a) == (0.0, 0.0)
    # pairing matters: the unpaired difference of two independent 0.6/0.5 means would be much wider
    assert hi - lo < 2 * 1.96 * math.sqrt(0.24 / 200 + 0.25 / 200)


def test_averages_over_tasks_are_unweighted_and_stratified():
    per = {"big": [1] * 900 + [0] * 100, "small": [1] * 5 + [0] * 5}
    mean, (lo, hi) = average_ci(per)
    assert mean == pytest.approx((0.9 + 0.5) / 2)
    # the small task's sampling noise dominates: half-width ~ 1.96 * sqrt(.25/10) / 2
    assert hi - lo == pytest.approx(2 * 1.96 * math.sqrt(0.25 / 10 + 0.09 / 1000) / 2, rel=0.15)
    a = {"t1": pairs(50, 0, 10, 40)[0], "t2": pairs(50, 5, 5, 40)[0]}
    b = {"t1": pairs(50, 0, 10, 40)[1], "t2": pairs(50, 5, 5, 40)[1]}
    diff, (dlo, dhi) = paired_average_ci(a, b)
    assert diff == pytest.approx((0.1 + 0.0) / 2)
    assert dlo < diff < dhi


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        bootstrap_ci([])
    with pytest.raises(ValueError):
        bootstrap_ci([0.5, 1.0])
    with pytest.raises(ValueError):
        paired_bootstrap_ci([1, 0], [1])


def _rows(task, correct, norm=None):
    return [{"task": task, "doc_id": i, "correct": bool(c), **({"correct_norm": bool(norm[i])} if norm else {})}
            for i, c in enumerate(correct)]


def test_compare_rows_pairs_items_and_marks_significance():
    a, b = pairs(100, 2, 30, 68)  # b clearly better on piqa
    c, d = pairs(100, 10, 12, 78)  # no real difference on arc_easy
    rows_a = _rows("piqa", a, a) + _rows("arc_easy", c) + [{"task": "arc_easy", "doc_id": 999, "correct": True}]
    rows_b = _rows("piqa", b, b) + _rows("arc_easy", d)
    out = compare_rows(rows_a, rows_b)
    piqa, arc = out["tasks"]["piqa"]["acc"], out["tasks"]["arc_easy"]["acc"]
    assert piqa["significant"] and piqa["p"] < 1e-5 and piqa["diff"] == pytest.approx(28 / 200)
    assert piqa["diff_ci"][0] > 0
    assert not arc["significant"] and arc["diff_ci"][0] < 0 < arc["diff_ci"][1]
    assert arc["n"] == 200 and arc["unpaired"] == 1  # doc 999 is scored by a only: left out, counted
    assert set(out["tasks"]["piqa"]) == {"acc", "acc_norm"} and "acc_norm" not in out["tasks"]["arc_easy"]
    avg = out["average"]["acc"]
    assert avg["diff"] == pytest.approx((28 / 200 + 2 / 200) / 2)
    assert avg["tasks"] == ["arc_easy", "piqa"]
    assert compare_rows(rows_a, rows_b) == out  # seeded: the same rows give the same intervals
