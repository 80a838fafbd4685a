"""The run record (`results.json`): one home for how it is written and read and for what its numbers mean.

Every reader of a record goes through `read` / `RunRecord`: the end-of-run summary, `llm-streamline-report`
(tables, plots, `--compare`), the value returned to a sweeper (`objective`), the W&B summary
(`wandb_summary`) and the model card. They therefore give the same average to the last digit.

**The metric per task** (`task_metric`). The paper scores multiple-choice tasks with OpenCompass's PPL mode
(the option of lowest mean NLL, i.e. lm-eval's `acc`) and does not state a per-task variant; the layer-pruning
papers it is compared with (LLM-Pruner and those that copy its table) report `acc_norm` for HellaSwag,
ARC-Challenge and OpenBookQA and `acc` elsewhere (method.md §4). We follow that convention: `acc_norm` for
`NORM_TASKS`, `acc` everywhere else. Both metrics are always recorded.

**The average** is the unweighted mean over the evaluated top-level tasks of each task's metric above (MMLU is
one task: lm-eval's size-weighted mean over its subjects). Its 95% interval is a stratified bootstrap over the
items of each task (`evaluate.significance.average_ci`, the same seeds as its per-metric averages); for a
compressed model the paired difference to the dense model comes with it (`paired_average_ci`). It is stored
as `significance.average.paper` and recomputed from the per-sample files for records written before it existed.

**Schema.** `schema` (an integer, `SCHEMA`) says how a record is shaped; `read` migrates older records in
memory (never rewriting the file): schema 1 = every record before the field existed (`version` was the package
version), including `mode=eval` records whose `eval` table was flat ({task: metrics}).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

SCHEMA = 2
NORM_TASKS = frozenset({"hellaswag", "arc_challenge", "openbookqa"})
METRIC_RULE = ("acc_norm for hellaswag, arc_challenge, openbookqa (LLM-Pruner's convention, which the "
               "layer-pruning papers report), acc elsewhere, exact_match on generative tasks")
# the record's key for the average of each task's metric above (beside "acc" and "acc_norm" in significance)
PAPER = "paper"
KINDS = ("run", "eval")


class RecordError(ValueError):
    """A results.json that cannot be read as a run record: one line naming the file and why."""


# ------------------------------------------------------------------------------------------ metric rule
def task_metric(task: str, metrics: Mapping[str, Any] | None = None) -> str:
    """The metric a task is reported with (module docstring); `acc` where a task has no `acc_norm`; a generative
    task (no `acc`: TriviaQA, NQ-Open, GSM8K) its `exact_match`."""
    if task in NORM_TASKS and (metrics is None or "acc_norm" in metrics):
        return "acc_norm"
    if metrics is not None and "acc" not in metrics and "exact_match" in metrics:
        return "exact_match"
    return "acc"


def row_field(metric: str) -> str:
    from llm_streamline.evaluate.significance import METRIC_FIELDS

    return METRIC_FIELDS[metric]


def group_of(task: str, groups: Mapping[str, Sequence[str]] | None = None) -> str:
    """The top-level task a per-sample row's task belongs to (an MMLU subject -> `mmlu`)."""
    for name, leaves in (groups or {}).items():
        if task in leaves and not name.startswith("mmlu_"):
            return name
    return "mmlu" if task.startswith("mmlu_") else task


def _paper_vectors(rows: Sequence[Mapping[str, Any]], groups=None) -> dict[str, dict[tuple, float]]:
    """{top-level task: {(leaf task, doc_id): 0/1}} with each task's reported metric."""
    from llm_streamline.evaluate.significance import METRIC_FIELDS

    out: dict[str, dict[tuple, float]] = {}
    for r in rows:
        top = group_of(r["task"], groups)
        # the metrics this row carries: its task's reported one among them (exact_match for a generative item)
        f = row_field(task_metric(top, {m: 1 for m, field_ in METRIC_FIELDS.items() if field_ in r}))
        if f in r:
            out.setdefault(top, {})[(r["task"], int(r["doc_id"]))] = float(bool(r[f]))
    return out


def paper_average(rows_a: Sequence[Mapping], rows_b: Sequence[Mapping] | None = None, groups=None,
                  iters: int | None = None, seed: int = 0) -> dict | None:
    """The average of each task's reported metric with its stratified bootstrap interval; with `rows_b` (the
    compressed model on the same items) also b's and the paired difference b - a, shaped as
    `significance.compare_rows`' averages ({a, a_ci, b, b_ci, diff, diff_ci, significant, tasks})."""
    from llm_streamline.evaluate import significance as sig

    iters = iters or sig.ITERS
    va = _paper_vectors(rows_a, groups)
    if rows_b is None:
        if not va:
            return None
        per = {t: list(v.values()) for t, v in va.items()}
        mean, ci = sig.average_ci(per, iters, seed=seed)
        return {"a": mean, "a_ci": ci, "tasks": sorted(per)}
    vb = _paper_vectors(rows_b, groups)
    per_a, per_b = {}, {}
    for t in sorted(set(va) & set(vb)):
        keys = sorted(set(va[t]) & set(vb[t]))
        if keys:
            per_a[t], per_b[t] = [va[t][k] for k in keys], [vb[t][k] for k in keys]
    if not per_a:
        return None
    a, a_ci = sig.average_ci(per_a, iters, seed=seed)
    b, b_ci = sig.average_ci(per_b, iters, seed=seed + 1)
    diff, diff_ci = sig.paired_average_ci(per_a, per_b, iters, seed=seed)
    return {"a": a, "a_ci": a_ci, "b": b, "b_ci": b_ci, "diff": diff, "diff_ci": diff_ci,
            "significant": not (diff_ci[0] <= 0.0 <= diff_ci[1]), "tasks": sorted(per_a)}


def task_intervals(rows: Sequence[Mapping[str, Any]], groups=None, iters: int | None = None,
                   seed: int = 0) -> dict[str, dict[str, tuple[float, float]]]:
    """{top-level task: {metric: 95% bootstrap interval}} of one model's rows (the interval a run records for its
    dense model: same bootstrap, same seed; an MMLU-like group pools its subjects' items)."""
    from llm_streamline.evaluate.significance import ITERS, METRIC_FIELDS, bootstrap_ci

    per: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        top = group_of(r["task"], groups)
        for metric, f in METRIC_FIELDS.items():
            if f in r:
                per.setdefault(top, {}).setdefault(metric, []).append(float(bool(r[f])))
    return {t: {m: bootstrap_ci(v, iters or ITERS, seed=seed) for m, v in ms.items()} for t, ms in per.items()}


# ------------------------------------------------------------------------------------------ scores
class Score(float):
    """A score (a float) with its 95% interval, the metric it is, and for a compressed model whether it differs
    from the dense one (task: McNemar p < 0.05; average: the paired interval excludes 0)."""

    def __new__(cls, value: float, ci=None, significant: bool | None = None, p: float | None = None,
                metric: str = "acc", n: int | None = None):
        s = super().__new__(cls, value)
        s.ci = tuple(ci) if ci is not None else None
        s.significant, s.p, s.metric, s.n = significant, p, metric, n
        return s

    def text(self, digits: int = 3) -> str:
        """`0.507 [0.480, 0.534]`: how every command prints a score."""
        base = f"{self:.{digits}f}"
        return base + (f" [{self.ci[0]:.{digits}f}, {self.ci[1]:.{digits}f}]" if self.ci is not None else "")


# ------------------------------------------------------------------------------------------ the record
@dataclass
class RunRecord:
    """A results.json, migrated to the current schema, and what its numbers mean. `data` is the record itself
    (every field documented in the README's `results.json` table); `path` the run directory it came from.

    Models in a record: a run's `dense` and `pruned`; an eval job's one `model`. `which="pruned"` reads the
    model the record is about in both kinds (an eval job's model), `which="dense"` the reference (runs only)."""
    data: dict
    path: Path | None = None
    _avg_cache: dict = field(default_factory=dict, repr=False)

    # -------------------------------------------------------------- identity
    @property
    def kind(self) -> str:
        return self.data.get("kind", "run")

    @property
    def model_name(self) -> str:
        return (self.data.get("model") or {}).get("name", "?")

    @property
    def eval_meta(self) -> dict:
        return self.data.get("eval_meta") or {}

    @property
    def tasks(self) -> list[str]:
        """The top-level tasks evaluated (MMLU's subjects and sub-groups are not tasks of their own)."""
        listed = self.eval_meta.get("tasks")
        names = list(self.data.get("eval") or {})
        if listed and all(t in names for t in listed):  # a tag (ai2_arc) has no entry: its members are the tasks
            return sorted(listed)
        return sorted(t for t in names if not (t.startswith("mmlu_") and "mmlu" in names))

    def _side(self, which: str) -> str | None:
        if self.kind == "eval":
            return "model" if which in ("pruned", "model") else None
        return which

    def metrics(self, task: str, which: str = "pruned") -> dict:
        side = self._side(which)
        return ((self.data.get("eval") or {}).get(task) or {}).get(side) or {} if side else {}

    def items(self, task: str) -> int | None:
        """Items scored on a task (lm-eval's effective count; older records: from the metric's stderr)."""
        n = (self.eval_meta.get("n_samples") or {}).get(task)
        if isinstance(n, Mapping):
            return int(n.get("effective", n.get("original")))
        if n is not None:
            return int(n)
        if task == "mmlu":
            subjects = [self.items(t) for t in (self.data.get("eval") or {}) if t.startswith("mmlu_")
                        and (self.eval_meta.get("n_samples") or {}).get(t)]
            return sum(subjects) or None
        m = self.metrics(task, "dense" if self.kind == "run" else "pruned")
        p, se = m.get("acc"), m.get("acc_stderr")
        if p is not None and se:  # lm-eval's stderr of a mean of 0/1 values: sqrt(p(1-p)/(n-1))
            return int(round(p * (1 - p) / se**2 + 1))
        return None

    def suite(self) -> str:
        """What was evaluated: the task set and items per task (the report groups runs by it, not by the eval
        preset's name: two runs with the same preset and other `eval.tasks` are different suites)."""
        return ", ".join(f"{t}:{self.items(t) or '?'}" for t in self.tasks)

    # -------------------------------------------------------------- scores
    def score(self, task: str, which: str = "pruned") -> Score | None:
        m = self.metrics(task, which)
        metric = task_metric(task, m)
        v = m.get(metric)
        if v is None:
            return None
        if self.kind == "eval":
            ci = ((self.data.get("intervals") or {}).get("tasks") or {}).get(task, {}).get(metric)
            return Score(v, ci, metric=metric, n=self.items(task))
        sig = ((self.data.get("significance") or {}).get("tasks") or {}).get(task, {}).get(metric)
        if not sig:
            return Score(v, metric=metric, n=self.items(task))
        side = "a" if which == "dense" else "b"
        return Score(v, sig[f"{side}_ci"], sig["significant"] if which == "pruned" else None, sig["p"], metric,
                     sig.get("n"))

    def _paper_entry(self) -> dict | None:
        """The stored (or, for older records, recomputed from the per-sample files) average entry."""
        if "paper" in self._avg_cache:
            return self._avg_cache["paper"]
        block = self.data.get("intervals") if self.kind == "eval" else self.data.get("significance")
        entry = ((block or {}).get("average") or {}).get(PAPER)
        if entry is None:
            entry = self._paper_from_files()
        self._avg_cache["paper"] = entry
        return entry

    def _paper_from_files(self) -> dict | None:
        """Migration: an older record's average interval from the samples beside it; when every task reports
        the same metric, that metric's recorded average is the same number."""
        metrics = {task_metric(t, self.metrics(t, "dense" if self.kind == "run" else "pruned")) for t in self.tasks}
        block = (self.data.get("intervals") if self.kind == "eval" else self.data.get("significance")) or {}
        if len(metrics) == 1 and (block.get("average") or {}).get(next(iter(metrics))):
            return block["average"][next(iter(metrics))]
        if self.path is None:
            return None
        from llm_streamline.evaluate.harness import load_samples_jsonl

        groups = self.eval_meta.get("groups")
        if self.kind == "eval":
            f = self.path / "samples.jsonl"
            return paper_average(load_samples_jsonl(f), groups=groups) if f.is_file() else None
        fa, fb = self.path / "samples_dense.jsonl", self.path / "samples_pruned.jsonl"
        if not (fa.is_file() and fb.is_file()):
            return None
        return paper_average(load_samples_jsonl(fa), load_samples_jsonl(fb), groups=groups)

    def average(self, which: str = "pruned") -> Score | None:
        """The average of each task's reported metric over the evaluated tasks, with its interval."""
        scores = [self.score(t, which) for t in self.tasks]
        scores = [s for s in scores if s is not None]
        if not scores:
            return None
        entry = self._paper_entry()
        side = "a" if (which == "dense" or self.kind == "eval") else "b"
        # an entry over other tasks (an older record's average of a task subset) is not this average
        mean = math.fsum(scores) / len(scores)
        if entry is None or f"{side}_ci" not in entry or sorted(entry.get("tasks", self.tasks)) != self.tasks:
            return Score(mean, metric=PAPER)
        sig = entry.get("significant") if (which == "pruned" and self.kind == "run") else None
        return Score(entry.get(side, mean), entry[f"{side}_ci"], sig, metric=PAPER)

    def stability(self) -> dict:
        return (self.data.get("stability") or {}).get("average") or {}

    def perplexity(self, which: str = "pruned") -> float | None:
        side = self._side(which)
        return (((self.data.get("perplexity") or {}).get(side) or {}).get("ppl")) if side else None

    @property
    def speed(self) -> dict:
        return self.data.get("speed") or {}

    @property
    def layers(self) -> dict:
        return self.data.get("layers") or {}

    @property
    def params(self) -> dict:
        return self.data.get("params") or {}

    @property
    def timings(self) -> dict:
        return self.data.get("timings") or {}

    @property
    def seed(self) -> int | None:
        return self.data.get("seed")

    def objective(self, name: str) -> float | None:
        """The number a sweeper optimises (`objective=`): `ppl` (the evaluated model's perplexity, minimise),
        `avg_acc` (the average above, maximise), `stability` (maximise; runs only)."""
        if name == "ppl":
            return self.perplexity("pruned")
        if name == "stability":
            return self.stability().get("stability")
        if name == "avg_acc":
            avg = self.average("pruned")
            return None if avg is None else float(avg)
        raise ValueError(f"objective={name!r}: ppl | avg_acc | stability")

    # -------------------------------------------------------------- labels
    @property
    def label(self) -> str:
        """The row's name: method:replacement plus the options that differ from the defaults (an eval job: what
        it evaluated)."""
        r = self.data
        if self.kind == "eval":
            p = Path(str(self.model_name).rstrip("/"))
            # <run>/model or <run>/export: the run directory says which model it is
            return f"eval:{p.parent.name if p.name in ('model', 'export') and p.parent.name else p.name}"
        rep = (r.get("replacement") or {}).get("type", "none")
        if r.get("method") != "streamline":  # baselines have no replacement; say how they were configured
            base = r.get("baseline") or {}
            name = base.get("label", r.get("method"))   # e.g. llm_pruner_style(kv-group): what the row is
            if "merge" in base:
                name += f" C={base['merge']}"
            if base.get("fallbacks"):  # collapses the paper's rule rejected, forced to reach n: not LaCo's output
                name += f" ({base['fallbacks']} of {len(base.get('merges', []))} collapses forced)"
            if r.get("train"):
                name += " +LoRA"
            return name
        name = f"{r['method']}:{rep}"
        tc = r.get("train_config") or {}
        if tc.get("loss") == "lora":  # the paper's comparison: LoRA on plain pruning
            return f"{name} +LoRA"
        if rep == "ffn" and not r["replacement"].get("residual", True):
            name += "(no residual)"
        rp = r.get("replacement") or {}
        if rep == "linear":  # ReplaceMe: which objective fitted the map
            name += f"({rp.get('objective', 'lstsq')})"
        if rp.get("init", "none") != "none":
            name += f" init={rp['init']}"
        training_free = rep == "linear" or (rep == "linear_patch" and not rp.get("finetune"))
        if rep != "none" and not training_free:
            if tc.get("loss", "mse") != "mse":
                name += f" loss={tc['loss']}"
            if tc.get("loss", "mse") == "mse" and tc.get("first_token", "exclude") != "exclude":
                name += f" first_token={tc['first_token']}"
            if tc.get("loss", "mse") == "mse" and tc.get("lr", 5e-4) != 5e-4:
                name += f" lr={tc['lr']:g}"
        return name

    def where(self) -> str:
        """The layers removed: `[11,19)`, a list of indices, `width` (LLM-Pruner) or `-` (an eval job)."""
        lay = self.layers
        if not lay:
            return "-"
        if lay.get("removed_indices") == []:
            return "width"
        if lay.get("contiguous", True):
            return f"[{lay['removed'][0]},{lay['removed'][1]})"
        return ",".join(str(i) for i in lay["removed_indices"]) or "width"

    # -------------------------------------------------------------- W&B
    def wandb_summary(self, objective: str | None = None) -> dict[str, float]:
        """The run summary, the same keys for run and eval jobs: `acc/<task>` (the task's reported metric),
        `acc/average` with `acc/average_low`/`_high`, `dense/...` for a run's reference, `ppl`, `ppl/dense`,
        `speed/*`, `stability/*`, `params/*`, `objective/<name>`."""
        out: dict[str, float] = {}

        def put(prefix: str, which: str) -> None:
            for t in self.tasks:
                s = self.score(t, which)
                if s is not None:
                    out[f"{prefix}/{t}"] = float(s)
                    for metric in ("acc", "acc_norm"):
                        if metric in self.metrics(t, which):
                            out[f"{prefix}/{t}/{metric}"] = float(self.metrics(t, which)[metric])
            avg = self.average(which)
            if avg is not None:
                out[f"{prefix}/average"] = float(avg)
                if avg.ci is not None:
                    out[f"{prefix}/average_low"], out[f"{prefix}/average_high"] = avg.ci

        put("acc", "pruned")
        if self.kind == "run":
            put("dense", "dense")
        if self.perplexity("pruned") is not None:
            out["ppl"] = self.perplexity("pruned")
        if self.perplexity("dense") is not None:
            out["ppl/dense"] = self.perplexity("dense")
        for k, v in self.speed.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"speed/{k}"] = v
            elif isinstance(v, Mapping):
                out.update({f"speed/{k}/{kk}": vv for kk, vv in v.items() if isinstance(vv, (int, float))})
        st = self.stability()
        for k in ("stability", "agreement"):
            if st.get(k) is not None:
                out[f"stability/{k}"] = st[k]
        for k in ("sparsity", "dense", "pruned", "total", "net_removed"):
            if isinstance(self.params.get(k), (int, float)):
                out[f"params/{k}"] = self.params[k]
        if self.layers.get("removed"):
            out["layers/start"] = self.layers["removed"][0]
        out.update({f"time/{k}": v for k, v in self.timings.items()})
        if objective:
            val = self.objective(objective)
            if val is not None:
                out[f"objective/{objective}"] = val
        return out


# ------------------------------------------------------------------------------------------ read / write
def migrate(data: dict) -> dict:
    """A record of any schema in the current shape (in memory)."""
    data = dict(data)
    schema = data.get("schema", 1)
    if not isinstance(schema, int) or schema > SCHEMA:
        raise RecordError(f"schema {schema!r} is newer than this llm-streamline reads ({SCHEMA}); upgrade it")
    if schema < 2:
        if data.get("method") == "eval":  # mode=eval's flat table {task: metrics}
            data["kind"] = "eval"
            data["eval"] = {t: {"model": m} for t, m in (data.get("eval") or {}).items()}
            settings = data.get("eval_settings") or {}
            data.setdefault("eval_meta", {"tasks": settings.get("tasks"), "limit": settings.get("limit"),
                                          "scorer": settings.get("scorer")})
        else:
            data["kind"] = "run"
        data["schema"] = 2
    return data


def of(x: RunRecord | Mapping, path: Path | None = None) -> RunRecord:
    """A RunRecord from a record or a (possibly older) results.json dict."""
    if isinstance(x, RunRecord):
        return x
    p = path or (Path(x["_path"]) if x.get("_path") else None)
    return RunRecord(migrate({k: v for k, v in x.items() if k != "_path"}), p)


def read(path: str | Path) -> RunRecord:
    """`<run dir>/results.json` (or the file itself) as a RunRecord; a damaged file is one RecordError line."""
    path = Path(path)
    f = path / "results.json" if path.is_dir() else path
    try:
        data = json.loads(f.read_text())
    except FileNotFoundError:
        raise RecordError(f"{f}: no results.json there (not a finished run or eval directory)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RecordError(f"{f}: not a complete results.json ({e}); was the run interrupted while writing?") from None
    if not isinstance(data, dict) or "eval" not in data:
        raise RecordError(f"{f}: not a run record (no `eval` table)")
    return RunRecord(migrate(data), f.parent)


def write(path: Path, data: dict) -> RunRecord:
    """Write a record atomically (stages' writer), stamped with the schema; returns it as read back."""
    from llm_streamline import stages

    data = {"schema": SCHEMA, **data}
    stages.write_json_atomic(Path(path), data)
    return RunRecord(migrate(data), Path(path).parent)
