"""Intervals and paired tests on per-item correctness: is a difference between two models real?

Per-item correctness (rows' ``correct`` = acc, ``correct_norm`` = acc_norm) of one model is a vector of 0/1;
two models scored on the same items give paired vectors. Everything here is exact or resamples counts:

* ``bootstrap_ci``: percentile bootstrap of a mean of 0/1 values. Resampling n items with replacement gives a
  Binomial(n, p_hat) count, so the counts are drawn directly (same distribution as resampling indices, O(iters)).
* ``paired_bootstrap_ci``: the mean of b - a over items; the per-item difference takes values -1, 0, +1, so a
  resample is a Multinomial(n, their frequencies) draw.
* ``mcnemar_exact``: two-sided exact McNemar test (a binomial test on the discordant pairs: items exactly one
  model gets right), p = min(1, 2 P[X <= min(n01, n10)]), X ~ Binomial(n01 + n10, 1/2).
* ``average_ci`` / ``paired_average_ci``: the unweighted mean over tasks of per-task means (how papers average),
  with a stratified bootstrap (each task resampled within itself).

Seeds are fixed: the same rows give the same intervals.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from math import comb
from typing import Any

import numpy as np

ITERS = 10_000
LEVEL = 0.95
ALPHA = 0.05


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _percentiles(draws: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_ci(values: Sequence[float], iters: int = ITERS, level: float = LEVEL,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of 0/1 values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no items")
    if not np.all((x == 0) | (x == 1)):
        raise ValueError("bootstrap_ci takes 0/1 correctness values")
    draws = _rng(seed).binomial(x.size, x.mean(), size=iters) / x.size
    return _percentiles(draws, level)


def _difference_draws(a: np.ndarray, b: np.ndarray, iters: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap draws of mean(b - a) for paired 0/1 vectors."""
    d = b - a
    n = d.size
    p = np.array([(d == -1).mean(), (d == 0).mean(), (d == 1).mean()])
    counts = rng.multinomial(n, p, size=iters)
    return (counts[:, 2] - counts[:, 0]) / n


def _paired(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError(f"paired vectors must have the same non-zero length, got {x.shape} and {y.shape}")
    if not (np.all((x == 0) | (x == 1)) and np.all((y == 0) | (y == 1))):
        raise ValueError("paired tests take 0/1 correctness values")
    return x, y


def paired_bootstrap_ci(a: Sequence[float], b: Sequence[float], iters: int = ITERS, level: float = LEVEL,
                        seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(b) - mean(a) over the same items."""
    x, y = _paired(a, b)
    return _percentiles(_difference_draws(x, y, iters, _rng(seed)), level)


def mcnemar_exact(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Exact two-sided McNemar test. ``a_only`` = items only a gets right, ``b_only`` = only b."""
    x, y = _paired(a, b)
    a_only = int(np.sum((x == 1) & (y == 0)))
    b_only = int(np.sum((x == 0) & (y == 1)))
    n = a_only + b_only
    k = min(a_only, b_only)
    p = 1.0 if n == 0 else min(1.0, 2.0 * sum(comb(n, i) for i in range(k + 1)) / 2.0 ** n)
    return {"a_only": a_only, "b_only": b_only, "p": p}


def average_ci(per_task: Mapping[str, Sequence[float]], iters: int = ITERS, level: float = LEVEL,
               seed: int = 0) -> tuple[float, tuple[float, float]]:
    """(unweighted mean over tasks of each task's mean, its stratified bootstrap interval)."""
    rng = _rng(seed)
    means, draws = [], np.zeros(iters)
    for name in sorted(per_task):
        x = np.asarray(per_task[name], dtype=np.float64)
        means.append(x.mean())
        draws += rng.binomial(x.size, x.mean(), size=iters) / x.size
    k = len(means)
    return float(np.mean(means)), _percentiles(draws / k, level)


def paired_average_ci(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]], iters: int = ITERS,
                      level: float = LEVEL, seed: int = 0) -> tuple[float, tuple[float, float]]:
    """(mean over tasks of mean(b) - mean(a), stratified paired bootstrap interval)."""
    if set(a) != set(b):
        raise ValueError(f"task sets differ: {sorted(a)} vs {sorted(b)}")
    rng = _rng(seed)
    diffs, draws = [], np.zeros(iters)
    for name in sorted(a):
        x, y = _paired(a[name], b[name])
        diffs.append(y.mean() - x.mean())
        draws += _difference_draws(x, y, iters, rng)
    k = len(diffs)
    return float(np.mean(diffs)), _percentiles(draws / k, level)


# ------------------------------------------------------------------------------------------ rows -> tables

def _correctness(rows: Sequence[Mapping[str, Any]], field: str) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for r in rows:
        if field in r:
            out.setdefault(r["task"], {})[int(r["doc_id"])] = float(bool(r[field]))
    return out


# metric -> the per-item row field holding it (harness rows; exact_match: generative tasks)
METRIC_FIELDS = {"acc": "correct", "acc_norm": "correct_norm", "exact_match": "correct_em"}


def compare_rows(rows_a: Sequence[Mapping[str, Any]], rows_b: Sequence[Mapping[str, Any]],
                 iters: int = ITERS, seed: int = 0) -> dict[str, Any]:
    """Model b against model a on the items both were scored on, per task and metric:

    ``{"tasks": {task: {metric: {"n", "a", "b", "a_ci", "b_ci", "diff", "diff_ci", "a_only", "b_only", "p",
    "significant"}}}, "average": {metric: {"a", "a_ci", "b", "b_ci", "diff", "diff_ci", "significant",
    "tasks"}}}``. ``diff`` = b - a. A task difference is ``significant`` when McNemar's p < 0.05; the average's
    when its paired interval excludes 0. Items present in only one of the two are left out and counted
    (``unpaired``): a comparison is only meaningful on the same items.
    """
    out: dict[str, Any] = {"tasks": {}, "average": {}, "level": LEVEL, "iters": iters}
    for metric, field in METRIC_FIELDS.items():
        ca, cb = _correctness(rows_a, field), _correctness(rows_b, field)
        per_a, per_b = {}, {}
        for task in sorted(set(ca) & set(cb)):
            docs = sorted(set(ca[task]) & set(cb[task]))
            if not docs:
                continue
            x = [ca[task][d] for d in docs]
            y = [cb[task][d] for d in docs]
            per_a[task], per_b[task] = x, y
            test = mcnemar_exact(x, y)
            entry = {"n": len(docs), "a": float(np.mean(x)), "b": float(np.mean(y)),
                     "a_ci": bootstrap_ci(x, iters, seed=seed), "b_ci": bootstrap_ci(y, iters, seed=seed + 1),
                     "diff": float(np.mean(y) - np.mean(x)), "diff_ci": paired_bootstrap_ci(x, y, iters, seed=seed),
                     **test, "significant": test["p"] < ALPHA,
                     "unpaired": len(set(ca[task]) ^ set(cb[task]))}
            out["tasks"].setdefault(task, {})[metric] = entry
        if per_a:
            a_mean, a_ci = average_ci(per_a, iters, seed=seed)
            b_mean, b_ci = average_ci(per_b, iters, seed=seed + 1)
            diff, diff_ci = paired_average_ci(per_a, per_b, iters, seed=seed)
            out["average"][metric] = {"a": a_mean, "a_ci": a_ci, "b": b_mean, "b_ci": b_ci, "diff": diff,
                                      "diff_ci": diff_ci, "significant": not (diff_ci[0] <= 0.0 <= diff_ci[1]),
                                      "tasks": sorted(per_a)}
    return out
