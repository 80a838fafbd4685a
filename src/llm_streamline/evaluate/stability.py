"""Stability of a pruned model against its dense original (LLM-Streamline, section 3 of method.md).

For one multiple-choice task with items i = 1..N (rows from ``harness.run_lm_eval``):

    p_ik = exp(-loglik_ik / n_ik)                per-token perplexity of option k under the DENSE model
                                                 (loglik_ik summed over the option's n_ik tokens)
    s_i  = sqrt( mean_k (p_ik - mean_k p_ik)^2 ) population std over the options of item i
    w_i  = exp(s_i - max_j s_j) / sum_j exp(s_j - max_j s_j)
                                                 softmax over the task's items (max subtracted: s can be
                                                 large, exp(s) would overflow)
    m_i  = 1 if correct_pruned_i == correct_dense_i else 0     (both right or both wrong)

    stability = sum_i w_i m_i        in [0, 1]; 1 for a model identical to the original
    agreement = (1/N) sum_i m_i      the unweighted rate, reported beside it
    effective_items = 1 / sum_i w_i^2    how many items the weights rest on (1 = a single item decides)

Caveat, measured on SmolLM2-135M (50 items per task): s_i reaches 2e3 on PIQA and 2e7 on ARC-Easy, so
the softmax is one-hot, `effective_items` is 1.0 and stability is 0 or 1 per task. That is the formula
as published; read `agreement` and `effective_items` beside it.

This is the paper's formula. The authors' script instead sums the first M weights in file order
(sum(w[:M]) with M = sum_i m_i), which ignores WHICH items flipped; that bug is not reproduced.
The per-token perplexity (not exp of the summed log-likelihood) follows the authors' OpenCompass PPL
mode; exp of a sum would put all the softmax weight on one item.

MMLU: the authors average over subjects without weighting. Rows of the mmlu_* subject tasks get a
stability each (per subject, softmax within the subject), and ``mmlu`` is their unweighted mean
(same for agreement). The overall ``average`` is the unweighted mean over the top-level tasks
(MMLU counting once, through its subject average).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Row = Mapping[str, Any]


def option_perplexities(loglikelihoods: Sequence[float], num_tokens: Sequence[int]) -> np.ndarray:
    """Per-token perplexity exp(-loglik / n_tokens) of each option."""
    ll = np.asarray(loglikelihoods, dtype=np.float64)
    n = np.asarray(num_tokens, dtype=np.float64)
    if ll.shape != n.shape or ll.ndim != 1 or ll.size == 0:
        raise ValueError(f"need one token count per option, got {ll.shape} and {n.shape}")
    if np.any(n <= 0):
        raise ValueError(f"option token counts must be positive, got {list(num_tokens)}")
    return np.exp(-ll / n)


def confidence(row: Row) -> float:
    """s_i: population standard deviation over options of the dense model's per-token perplexity."""
    return float(np.std(option_perplexities(row["loglikelihoods"], row["num_tokens"])))


def softmax(s: Sequence[float] | np.ndarray) -> np.ndarray:
    """Numerically stable softmax (the max is subtracted first)."""
    x = np.asarray(s, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("confidence values must be finite (an option perplexity overflowed?)")
    e = np.exp(x - x.max())
    return e / e.sum()


def _task_stability(dense: Sequence[Row], pruned_by_doc: Mapping[int, Row]) -> dict[str, float]:
    s = np.array([confidence(r) for r in dense])
    w = softmax(s)
    m = np.array([bool(pruned_by_doc[int(r["doc_id"])]["correct"]) == bool(r["correct"]) for r in dense],
                 dtype=np.float64)
    # 1 / sum w^2: how many items the weights effectively rest on. Near 1 means the softmax put all the
    # weight on one item (the dense model's perplexity spread s_i runs to thousands on a small model), and
    # stability is then 0 or 1 by that single item; report it so nobody reads such a value as a rate.
    effective = float(1.0 / np.sum(w * w))
    return {"stability": float(np.dot(w, m)), "agreement": float(m.mean()), "n": float(len(dense)),
            "effective_items": effective}


def _by_task(rows: Sequence[Row], which: str) -> dict[str, dict[int, Row]]:
    out: dict[str, dict[int, Row]] = defaultdict(dict)
    for r in rows:
        key = int(r["doc_id"])
        if key in out[r["task"]]:
            raise ValueError(f"{which} rows: duplicate (task, doc_id) = ({r['task']!r}, {key})")
        out[r["task"]][key] = r
    return out


def _is_mmlu_subject(task: str) -> bool:
    return task.startswith("mmlu_")


def stability(dense_rows: Sequence[Row], pruned_rows: Sequence[Row]) -> dict[str, Any]:
    """Stability and agreement per task, MMLU per subject plus its unweighted mean, and an average.

    Returns ``{"tasks": {task: {"stability", "agreement", "n"}}, "mmlu_subjects": {...}`` (when MMLU
    rows are present) ``, "average": {"stability", "agreement"}}``; ``tasks["mmlu"]`` holds the
    subject mean. Rows are matched by (task, doc_id); differing sets raise ValueError.
    """
    dense, pruned = _by_task(dense_rows, "dense"), _by_task(pruned_rows, "pruned")
    if set(dense) != set(pruned):
        raise ValueError(f"task sets differ: dense {sorted(dense)} vs pruned {sorted(pruned)}")
    per_task: dict[str, dict[str, float]] = {}
    for task in sorted(dense):
        if set(dense[task]) != set(pruned[task]):
            only = sorted(set(dense[task]) ^ set(pruned[task]))[:5]
            raise ValueError(f"{task}: dense and pruned rows cover different doc_ids (e.g. {only})")
        ordered = [dense[task][d] for d in sorted(dense[task])]
        per_task[task] = _task_stability(ordered, pruned[task])

    subjects = {t: v for t, v in per_task.items() if _is_mmlu_subject(t)}
    tasks = {t: v for t, v in per_task.items() if not _is_mmlu_subject(t)}
    out: dict[str, Any] = {}
    if subjects:
        tasks["mmlu"] = {
            "stability": float(np.mean([v["stability"] for v in subjects.values()])),
            "agreement": float(np.mean([v["agreement"] for v in subjects.values()])),
            "n": float(sum(v["n"] for v in subjects.values())),
            "subjects": float(len(subjects)),
        }
        out["mmlu_subjects"] = subjects
    out["tasks"] = tasks
    out["average"] = {
        "stability": float(np.mean([v["stability"] for v in tasks.values()])) if tasks else float("nan"),
        "agreement": float(np.mean([v["agreement"] for v in tasks.values()])) if tasks else float("nan"),
        "min_effective_items": float(min((v.get("effective_items", v["n"]) for v in tasks.values()),
                                         default=float("nan"))),
    }
    return out
