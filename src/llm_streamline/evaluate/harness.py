"""Score an in-memory Hugging Face model with lm-eval and keep one row per item.

``run_lm_eval`` wraps the model in lm-eval's ``HFLM`` (or the prefix-sharing ``FastHFLM``), runs
``simple_evaluate`` on the tasks from ``evaluate.tasks`` (offline: the wheel's data), and returns
lm-eval's metrics plus per-item rows for the stability metric:

    {task, doc_id, gold, loglikelihoods, num_tokens, prediction, correct}

* ``loglikelihoods[k]`` is lm-eval's summed log-likelihood of option k (``resps[k][0][0]``).
* ``num_tokens[k]`` is the number of continuation tokens of option k *as HFLM encoded them*: read from
  the encoded request itself (``_loglikelihood_tokens`` receives ``(strings, context_enc,
  continuation_enc)``; we record ``len(continuation_enc)``), so it follows lm-eval's
  context/continuation split, its trailing-space move and the empty-context rule exactly.
* ``option_mean_nll[k]`` is the mean token negative log-likelihood (nats) of the whole prompt with
  option k filled in: (NLL(context) + NLL(option k | context)) / (scored context tokens + option tokens),
  from the same tokens and positions lm-eval scores (the context's first token has no prefix and is not
  scored). This is OpenCompass's PPL-mode "PPL" field, the input of the stability metric (method.md §3).
  The fast scorer takes NLL(context) from the forward pass that scores the options; the stock scorer
  adds one pass over each distinct context (equal to the joint pass to float rounding: attention is causal).
* ``correct_norm`` is lm-eval's per-item ``acc_norm`` (when the task defines it): the per-item
  correctness the paired tests and bootstrap intervals of acc_norm need.
* ``prediction = argmax(loglikelihoods)`` is lm-eval's ``acc`` rule; ``gold`` follows lm-eval's
  ``process_results`` (``doc_to_target``, or ``doc_to_text`` for multiple-input tasks such as
  Winogrande; a string target is turned into its index among the choices). Each row's ``correct`` is
  checked against lm-eval's own per-sample ``acc``.

Notes on lm-eval 0.4.13: with an already-wrapped HFLM the ``batch_size`` of ``simple_evaluate`` is
ignored (we give it to HFLM); ``log_samples`` is passed explicitly; the seeds are passed to
``simple_evaluate`` (python, numpy, torch, few-shot).

lm-eval's own records (``EvalResult.lm_eval``: its results dict with the per-sample records, JSON-safe) can be
written as lm-eval's CLI writes them (``write_lm_eval_files``: ``results_<date>.json`` and
``samples_<task>_<date>.jsonl`` through its ``EvaluationTracker``), for lm-eval's own tools.

A generative (``generate_until``) item's row is ``{task, doc_id, generation, correct_em}`` (``generation_rows``):
lm-eval's per-item exact match, for the intervals and paired tests; it has no options, so stability, chance
levels and the log-likelihood check read only the multiple-choice rows (those with ``loglikelihoods``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from lm_eval.models.huggingface import HFLM

from llm_streamline.evaluate.fast_hflm import FastHFLM
from llm_streamline.evaluate.recording import RecordingHFLM
from llm_streamline.evaluate.tasks import build_tasks, check_tasks, leaf_tasks, task_manager

SCORERS = ("hflm", "fast")


class _ExpectedHFLMWarnings(logging.Filter):
    """Drops lm-eval's two warnings about a model handed over as an object: we do that on purpose (under torchrun
    the ranks are set up by `RecordingHFLM.share_over`, not by an accelerate launch of HFLM's own), and every
    evaluation printed them."""

    EXPECTED = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.EXPECTED)


logging.getLogger("lm_eval.models.huggingface").addFilter(_ExpectedHFLMWarnings())


class _GeneratedTaskNotice(logging.Filter):
    """Drops lm-eval's notice, on every task built from a `custom_dataset` (our generated `synthetic_cloze`), that
    kwargs can be passed through `--metadata`: the generated task takes none, and every smoke run printed it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed to `--metadata`" not in str(record.msg)


logging.getLogger("lm_eval.api.task").addFilter(_GeneratedTaskNotice())


def git_hash_quietly() -> str | None:
    """lm-eval's ``git_hash`` field (``git describe --always`` in the working directory), without git's
    "fatal: not a git repository" on our stderr when the run starts outside a repository."""
    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=False)
    except OSError:  # no git on the machine
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@contextlib.contextmanager
def _quiet_git_lookup():
    """lm-eval offers no switch for its git lookup; its evaluator calls ``get_git_commit_hash`` by that module
    name, so the quiet lookup stands in for it during one ``simple_evaluate`` (restored afterwards)."""
    import lm_eval.evaluator

    original = getattr(lm_eval.evaluator, "get_git_commit_hash", None)
    if original is None:  # a version that looks the hash up differently: leave it alone
        yield
        return
    lm_eval.evaluator.get_git_commit_hash = git_hash_quietly
    try:
        yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = original


@dataclass
class EvalResult:
    """lm-eval metrics per task/group and per-item rows (see module docstring)."""

    metrics: dict[str, dict[str, float]]
    samples: list[dict[str, Any]]
    groups: dict[str, list[str]] = field(default_factory=dict)  # group -> its leaf tasks
    versions: dict[str, Any] = field(default_factory=dict)
    n_samples: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    lm_eval: dict[str, Any] = field(default_factory=dict)  # lm-eval's own results (JSON-safe), merged over calls


def make_lm(model: Any, tokenizer: Any, batch_size: int, scorer: str = "hflm", context_nll: bool = True) -> HFLM:
    """Wrap an in-memory model: stock HFLM scoring, or FastHFLM (shared-context scoring); ``context_nll``:
    also score each context's own tokens (for the rows' option_mean_nll)."""
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
    model.eval()  # dropout off: scores must not depend on the caller's mode
    cls: type[HFLM] = FastHFLM if scorer == "fast" else RecordingHFLM
    lm = cls(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    lm.score_context_nll = context_nll
    return lm


def _number(v: Any) -> float | None:
    if isinstance(v, (bool, np.bool_)):
        return float(v)
    if isinstance(v, (int, float, np.integer, np.floating)):
        return float(v)
    return None  # "N/A" stderr, aliases, ...


def extract_metrics(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task or group: {metric: value}} from lm-eval's ``results`` (filter "none", else the task's first filter;
    numbers only).

    Keys: acc, acc_stderr, acc_norm, acc_norm_stderr where the task defines them (and any other
    metric it defines, e.g. f1 for CB/MRPC). Groups (mmlu, mmlu_stem, ...) carry lm-eval's group
    aggregate (MMLU: size-weighted mean over subjects, as lm-eval defines it).
    """
    out: dict[str, dict[str, float]] = {}
    for section in ("results", "groups"):
        for name, entry in (results.get(section) or {}).items():
            row = out.setdefault(name, {})
            for key, value in entry.items():
                metric, _, flt = key.partition(",")
                num = _number(value)
                # filter "none"; a task whose answers pass through a named filter (generative tasks: e.g.
                # TriviaQA's remove_whitespace) reports under that filter: its first one is the metric
                if num is not None and flt and (flt == "none" or metric not in row):
                    row[metric] = num
    return out


def gold_index(task: Any, doc: dict[str, Any]) -> int:
    """Gold option index exactly as lm-eval's ConfigurableTask.process_results computes it."""
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    if isinstance(gold, list):
        raise NotImplementedError(f"{task.task_name}: multiple gold targets are not supported by the rows")
    if isinstance(gold, str):
        choices = task.doc_to_choice(doc)
        if gold not in choices:
            raise ValueError(f"{task.task_name}: gold {gold!r} is not among the choices {choices!r}")
        return choices.index(gold)
    return int(gold)


def option_mean_nll(loglikelihood: float, n_option_tokens: int, context_nll: tuple[float, int]) -> float:
    """Mean token NLL of context + option: (NLL(context) - loglik(option)) / (context tokens scored +
    option tokens)."""
    ctx_sum, ctx_count = context_nll
    return (ctx_sum - loglikelihood) / (ctx_count + n_option_tokens)


def sample_rows(
    results: dict[str, Any], tasks: dict[str, Any], continuation_tokens: dict[tuple[str, str], int],
    request_contexts: dict[tuple[str, str], tuple[int, ...]] | None = None,
    context_nll: dict[tuple[int, ...], tuple[float, int]] | None = None,
) -> list[dict[str, Any]]:
    """One row per multiple-choice item (see module docstring), in lm-eval's doc order. ``option_mean_nll``
    is filled when the scorer recorded the contexts and their NLL."""
    rows: list[dict[str, Any]] = []
    for task_name, samples in (results.get("samples") or {}).items():
        task = tasks[task_name]
        if task.OUTPUT_TYPE == "generate_until":
            rows += generation_rows(task_name, samples, (results.get("results") or {}).get(task_name) or {})
            continue
        if task.OUTPUT_TYPE != "multiple_choice":
            continue
        for s in samples:
            n_choices = len(task.doc_to_choice(s["doc"]))
            # acc_mutual_info tasks append unconditional requests after the choices: drop them
            lls = [float(r[0][0]) for r in s["resps"][:n_choices]]
            ntok = [int(continuation_tokens[tuple(a)]) for a in s["arguments"][:n_choices]]
            gold = gold_index(task, s["doc"])
            pred = int(np.argmax(lls))  # lm-eval's acc rule (first maximum on ties)
            correct = pred == gold
            if "acc" in s and bool(s["acc"]) != correct:
                raise RuntimeError(f"{task_name} doc {s['doc_id']}: row disagrees with lm-eval's acc")
            row = {
                "task": task_name, "doc_id": int(s["doc_id"]), "gold": gold,
                "loglikelihoods": lls, "num_tokens": ntok, "prediction": pred, "correct": correct,
            }
            if "acc_norm" in s:
                row["correct_norm"] = bool(s["acc_norm"])
            if request_contexts is not None and context_nll is not None:
                ctxs = [request_contexts[tuple(a)] for a in s["arguments"][:n_choices]]
                row["option_mean_nll"] = [option_mean_nll(ll, n, context_nll[c])
                                          for ll, n, c in zip(lls, ntok, ctxs)]
            rows.append(row)
    return rows


def generation_rows(task_name: str, samples: list[dict[str, Any]], entry: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per item of a generative task: ``{task, doc_id, generation, correct_em}``, lm-eval's per-item
    ``exact_match`` under the filter its reported metric comes from (``extract_metrics``: "none", else the
    task's first), so the rows' mean is the recorded exact match. A task without exact_match gives no rows."""
    filters = [k.partition(",")[2] for k in entry if k.partition(",")[0] == "exact_match"]
    if not filters:
        return []
    chosen = "none" if "none" in filters else filters[0]
    rows = []
    for s in samples:
        if s.get("filter", "none") != chosen or "exact_match" not in s:
            continue
        answer = s.get("filtered_resps") or [""]
        rows.append({"task": task_name, "doc_id": int(s["doc_id"]), "generation": str(answer[0]),
                     "correct_em": bool(s["exact_match"])})
    return rows


def _group_leaves(built: Sequence[Any]) -> dict[str, list[str]]:
    from lm_eval.api.group import Group

    out: dict[str, list[str]] = {}

    def walk(g: Any) -> None:
        out[g.name] = sorted(t.task_name for t in g.get_all_tasks())
        for sub in g.get_all_groups():
            if sub is not g:
                walk(sub)

    for item in built:
        if isinstance(item, Group):
            walk(item)
    return out


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    limit: int | None,
    batch_size: int,
    offline: bool = True,
    *,
    scorer: str = "hflm",
    seed: int = 1234,
    bootstrap_iters: int = 100000,
    task_limits: dict[str, int | None] | None = None,
    context_nll: bool = True,
    num_fewshot: dict[str, int] | None = None,
    include_path: str | None = None,
    accelerator: Any = None,
) -> EvalResult | None:
    """Evaluate ``model`` on lm-eval ``tasks`` (zero-shot unless ``num_fewshot`` names a task's shots; few-shot
    examples come from the task's few-shot split, offline the scored split minus the item); rows: module docstring.
    Generative (``generate_until``) tasks go through the same wrapped model: the fast scorer shares contexts for
    log-likelihoods only, generation is lm-eval's own (HFLM.generate_until); their rows carry exact match.

    ``limit`` is lm-eval's (the first ``limit`` items of each leaf task; None = all); ``task_limits`` overrides
    it per named task (e.g. all of PIQA, the first 1000 of HellaSwag): lm-eval takes one limit per call, so
    tasks are scored in one call per distinct limit, on one wrapped model. Unknown task names raise
    ValueError before any model work. ``context_nll=False``: rows without ``option_mean_nll`` (only the
    dense model's enters stability; skipping it saves the LM head on every context position).

    Under torchrun (``accelerator``, every rank calls this) the items are shared with lm-eval's own data parallel
    (``RecordingHFLM.share_over``): each rank scores its documents, rank 0 gets every item and lm-eval's
    metrics, the same as one process's (the samples in one process's order, the padding requests' responses
    dropped) and returns the result; the other ranks return None. A call whose few-shot examples are drawn at
    random is scored by rank 0 alone: lm-eval draws them per rank from one seed, so a document would get other
    examples than in one process.
    """
    check_tasks(tasks, offline, include_path)
    from llm_streamline.models.devices import is_sharded

    if accelerator is not None and is_sharded(model):  # every forward a collective: the ranks' batches differ
        raise ValueError("lm-eval scoring of a sharded (FSDP) model is not supported: its ranks would run "
                         "different numbers of forwards; evaluate an unsharded copy")
    start = time.perf_counter()
    lm = make_lm(model, tokenizer, batch_size, scorer, context_nll)
    world, rank = (accelerator.num_processes, accelerator.process_index) if accelerator is not None else (1, 0)
    # lm-eval takes one limit and one few-shot count per call: one call per distinct (limit, shots)
    by_call: dict[tuple[int | None, int | None], list[str]] = {}
    for t in tasks:
        by_call.setdefault(((task_limits or {}).get(t, limit), (num_fewshot or {}).get(t)), []).append(t)
    out = EvalResult(metrics={}, samples=[])
    for (lim, shots), names in by_call.items():
        built = build_tasks(names, offline=offline, include_path=include_path)
        shared = world > 1 and _shardable(leaf_tasks(built), lim, shots, world)
        if world > 1 and not shared and rank != 0:
            continue
        if shared:
            lm.share_over(accelerator)
        else:  # one process's scoring (rank 0 alone under torchrun)
            lm._rank, lm._world_size = 0, 1
        results = _simple_evaluate(lm, built, lim, shots, offline, include_path, bootstrap_iters, seed)
        recorded = (lm.__dict__.get("continuation_tokens", {}), lm.__dict__.get("request_contexts", {}),
                    lm.context_nll)
        if shared:  # what each rank's scorer recorded of its requests, for rank 0's rows
            recorded = _merged(HFLM.gather_object(lm, recorded))
        if rank != 0:
            continue
        if results is None:
            raise RuntimeError("lm-eval returned no results")
        if shared:
            _drop_padding_responses(results, leaf_tasks(built))
        _add_call(out, results, built, recorded if context_nll else (*recorded[:2], None))
    out.seconds = time.perf_counter() - start
    return out if rank == 0 else None


def _simple_evaluate(lm, built: dict, limit: int | None, shots: int | None, offline: bool, include_path: str | None,
                     bootstrap_iters: int, seed: int) -> dict | None:
    """One lm-eval call on the built tasks (one limit and one few-shot count), every seed set from ours."""
    import lm_eval

    with _quiet_git_lookup():
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=built,
            task_manager=task_manager(offline, include_path),  # the one that built the tasks (cached)
            limit=limit,
            num_fewshot=shots,  # None: each task's own default (0 for ours)
            log_samples=True,
            bootstrap_iters=bootstrap_iters,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )


def _add_call(out: EvalResult, results: dict, built: dict, recorded: tuple) -> None:
    """One call's rows, metrics, groups, versions and lm-eval output into `out` (`recorded`: the scorer's
    continuation tokens, request contexts and context NLLs, or None for the last without `context_nll`)."""
    out.samples += sample_rows(results, leaf_tasks(built), *recorded)
    out.metrics.update(extract_metrics(results))
    out.groups.update(_group_leaves(built))
    out.versions.update(results.get("versions") or {})
    out.n_samples.update(results.get("n-samples") or {})
    _merge_lm_eval(out.lm_eval, results)


def _shardable(tasks: dict[str, Any], limit: int | None, shots: int | None, world: int) -> bool:
    """Whether one `simple_evaluate` call can be shared by `world` ranks and give one process's items: every
    task has a document for each rank (lm-eval refuses a rank with none), and no few-shot examples are drawn at
    random (lm-eval's TODO "need to offset doc_id by rank": each rank draws from the seed for its own documents;
    a first-n sampler, MMLU's, takes the same examples wherever the document is scored)."""
    from lm_eval.api.samplers import FirstNSampler

    for task in tasks.values():
        docs = len(task.eval_docs) if limit is None else min(limit, len(task.eval_docs))
        k = shots if shots is not None else (task.config.num_fewshot or 0)
        if docs < world or (k > 0 and not isinstance(getattr(task, "sampler", None), FirstNSampler)):
            return False
    return True


def _merged(per_rank: list | None) -> tuple[dict, dict, dict] | None:
    """The ranks' (continuation tokens, request contexts, context NLL) records as one (None off rank 0)."""
    if per_rank is None:
        return None
    merged: tuple[dict, dict, dict] = ({}, {}, {})
    for part in per_rank:
        for into, d in zip(merged, part):
            into.update(d)
    return merged


def _drop_padding_responses(results: dict[str, Any], tasks: dict[str, Any]) -> None:
    """lm-eval pads a rank's requests to the longest rank's count with copies of its last request, whose
    responses are appended to that request: keep each request's own (`repeats`) responses, as one process has."""
    for name, samples in (results.get("samples") or {}).items():
        repeats = tasks[name].config.repeats or 1
        for s in samples:
            s["resps"] = [r[:repeats] for r in s["resps"]]


def _merge_lm_eval(into: dict[str, Any], results: dict[str, Any]) -> None:
    """Keep lm-eval's results dict JSON-safe (its own serializer for numpy values and functions); one call per
    distinct limit is merged task-wise (the run-level fields, e.g. ``config.limit``, are the last call's)."""
    from lm_eval.utils import handle_non_serializable

    safe = json.loads(json.dumps(results, default=handle_non_serializable))
    for key, value in safe.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict) and key != "config":
            into[key].update(value)
        else:
            into[key] = value


def write_lm_eval_files(lm_eval_results: dict[str, Any], out_dir: str | os.PathLike[str], model_name: str) -> Path:
    """lm-eval's own files, as its CLI writes them: ``<out_dir>/<model>/results_<date>.json`` (aggregated, with
    per-task hashes) and ``samples_<task>_<date>.jsonl`` (one record per item), via lm-eval's EvaluationTracker.
    Returns the folder written. ``lm_eval_results`` is ``EvalResult.lm_eval``."""
    import copy

    from lm_eval.loggers import EvaluationTracker

    results = copy.deepcopy(lm_eval_results)
    samples = results.pop("samples", None) or {}
    tracker = EvaluationTracker(output_path=str(out_dir))
    tracker.general_config_tracker.model_name = model_name
    tracker.general_config_tracker.model_name_sanitized = _sanitize(model_name)
    tracker.save_results_aggregated(results=results, samples=samples)
    for task_name, task_samples in samples.items():
        tracker.save_results_samples(task_name=task_name, samples=task_samples)
    return Path(out_dir) / tracker.general_config_tracker.model_name_sanitized


def _sanitize(name: str) -> str:
    """A model name as one folder name (lm-eval's CLI does the same with its model_args)."""
    import re

    return re.sub(r"[^\w.-]+", "__", name).strip("_") or "model"


def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"not JSON serializable: {type(v)}")


def save_samples_jsonl(rows: Iterable[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write rows as JSON lines atomically (temp file in the same directory, then os.replace)."""
    from llm_streamline.stages import write_text_atomic

    text = "".join(json.dumps(row, default=_json_default, allow_nan=True) + "\n" for row in rows)
    return write_text_atomic(Path(path), text)


def load_samples_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows written by ``save_samples_jsonl``."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
