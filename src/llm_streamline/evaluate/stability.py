"""Stability of a pruned model against its dense original (LLM-Streamline, section 3 of method.md).

For one multiple-choice task with items i = 1..N (rows from ``harness.run_lm_eval``):

    c_ik = option_mean_nll of option k under the DENSE model: the mean token negative log-likelihood
           (nats) of the whole prompt with option k filled in, (NLL(context) + NLL(option k | context)) /
           (scored context tokens + option tokens). This is the "PPL" field of OpenCompass's PPL mode
           (its ``get_ppl`` returns that mean cross-entropy, not an exponentiated perplexity), which the
           authors' stability script reads.
    s_i  = sqrt( mean_k (c_ik - mean_k c_ik)^2 )  population std over the options of item i
    w_i  = exp(s_i - max_j s_j) / sum_j exp(s_j - max_j s_j)
                                                 softmax over the task's items (max subtracted)
    m_i  = 1 if correct_pruned_i == correct_dense_i else 0     (both right or both wrong)

    stability = sum_i w_i m_i        in [0, 1]; 1 for a model identical to the original
    agreement = (1/N) sum_i m_i      the unweighted rate, reported beside it
    effective_items = 1 / sum_i w_i^2    how many items the weights rest on (1 = a single item decides)

c_ik is O(1) nats, so s_i is O(0.1) and the softmax weights are smooth (effective_items near N).
An earlier version of this module used exp(-loglik_ik / n_ik) over the option tokens alone: that spread
s_i over orders of magnitude (2e7 on ARC-Easy with SmolLM2), made the softmax one-hot and every task's
stability 0 or 1. ``option_mean_nll`` is written per option in the per-sample files, so the metric can be
recomputed from them (see ``recompute_from_files``).

This is the paper's formula. The authors' script instead sums the first M weights in file order
(sum(w[:M]) with M = sum_i m_i), which ignores WHICH items flipped; that bug is not reproduced.

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


def confidence(row: Row) -> float:
    """s_i: population standard deviation over options of the dense model's option_mean_nll."""
    if "option_mean_nll" not in row:
        raise ValueError(f"{row.get('task')} doc {row.get('doc_id')}: the dense row has no option_mean_nll "
                         "(samples written before it existed cannot give stability; re-evaluate the dense model)")
    c = np.asarray(row["option_mean_nll"], dtype=np.float64)
    if c.ndim != 1 or c.size == 0 or c.size != len(row["loglikelihoods"]):
        raise ValueError(f"{row.get('task')} doc {row.get('doc_id')}: need one option_mean_nll per option")
    return float(np.std(c))


def softmax(s: Sequence[float] | np.ndarray) -> np.ndarray:
    """Numerically stable softmax (the max is subtracted first)."""
    x = np.asarray(s, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("confidence values must be finite")
    e = np.exp(x - x.max())
    return e / e.sum()


def _task_stability(dense: Sequence[Row], pruned_by_doc: Mapping[int, Row]) -> dict[str, float]:
    s = np.array([confidence(r) for r in dense])
    w = softmax(s)
    m = np.array([bool(pruned_by_doc[int(r["doc_id"])]["correct"]) == bool(r["correct"]) for r in dense],
                 dtype=np.float64)
    # 1 / sum w^2: how many items the weights effectively rest on (N for uniform weights, 1 when a single
    # item decides); reported so that a degenerate weighting is never read as a rate.
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

    Returns ``{"tasks": {task: {"stability", "agreement", "n", "effective_items"}}, "mmlu_subjects": {...}``
    (when MMLU rows are present) ``, "average": {"stability", "agreement", "min_effective_items",
    "min_effective_fraction"}}``; ``tasks["mmlu"]`` holds the subject mean. Rows are matched by
    (task, doc_id); differing sets raise ValueError.
    """
    # multiple-choice rows only: a generative item (harness.generation_rows) has no options to be confident about
    dense = _by_task([r for r in dense_rows if "loglikelihoods" in r], "dense")
    pruned = _by_task([r for r in pruned_rows if "loglikelihoods" in r], "pruned")
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
            "effective_items": float(min(v["effective_items"] for v in subjects.values())),
        }
        out["mmlu_subjects"] = subjects
    out["tasks"] = tasks
    plain = [v for t, v in tasks.items()]
    out["average"] = {
        "stability": float(np.mean([v["stability"] for v in plain])) if plain else float("nan"),
        "agreement": float(np.mean([v["agreement"] for v in plain])) if plain else float("nan"),
        "min_effective_items": float(min((v["effective_items"] for v in plain), default=float("nan"))),
        "min_effective_fraction": float(min((v["effective_items"] / v["n"] for v in plain if "subjects" not in v),
                                            default=float("nan"))),
    }
    return out


def recompute_from_files(dense_samples: str, pruned_samples: str) -> dict[str, Any]:
    """Stability from two per-sample files (``samples_dense.jsonl``, ``samples_pruned.jsonl``)."""
    from llm_streamline.evaluate.harness import load_samples_jsonl

    return stability(load_samples_jsonl(dense_samples), load_samples_jsonl(pruned_samples))
