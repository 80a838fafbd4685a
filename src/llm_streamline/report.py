"""`llm-streamline-report <runs dir> --out <dir>`: runs' results.json -> paper-style tables and plots.
`llm-streamline-report --compare RUN_A RUN_B`: two runs (or a run's dense model, `RUN:dense`) on the same
items: per task and metric both scores with intervals, the paired difference and the exact McNemar test.

Reads records only (never reruns a stage). Writes `table.md`, `table.csv`, `table.tex` (one row per run
plus the dense reference: accuracy per task, average, stability, perplexity, parameters, the cost of
compressing: trainable parameters, training tokens, seconds and peak memory of the search/training stages,
total wall time), `accuracy_vs_sparsity.png` (average accuracy, stability and perplexity against achieved
sparsity, one line per method/replacement), `quality_vs_train_tokens.png` (perplexity and average accuracy
against the replacement's training tokens, when the runs hold a data-size sweep) and `similarity_<model>.png`
(the layer-similarity heat map of each model, with every block the runs removed marked).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from llm_streamline import record, stages
from llm_streamline.errors import command_internal_error, usage_error
from llm_streamline.record import RecordError, RunRecord

METRIC_NOTE = record.METRIC_RULE
Cell = record.Score  # a score with its interval (the name the table code has used)


def _natural(path: Path) -> list:
    """Sort key: multirun job directories in job order (2-... before 10-...)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_records(root: Path) -> tuple[list[RunRecord], list[tuple[str, str]]]:
    """Every run and eval record under `root`, and every results.json it could not use with the reason."""
    found, skipped = [], []
    for p in sorted(Path(root).rglob("results.json"), key=_natural):
        try:
            found.append(record.read(p))
        except RecordError as e:
            skipped.append((str(p.parent), str(e).removeprefix(f"{p}: ")))
    return found, skipped


def find_results(root: Path) -> list[RunRecord]:
    return find_records(root)[0]


def _task_cell(r, task: str, which: str) -> Cell | None:
    """The run's score on a task with its interval (record.RunRecord.score)."""
    return record.of(r).score(task, which)


def label(r) -> str:
    """method:replacement, plus the options that differ from the defaults (record.RunRecord.label)."""
    return record.of(r).label


def _suite_key(r: RunRecord) -> str:
    """What groups runs under one dense row: the evaluated task set and items per task; where an item count is
    unknown (older records) the eval preset's name too, since equal names are then the only evidence."""
    key = r.suite()
    preset = r.eval_meta.get("suite")
    return f"{key} ({preset})" if "?" in key and preset else key


def _run_config(r: RunRecord) -> dict | None:
    """The run's composed Hydra config (`.hydra/config.yaml` beside its results.json), when it was kept."""
    import yaml

    from llm_streamline.config import recorded_config

    f = Path(r.path or "") / ".hydra" / "config.yaml"
    return recorded_config(yaml.safe_load(f.read_text()) or {}) if f.is_file() else None


# Keys of a run's config that do not make it a different experiment: repeated runs differ only in these.
NOT_THE_EXPERIMENT = ("seed", "wandb", "checkpoint", "save")


def _identity(r: RunRecord) -> tuple[str, int | None]:
    """(what groups repeated runs, the run's seed). Runs are grouped only when their recorded configs are equal
    except for the seed: a run without its config stands alone (its path is its group)."""
    cfg = _run_config(r)
    if cfg is None:
        return f"path:{r.path}", r.seed
    same = {k: v for k, v in cfg.items() if k not in NOT_THE_EXPERIMENT}
    return json.dumps(same, sort_keys=True, default=str), cfg.get("seed")


def _run_record(r: RunRecord, tasks: list[str], root: Path | None) -> dict:
    """One run as a flat record of the table's columns (cells keep their intervals)."""
    scores = {t: r.score(t, "pruned") for t in tasks}
    stab = r.stability()
    group, seed = _identity(r)
    path = Path(r.path or ".")
    return {"_group": group, "_model": r.model_name, "_suite": _suite_key(r), "run": r.label, "seed": seed,
            "layers removed": r.where(), "params": r.params.get("pruned", r.params.get("total")),
            "sparsity": r.params.get("sparsity"), **scores,
            "avg": r.average("pruned"),  # over the record's own tasks (its dense row's task set)
            "stability": stab.get("stability"), "agreement": stab.get("agreement"), "ppl": r.perplexity("pruned"),
            **dict(zip(("trainable", "compress s", "compress MiB"), compress_cost(r.data))),
            "train tokens": (r.data.get("train") or {}).get("tokens"),
            "wall s": round(sum(r.timings.values()), 1),
            "path": str(path.relative_to(root)) if root and path.is_relative_to(root) else str(path)}


def _dense_record(r: RunRecord, tasks: list[str]) -> dict:
    scores = {t: r.score(t, "dense") for t in tasks}
    return {"_model": r.model_name, "_suite": _suite_key(r), "params": r.params.get("dense"), "sparsity": 0.0,
            **scores, "avg": r.average("dense"), "stability": 1.0, "agreement": 1.0, "ppl": r.perplexity("dense")}


class Spread(float):
    """The mean over repeated runs with its standard deviation across them (n runs)."""

    def __new__(cls, values: list[float]):
        import statistics

        c = super().__new__(cls, statistics.fmean(values))
        c.std, c.n = statistics.stdev(values), len(values)
        return c


def _combine(values: list):
    """One cell from a group's values: the value itself when all are equal (a dense model reused by every run,
    a count), mean and spread when numbers differ, the distinct values joined otherwise."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if all(v == present[0] or (isinstance(v, float) and math.isclose(v, present[0], rel_tol=1e-9))
           for v in present):  # one dense model's numbers, recomputed in several runs: equal up to rounding
        return max(present, key=lambda v: getattr(v, "ci", None) is not None)  # the cell with its interval
    if all(isinstance(v, (int, float)) for v in present):
        return Spread([float(v) for v in present])
    return " ".join(dict.fromkeys(str(v) for v in present))


def _suite_names(results: list[RunRecord]) -> dict[str, str]:
    """A short name per suite key: the eval preset's name where it names one task set and item count only,
    else the task set itself (`piqa:200, arc_easy:570`)."""
    keys_of: dict[str | None, set[str]] = {}
    for r in results:
        keys_of.setdefault(r.eval_meta.get("suite"), set()).add(_suite_key(r))
    names = {}
    for r in results:
        preset, key = r.eval_meta.get("suite"), _suite_key(r)
        names[key] = preset if preset and len(keys_of[preset]) == 1 else key
    return names


def _replicates(g) -> list:
    """A group's runs as table rows: one row (mean ± std) when the runs are replicates (their seeds all differ),
    else one row per run — runs with the same seed are not independent repetitions."""
    seeds = [s for s in g["seed"] if s is not None and s == s]
    if len(g) > 1 and len(set(seeds)) == len(g):
        return [g]
    return [g.iloc[[k]] for k in range(len(g))]


def rows_of(results: list, root: Path | None = None) -> tuple[list[str], list[list]]:
    """Table rows: per (model, evaluated task set and items), its dense model (from every run scored on it, not
    the first one found), then one row per experiment — repeated runs that differ only in the seed are one row
    (mean ± std). Eval jobs' records are rows of their own (no dense reference)."""
    import pandas as pd

    results = [record.of(r) for r in results]
    tasks = sorted({t for r in results for t in r.tasks})
    header = ["run", "seeds", "layers removed", "params", "sparsity", *tasks, "avg", "stability", "agreement",
              "ppl", "trainable", "train tokens", "compress s", "compress MiB", "wall s", "path"]
    # dtype object: a cell keeps its interval (pandas would turn a float subclass into a plain float)
    runs = pd.DataFrame([_run_record(r, tasks, root) for r in results], dtype=object)
    dense = pd.DataFrame([_dense_record(r, tasks) for r in results if r.kind == "run"], dtype=object)
    names = _suite_names(results)
    several = runs[["_model", "_suite"]].drop_duplicates().shape[0] > 1
    rows, groups = [], []  # groups: each row's experiment key (None for a dense row)
    for (model, suite), block in runs.groupby(["_model", "_suite"], sort=False):
        d = dense[(dense["_model"] == model) & (dense["_suite"] == suite)] if len(dense) else dense
        if len(d):
            name = f"dense ({model}, {names[suite]})" if several else "dense"
            rows.append([name, "-", "-"] + [_combine(list(d[c])) for c in header[3:header.index("trainable")]]
                        + [None] * 5 + ["-"])
            groups.append(None)
        for _, group in block.groupby("_group", sort=False):
            for g in _replicates(group):
                seeds = [s for s in g["seed"] if s is not None and s == s]
                row = [None if c == "seeds" else _combine(list(g[c])) if len(g) > 1 else g[c].iloc[0]
                       for c in header]
                row[1] = ",".join(str(int(s)) for s in seeds) if seeds else "-"
                rows.append([None if (isinstance(v, float) and v != v) else v for v in row])  # pandas' NaN = none
                groups.append(g["_group"].iloc[0])
    _disambiguate(rows, groups)
    return header, rows


def _flat_config(group: str) -> dict[str, str]:
    """A row's recorded config (its group key: the Hydra config without the seed) as {dotted key: value}."""
    if group is None or group.startswith("path:"):  # no config kept: the command line's overrides, if kept
        import yaml

        path = Path(group.removeprefix("path:") if group else "")
        for f in (path / ".hydra" / "overrides.yaml", path / "overrides.yaml"):
            if f.is_file():
                items = yaml.safe_load(f.read_text()) or []
                return dict(str(o).lstrip("+~").split("=", 1) for o in items if "=" in str(o))
        return {"run": path.name}
    out: dict[str, str] = {}

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)

    walk(json.loads(group))
    return out


def _disambiguate(rows: list[list], groups: list) -> None:
    """Rows of different experiments that got the same label get the config keys that tell them apart (at most
    three, e.g. `streamline:layer lr=0.001 (data.train_samples=1024)`): one label, one configuration."""
    blocks: list[dict[str, list[int]]] = [{}]  # per dense row's block: rows under another dense row differ anyway
    for k, (row, group) in enumerate(zip(rows, groups)):
        if group is None:
            blocks.append({})
        else:
            blocks[-1].setdefault(row[0], []).append(k)
    for label, ks in ((lab, ks) for b in blocks for lab, ks in b.items()):
        if len(ks) < 2:
            continue
        flats = [_flat_config(groups[k]) for k in ks]
        keys = sorted({key for f in flats for key in f if len({g.get(key) for g in flats}) > 1})
        keys = [key for key in keys if not key.startswith(("hydra", "output_dir"))
                and key.split(".", 1)[0] not in NOT_THE_EXPERIMENT][:3]
        for k, flat in zip(ks, flats):
            if keys:
                rows[k][0] = f"{label} (" + ", ".join(f"{key}={flat.get(key, 'default')}" for key in keys) + ")"


COMPRESS_STAGES = ("compress", "teacher_pairs", "train")  # a baseline's search/healing; our pairs + training


def compress_cost(r: dict) -> tuple[int | None, float | None, float | None]:
    """(trainable parameters, seconds, peak RSS MiB) of the stages that compress the model. A stage reused
    from the cache is absent from `timings`: its cost is that of the run that computed it."""
    trainable = (r.get("train") or {}).get("trainable_params")
    t = r.get("timings", {})
    secs = sum(t[s] for s in COMPRESS_STAGES if s in t) if any(s in t for s in COMPRESS_STAGES) else None
    mem = (r.get("peak_memory") or {}).get("stage_rss_mib") or {}
    peaks = [mem[s] for s in COMPRESS_STAGES if s in mem]
    return trainable, (round(secs, 1) if secs is not None else None), (max(peaks) if peaks else None)


NOT_SIGNIFICANT = "≈"  # marks a compressed model's score that does not differ significantly from dense


def _count(n: int) -> str:
    """A parameter count readable at every size: 950, 16.5k, 134.5M, 6.7B."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _fmt(v, column: str = "") -> str:
    if v is None:
        return "-"
    if column.endswith(" s") and isinstance(v, (int, float)) and not isinstance(v, bool):
        # seconds: one decimal (6.4, 812.0), never 6.4000
        return f"{v:.1f}±{v.std:.1f}" if isinstance(v, Spread) else f"{v:.1f}"
    if column.endswith(" MiB") and isinstance(v, (int, float)) and not isinstance(v, bool):
        return f"{v:.0f}"
    if isinstance(v, Spread):
        return f"{v:.3f}±{v.std:.3f}" if abs(v) < 10 else f"{v:.1f}±{v.std:.1f}"
    if isinstance(v, Cell) and v.ci is not None:
        half = (v.ci[1] - v.ci[0]) / 2
        return f"{v:.3f}±{half:.3f}" + (f" {NOT_SIGNIFICANT}" if v.significant is False else "")
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return _count(v)
    return str(v)


def select(header: list[str], rows: list[list], columns: list[str] | None = None,
           labels: dict[str, str] | None = None) -> tuple[list[str], list[list]]:
    """The table with only `columns` (in that order; `run` always first) and rows renamed by `labels` (keyed by
    a row's name or its path). An unknown column is one error line listing the available ones."""
    if labels:
        i_run, i_path = header.index("run"), header.index("path")
        rows = [[labels.get(str(r[i_path]), labels.get(str(r[i_run]), r[i_run])) if k == i_run else v
                 for k, v in enumerate(r)] for r in rows]
    if not columns:
        return header, rows
    unknown = [c for c in columns if c not in header]
    if unknown:
        raise usage_error(f"llm-streamline-report: error: --columns {','.join(unknown)}: no such column "
                         f"(available: {', '.join(header)})")
    keep = [header.index("run")] + [header.index(c) for c in columns if c != "run"]
    return [header[k] for k in keep], [[r[k] for k in keep] for r in rows]


def write_tables(header, rows, out: Path, skipped: list[tuple[str, str]] | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(_fmt(v, c) for v, c in zip(row, header)) + " |" for row in rows]
    md.append("")
    md.append(f"Accuracy: {METRIC_NOTE}; avg: their unweighted mean over the tasks; ± is half the 95% bootstrap "
              f"interval over items (avg: stratified by task); {NOT_SIGNIFICANT} marks "
              "a compressed model's score that does not differ significantly from the dense model's on the same "
              "items (task: exact McNemar p >= 0.05; avg: the paired stratified bootstrap interval of the "
              "difference contains 0). A row over several seeds shows mean±standard deviation across its runs "
              "instead (no interval). Stability: paper formula (weights by the spread of the dense model's mean "
              "NLL over prompt + option); agreement: unweighted. ppl: perplexity on a text no stage trains or "
              "selects on (results.json `perplexity.text`). Runs are grouped under a dense row by the task set and "
              "items per task they were scored on.")
    for path, why in skipped or []:
        md.append(f"\nskipped {path}: {why}")
    stages.write_text_atomic(out / "table.md", "\n".join(md) + "\n")
    stages.write_atomic(out / "table.csv", lambda tmp: _frame(header, rows).to_csv(tmp, index=False))
    stages.write_text_atomic(out / "table.tex", latex(header, rows))


def latex(header: list[str], rows: list[list]) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs}); a dense row starts each block after the first with a
    \\midrule."""
    align = "l" + "".join("l" if h in ("seeds", "layers removed", "path") else "r" for h in header[1:])
    tex = ["% requires \\usepackage{booktabs}", "\\begin{tabular}{" + align + "}", "\\toprule",
           " & ".join(_tex(h) for h in header) + " \\\\", "\\midrule"]
    for k, row in enumerate(rows):
        if k and str(row[0]).startswith("dense"):
            tex.append("\\midrule")
        tex.append(" & ".join(_tex(_fmt(v, c)) for v, c in zip(row, header)) + " \\\\")
    tex += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(tex) + "\n"


def _frame(header: list[str], rows: list[list]):
    """The table as numbers for a CSV reader: a mean's spread in its own `<column> std` column, a score's 95%
    interval in `<column> ci_low` / `<column> ci_high`."""
    import pandas as pd

    frame = pd.DataFrame([[float(v) if isinstance(v, float) else v for v in row] for row in rows], columns=header)
    for j, col in enumerate(header):
        stds = [row[j].std if isinstance(row[j], Spread) else None for row in rows]
        at = frame.columns.get_loc(col) + 1
        if any(x is not None for x in stds):
            frame.insert(at, f"{col} std", stds)
            at += 1
        cis = [getattr(row[j], "ci", None) if isinstance(row[j], Cell) else None for row in rows]
        if any(c is not None for c in cis):
            frame.insert(at, f"{col} ci_low", [c[0] if c else None for c in cis])
            frame.insert(at + 1, f"{col} ci_high", [c[1] if c else None for c in cis])
    return frame


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}",
        ">": r"\textgreater{}", "|": r"\textbar{}", "±": r"$\pm$", "≈": r"$\approx$"}


def _tex(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def _yerr(cells: list) -> list[list[float]]:
    """matplotlib's asymmetric error bars from cells' 95% intervals (0 where a cell has none)."""
    return [[c - c.ci[0] if getattr(c, "ci", None) else 0 for c in cells],
            [c.ci[1] - c if getattr(c, "ci", None) else 0 for c in cells]]


def _suites(rows: list[list]) -> list[tuple[list, list[list]]]:
    """rows_of's rows as (dense row, its runs' rows) per (model, suite): rows_of puts each dense row first."""
    blocks: list[tuple[list, list[list]]] = []
    for row in rows:
        if row[0].startswith("dense"):
            blocks.append((row, []))
        elif blocks:
            blocks[-1][1].append(row)
    return blocks


def _dense_lines(ax, blocks, j: int) -> None:
    """Each suite's dense value of column j as a dashed (dotted, ...) black line."""
    for k, (dense, _) in enumerate(blocks):
        if dense[j] is not None:
            ax.axhline(dense[j], color="k", ls=("--", ":", "-.")[k % 3], lw=1, label=dense[0])


def plot(results: list[dict], out: Path) -> None:
    """`accuracy_vs_sparsity.png`: average accuracy (with its 95% interval where recorded), stability and
    perplexity against achieved sparsity; one line per method (and suite, when the runs span several)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    header, rows = rows_of(results)
    cols = [header.index(c) for c in ("avg", "stability", "ppl")]
    i_sp = header.index("sparsity")
    rows = [r for r in rows if r[i_sp] is not None]  # an eval job's record has no sparsity to plot against
    blocks = _suites(rows)
    series: dict[str, list[list]] = {}
    for dense, runs in blocks:
        for row in runs:
            series.setdefault(f"{row[0]} {dense[0].removeprefix('dense ')}" if len(blocks) > 1 else row[0],
                              []).append(row)
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.5))
    # ten distinct colours first, then the lighter tab20 shades for more series
    colors = plt.get_cmap("tab10").colors + plt.get_cmap("tab20").colors[1::2]
    for k, (name, pts) in enumerate(sorted(series.items())):
        pts.sort(key=lambda r: r[i_sp])
        style = dict(color=colors[k % len(colors)], marker="os^Dv"[k % 5], label=name)
        for ax, j in zip(axes, cols):
            xy = [(r[i_sp], r[j]) for r in pts if r[j] is not None]
            x, y = [x for x, _ in xy], [y for _, y in xy]
            if j == cols[0] and any(getattr(v, "ci", None) for v in y):  # average accuracy: its 95% interval
                ax.errorbar(x, y, yerr=_yerr(y), capsize=3, **style)
            else:
                ax.plot(x, y, "-", **style)
    _dense_lines(axes[0], blocks, cols[0])
    _dense_lines(axes[2], blocks, cols[2])
    for ax, name in zip(axes, ("average accuracy (95% interval where recorded)", "stability",
                               "perplexity (log scale)")):
        ax.set_xlabel("sparsity (fraction of all parameters removed)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[2].set_yscale("log")
    axes[2].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_sparsity.png", dpi=110)
    plt.close(fig)


def plot_train_tokens(results: list, out: Path) -> Path | None:
    """`quality_vs_train_tokens.png`: held-out perplexity and the average accuracy (the table's: each task's
    reported metric) with its stratified bootstrap 95% interval against the training tokens the replacement saw
    (`train.tokens`: blocks x seq_len x epochs); one line per method, block and suite, each suite's dense model
    dashed. Drawn only when some line has two or more token counts (a data-size sweep)."""
    series: dict[str, list[tuple]] = {}
    dense: dict[str, tuple] = {}
    for r in map(record.of, results):
        tokens = (r.data.get("train") or {}).get("tokens")
        avg, avg_dense = r.average("pruned"), r.average("dense")
        if not tokens or avg is None or avg_dense is None:
            continue
        suite = f"({r.model_name}, {_suite_names([r])[_suite_key(r)]})"
        dense[suite] = (r.perplexity("dense"), float(avg_dense))
        name = f"{r.label} {r.where()} {suite}"
        series.setdefault(name, []).append((tokens, r.perplexity("pruned"), avg))
    series = {k: v for k, v in series.items() if len({t for t, _, _ in v}) > 1}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ppl, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for k, (name, pts) in enumerate(sorted(series.items())):
        pts.sort(key=lambda p: p[0])
        x, acc = [p[0] for p in pts], [p[2] for p in pts]
        style = dict(color=plt.get_cmap("tab10").colors[k % 10], marker="os^Dv"[k % 5], label=name)
        ax_ppl.plot(x, [p[1] for p in pts], "-", **style)
        ax_acc.errorbar(x, acc, yerr=_yerr(acc), capsize=3, **style)
    for k, (suite, (d_ppl, d_acc)) in enumerate(sorted(dense.items())):
        ls = ("--", ":", "-.")[k % 3]
        if d_ppl:
            ax_ppl.axhline(d_ppl, color="k", ls=ls, lw=1, label=f"dense {suite}")
        ax_acc.axhline(d_acc, color="k", ls=ls, lw=1, label=f"dense {suite}")
    for ax, name in ((ax_ppl, "held-out perplexity (log scale)"),
                     (ax_acc, "average acc over all tasks, 95% interval")):
        ax.set_xscale("log")
        ax.set_xlabel("training tokens (blocks x seq_len x epochs)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3, which="both")
    ax_ppl.set_yscale("log")
    ax_acc.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    path = out / "quality_vs_train_tokens.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_similarity(results: list[dict], out: Path) -> list[Path]:
    """One heat map per model (its calibration profile), with every contiguous block a run removed."""
    from llm_streamline.plots import plot_profile

    by_model: dict[str, list[dict]] = {}
    for r in map(record.of, results):
        if r.data.get("similarity_profile"):
            by_model.setdefault(r.model_name, []).append(r.data)
    paths = []
    for name, runs in sorted(by_model.items()):
        prof = runs[0]["similarity_profile"]
        blocks = sorted({(r["layers"]["removed"][0], r["layers"]["n_removed"]) for r in runs
                         if r["layers"].get("contiguous") and r["layers"].get("n_removed")})
        path = out / f"similarity_{name}.png"
        plot_profile({int(k): v for k, v in prof["cosine"].items()}, prof["num_layers"], path, chosen=blocks,
                     title=f"{name}: layer similarity on {prof['tokens']} calibration tokens; x = blocks removed")
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------ one run, at its end

def _interval(c: Cell | None) -> str:
    return "-" if c is None else c.text()


def summary(r) -> str:
    """A record as a short console table (printed at the end of a run and of an eval job): the block removed,
    parameters, perplexity and per-task accuracy dense → pruned (95% intervals; ≈ = not significantly different
    from dense), their average, stability, speed, wall time. An eval job: its one model's column."""
    r = record.of(r)
    params = r.params
    run = r.kind == "run"
    if run:
        lines = [f"{r.model_name} · {r.label} · layers removed {r.where()} of {r.layers.get('n_original', '?')}",
                 f"{'params':<25} {_count(params['dense'])} → {_count(params['pruned'])} "
                 f"({params['sparsity']:.1%} fewer)"]
    else:
        lines = [f"{r.model_name} · {r.label}", f"{'params':<25} {_count(params.get('total', 0))}"]
    arrow = lambda d, p: f"{d} → {p}" if run else p  # noqa: E731
    if r.perplexity("pruned") is not None:
        lines.append(f"{'perplexity':<25} " + arrow(f"{r.perplexity('dense') or float('nan'):.1f}",
                                                      f"{r.perplexity('pruned'):.1f}"))
    for task in r.tasks:
        d, p = r.score(task, "dense"), r.score(task, "pruned")
        metric = (p or d).metric if (p or d) is not None else "acc"
        mark = f" {NOT_SIGNIFICANT}" if p is not None and p.significant is False else ""
        lines.append(f"{f'{task} ({metric})':<25} " + arrow(_interval(d), _interval(p)) + mark)
    avg_d, avg_p = r.average("dense"), r.average("pruned")
    if avg_p is not None:
        mark = f" {NOT_SIGNIFICANT}" if avg_p.significant is False else ""
        # the mean of the metrics listed above (acc or acc_norm per task, record.METRIC_RULE), not of one metric
        lines.append(f"{'average of the above':<25} " + arrow(_interval(avg_d), _interval(avg_p)) + mark)
    stab = r.stability()
    if stab.get("stability") is not None:
        lines.append(f"{'stability':<25} {stab['stability']:.3f} (agreement {stab.get('agreement', float('nan')):.3f})")
    sp = r.speed
    if sp.get("prefill_speedup") is not None:
        lines.append(f"{'speed-up':<25} prefill {sp['prefill_speedup']:.2f}x, decode {sp['decode_speedup']:.2f}x")
    elif (sp.get("model") or {}).get("prefill_tokens_per_s") is not None:
        lines.append(f"{'speed':<25} prefill {sp['model']['prefill_tokens_per_s']:.0f} tokens/s, decode "
                     f"{sp['model']['decode_tokens_per_s']:.1f} tokens/s")
    lines.append(f"{'wall time':<25} {sum(r.timings.values()):.1f} s")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ two runs, paired

def _samples_of(spec: str) -> tuple[str, list[dict], dict | None]:
    """A run directory's compressed-model rows (`RUN` or `RUN:pruned`), its dense model's (`RUN:dense`), or an
    eval job's directory (its one model). Returns (name, rows, the record's task groups)."""
    from llm_streamline.evaluate.harness import load_samples_jsonl

    path, _, which = spec.partition(":")
    which = which or "pruned"
    if which not in ("pruned", "dense"):
        raise usage_error(f"llm-streamline-report: error: {spec}: the suffix must be :dense or :pruned")
    rec = None
    try:
        rec = record.read(path)
    except RecordError as e:
        if (Path(path) / "results.json").exists():  # there but damaged: say so rather than compare blindly
            raise usage_error(f"llm-streamline-report: error: {e}") from None
    f = Path(path) / f"samples_{which}.jsonl"
    if rec is not None and rec.kind == "eval":
        if which == "dense":
            raise usage_error(f"llm-streamline-report: error: {spec}: an eval job's directory has one model "
                              "(no :dense)")
        f = Path(path) / "samples.jsonl"
    if not f.exists():
        raise usage_error(f"llm-streamline-report: error: {f} does not exist (a run directory holds samples_*.jsonl, "
                         "an eval job's samples.jsonl)")
    name = "dense" if which == "dense" else Path(path).name
    if which == "pruned" and rec is not None:
        name = f"{rec.label} ({Path(path).name})"
    groups = rec.eval_meta.get("groups") if rec is not None else None
    try:
        rows = load_samples_jsonl(f)
    except (OSError, ValueError) as e:  # a truncated last line: name the file, not a JSON traceback
        raise usage_error(f"llm-streamline-report: error: {f} is unreadable ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]}); truncated? evaluate the run again") from None
    _check_row_counts(f, rows, rec)
    return name, rows, groups


def _check_row_counts(f: Path, rows: list[dict], rec) -> None:
    """A samples file cut at a line boundary still parses: its rows per task must be the items the record
    says were scored, or the comparison would pair a subset without a word."""
    if rec is None:
        return
    have: dict[str, int] = {}
    for row in rows:
        have[row.get("task")] = have.get(row.get("task"), 0) + 1
    for task in (rec.eval_meta.get("n_samples") or {}):
        want = rec.items(task)
        if want is not None and have.get(task, 0) != want:
            raise usage_error(f"llm-streamline-report: error: {f} holds {have.get(task, 0)} rows of {task}, "
                             f"{want} were scored (results.json); truncated or edited? evaluate the run again")


def compare_table(name_a: str, name_b: str, cmp: dict) -> str:
    """Markdown: per task and metric, both scores with intervals, the paired difference, McNemar's test."""
    lines = [f"A = {name_a}", f"B = {name_b}", "",
             "| task | metric | n | A | B | B - A [95% CI] | only A right | only B right | McNemar p | |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def ci(c):  # an interval of a score
        return f"[{c[0]:.3f}, {c[1]:.3f}]"

    def dci(c):  # an interval of a difference
        return f"[{c[0]:+.3f}, {c[1]:+.3f}]"

    for task, per in sorted(cmp["tasks"].items()):
        for metric, e in sorted(per.items()):
            mark = "significant" if e["significant"] else "not significant"
            lines.append(f"| {task} | {metric} | {e['n']} | {e['a']:.3f} {ci(e['a_ci'])} "
                         f"| {e['b']:.3f} {ci(e['b_ci'])} | {e['diff']:+.3f} {dci(e['diff_ci'])} "
                         f"| {e['a_only']} | {e['b_only']} | {e['p']:.3g} | {mark} |")
    for metric, e in sorted(cmp["average"].items()):
        mark = "significant" if e["significant"] else "not significant"
        metric = "reported" if metric == record.PAPER else metric  # each task's metric (record.METRIC_RULE)
        lines.append(f"| average ({len(e['tasks'])} tasks) | {metric} | | {e['a']:.3f} {ci(e['a_ci'])} "
                     f"| {e['b']:.3f} {ci(e['b_ci'])} | {e['diff']:+.3f} {dci(e['diff_ci'])} | | | | {mark} |")
    unpaired = sum(e["unpaired"] for per in cmp["tasks"].values() for e in per.values())
    lines += ["", "Paired on the items both runs scored" + (f" ({unpaired} item-metrics scored by one run only were "
              "left out)" if unpaired else "") + "; intervals: bootstrap over items (averages: stratified by task); "
              "a task difference is significant when the exact McNemar p < 0.05, an average when its interval "
              "excludes 0. `reported`: each task's reported metric (" + record.METRIC_RULE + "), the table's average."]
    return "\n".join(lines) + "\n"


def compare_runs(spec_a: str, spec_b: str, out: Path | None = None) -> dict:
    from llm_streamline.evaluate.significance import compare_rows

    (name_a, rows_a, groups), (name_b, rows_b, groups_b) = _samples_of(spec_a), _samples_of(spec_b)
    cmp = compare_rows(rows_a, rows_b)
    paper = record.paper_average(rows_a, rows_b, groups=groups or groups_b)
    if paper is not None:
        cmp["average"][record.PAPER] = paper
    text = compare_table(name_a, name_b, cmp)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(text)
        (out / "compare.json").write_text(json.dumps({"a": name_a, "b": name_b, **cmp}, indent=1))
    print(text)
    return cmp


def _labels(path: Path | None) -> dict[str, str] | None:
    """--labels FILE: a YAML/JSON mapping {row name or run path: the name to print}."""
    if path is None:
        return None
    import yaml

    try:
        labels = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise usage_error(f"llm-streamline-report: error: --labels {path}: {e}".splitlines()[0]) from None
    if not isinstance(labels, dict):
        raise usage_error(f"llm-streamline-report: error: --labels {path}: expected a mapping of row name or path "
                         "to label")
    return {str(k): str(v) for k, v in labels.items()}


def main(argv: list[str] | None = None) -> None:
    """`llm-streamline-report`: bad input is one line and exit 2 (`usage_error`); any other error exit 3, its
    traceback in a temporary file."""
    try:
        _main(argv)
    except Exception as e:
        command_internal_error("llm-streamline-report", e)


def _main(argv: list[str] | None) -> None:
    from llm_streamline import __version__

    ap = argparse.ArgumentParser(prog="llm-streamline-report", description=__doc__.splitlines()[0])
    ap.add_argument("--version", action="version", version=f"llm-streamline {__version__}")
    ap.add_argument("runs", type=Path, nargs="?", help="a directory searched recursively for results.json")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                    help="paired comparison of two run directories on the items both scored (RUN:dense = that "
                         "run's dense model; an eval job's directory is its one model)")
    ap.add_argument("--columns", help="comma-separated columns to keep, in that order (run is always first), "
                                      "e.g. avg,stability,ppl,params")
    ap.add_argument("--labels", type=Path, help="YAML/JSON file {row name or run path: label} renaming rows")
    args = ap.parse_args(argv)
    if args.compare:
        compare_runs(*args.compare, out=args.out)
        return
    if args.runs is None or args.out is None:
        ap.error("give a runs directory and --out, or --compare RUN_A RUN_B")
    results, skipped = find_records(args.runs)
    for path, why in skipped:
        print(f"llm-streamline-report: skipped {path}: {why}", file=sys.stderr)
    if not results:
        raise usage_error(f"llm-streamline-report: error: no readable results.json under {args.runs}")
    header, rows = rows_of(results, root=args.runs)
    header, rows = select(header, rows, args.columns.split(",") if args.columns else None, _labels(args.labels))
    write_tables(header, rows, args.out, skipped)
    plot(results, args.out)
    plot_train_tokens(results, args.out)
    plot_similarity(results, args.out)
    print((args.out / "table.md").read_text())


if __name__ == "__main__":
    main()
