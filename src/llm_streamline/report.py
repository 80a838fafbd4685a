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
import re
from pathlib import Path

METRIC_NOTE = ("acc_norm for hellaswag, arc_challenge, openbookqa (as LLM-Pruner reports them), "
               "acc elsewhere")
NORM_TASKS = {"hellaswag", "arc_challenge", "openbookqa"}


def _natural(path: Path) -> list:
    """Sort key: multirun job directories in job order (2-... before 10-...)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_results(root: Path) -> list[dict]:
    out = []
    for p in sorted(Path(root).rglob("results.json"), key=_natural):
        r = json.loads(p.read_text())
        if "layers" in r and "eval" in r:
            r["_path"] = str(p.parent)
            out.append(r)
    return out


def task_metric(metrics: dict, task: str) -> str:
    return "acc_norm" if task in NORM_TASKS and "acc_norm" in metrics else "acc"


def task_score(metrics: dict, task: str) -> float | None:
    v = metrics.get(task_metric(metrics, task))
    return None if v is None else float(v)


class Cell(float):
    """A score with its 95% interval and, for a compressed model, whether it differs from the dense one
    (McNemar p < 0.05 for a task, a paired interval that excludes 0 for the average)."""

    def __new__(cls, value: float, ci=None, significant: bool | None = None, p: float | None = None):
        c = super().__new__(cls, value)
        c.ci, c.significant, c.p = ci, significant, p
        return c


def _task_cell(r: dict, task: str, which: str) -> Cell | None:
    """The run's score on a task with its interval (dense: `a`, pruned: `b` of the dense-vs-pruned test)."""
    metrics = r["eval"].get(task, {}).get(which, {})
    v = task_score(metrics, task)
    if v is None:
        return None
    sig = ((r.get("significance") or {}).get("tasks") or {}).get(task, {}).get(task_metric(metrics, task))
    if not sig:
        return Cell(v)
    side = "a" if which == "dense" else "b"
    return Cell(v, sig[f"{side}_ci"], sig["significant"] if which == "pruned" else None, sig["p"])


def _avg_cell(r: dict, scores: list, which: str) -> Cell | None:
    """Unweighted mean over tasks; its stratified interval when every task's metric is acc (the record's
    significance averages are per metric, so mixed acc / acc_norm rows get the mean without an interval)."""
    mean = _avg(scores)
    if mean is None:
        return None
    metrics = {task_metric(r["eval"][t]["dense"], t) for t in r["eval"]}
    sig = (r.get("significance") or {}).get("average", {}).get(next(iter(metrics))) if len(metrics) == 1 else None
    if not sig:
        return Cell(mean)
    side = "a" if which == "dense" else "b"
    return Cell(mean, sig[f"{side}_ci"], sig["significant"] if which == "pruned" else None)


def label(r: dict) -> str:
    """method:replacement, plus the options that differ from the defaults."""
    rep = r["replacement"]["type"]
    if r["method"] != "streamline":  # baselines have no replacement; say how they were configured
        base = r.get("baseline") or {}
        name = base.get("label", r["method"])   # e.g. llm_pruner_style(kv-group): what the row is
        if "merge" in base:
            name += f" C={base['merge']}"
        if base.get("fallbacks"):  # collapses the paper's rule rejected, forced to reach n: not LaCo's output
            name += f" ({base['fallbacks']} of {len(base.get('merges', []))} collapses forced)"
        if r.get("train"):
            name += " +LoRA"
        return name
    name = f"{r['method']}:{rep}"
    if (r.get("train_config") or {}).get("loss") == "lora":  # the paper's comparison: LoRA on plain pruning
        return f"{name} +LoRA"
    if rep == "ffn" and not r["replacement"].get("residual", True):
        name += "(no residual)"
    rp = r["replacement"]
    if rep == "linear":  # ReplaceMe: which objective fitted the map
        name += f"({rp.get('objective', 'lstsq')})"
    if rp.get("init", "none") != "none":
        name += f" init={rp['init']}"
    training_free = rep == "linear" or (rep == "linear_patch" and not rp.get("finetune"))
    tc = r.get("train_config") or {}
    if rep != "none" and not training_free:
        if tc.get("loss", "mse") != "mse":
            name += f" loss={tc['loss']}"
        if tc.get("loss", "mse") == "mse" and tc.get("first_token", "exclude") != "exclude":  # default: exclude
            name += f" first_token={tc['first_token']}"
        if tc.get("loss", "mse") == "mse" and tc.get("lr", 5e-4) != 5e-4:  # runs that differ only in lr
            name += f" lr={tc['lr']:g}"
    return name


def _suite(r: dict) -> str:
    """The evaluation suite a run was scored on (its eval preset; older records: its task list)."""
    return (r.get("eval_meta") or {}).get("suite") or ",".join(sorted(r["eval"]))


def _where(lay: dict) -> str:
    if lay.get("removed_indices") == []:
        return "width"
    if lay.get("contiguous", True):
        return f"[{lay['removed'][0]},{lay['removed'][1]})"
    return ",".join(str(i) for i in lay["removed_indices"]) or "width"


def _run_config(r: dict) -> dict | None:
    """The run's composed Hydra config (`.hydra/config.yaml` beside its results.json), when it was kept."""
    import yaml

    f = Path(r.get("_path", "")) / ".hydra" / "config.yaml"
    return yaml.safe_load(f.read_text()) if f.is_file() else None


# Keys of a run's config that do not make it a different experiment: repeated runs differ only in these.
NOT_THE_EXPERIMENT = ("seed", "wandb", "checkpoint", "save")


def _identity(r: dict) -> tuple[str, int | None]:
    """(what groups repeated runs, the run's seed). Runs are grouped only when their recorded configs are equal
    except for the seed: a run without its config stands alone (its path is its group)."""
    cfg = _run_config(r)
    if cfg is None:
        return f"path:{r.get('_path')}", r.get("seed")
    same = {k: v for k, v in cfg.items() if k not in NOT_THE_EXPERIMENT}
    return json.dumps(same, sort_keys=True, default=str), cfg.get("seed")


def _run_record(r: dict, tasks: list[str], root: Path | None) -> dict:
    """One run as a flat record of the table's columns (cells keep their intervals)."""
    scores = {t: _task_cell(r, t, "pruned") for t in tasks}
    stab = (r.get("stability") or {}).get("average", {})
    group, seed = _identity(r)
    path = Path(r.get("_path", "."))
    return {"_group": group, "_model": r["model"]["name"], "_suite": _suite(r), "run": label(r), "seed": seed,
            "layers removed": _where(r["layers"]), "params": r["params"]["pruned"],
            "sparsity": r["params"]["sparsity"], **scores,
            "avg": _avg_cell(r, list(scores.values()), "pruned"), "stability": stab.get("stability"),
            "agreement": stab.get("agreement"), "ppl": ((r.get("perplexity") or {}).get("pruned") or {}).get("ppl"),
            **dict(zip(("trainable", "compress s", "compress MiB"), compress_cost(r))),
            "train tokens": (r.get("train") or {}).get("tokens"),
            "wall s": round(sum(r.get("timings", {}).values()), 1),
            "path": str(path.relative_to(root)) if root and path.is_relative_to(root) else str(path)}


def _dense_record(r: dict, tasks: list[str]) -> dict:
    scores = {t: _task_cell(r, t, "dense") for t in tasks}
    return {"_model": r["model"]["name"], "_suite": _suite(r), "params": r["params"]["dense"], "sparsity": 0.0,
            **scores, "avg": _avg_cell(r, list(scores.values()), "dense"), "stability": 1.0, "agreement": 1.0,
            "ppl": ((r.get("perplexity") or {}).get("dense") or {}).get("ppl")}


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
    if all(v == present[0] for v in present):
        return present[0]
    if all(isinstance(v, (int, float)) for v in present):
        return Spread([float(v) for v in present])
    return " ".join(dict.fromkeys(str(v) for v in present))


def rows_of(results: list[dict], root: Path | None = None) -> tuple[list[str], list[list]]:
    """Table rows: per (model, suite), its dense model (from every run scored on it, not the first one found),
    then one row per experiment — repeated runs that differ only in the seed are one row (mean ± std)."""
    import pandas as pd

    tasks = sorted({t for r in results for t in r["eval"]})
    header = ["run", "seeds", "layers removed", "params", "sparsity", *tasks, "avg", "stability", "agreement",
              "ppl", "trainable", "train tokens", "compress s", "compress MiB", "wall s", "path"]
    # dtype object: a cell keeps its interval (pandas would turn a float subclass into a plain float)
    runs = pd.DataFrame([_run_record(r, tasks, root) for r in results], dtype=object)
    dense = pd.DataFrame([_dense_record(r, tasks) for r in results], dtype=object)
    several = runs[["_model", "_suite"]].drop_duplicates().shape[0] > 1
    rows = []
    for (model, suite), block in runs.groupby(["_model", "_suite"], sort=False):
        d = dense[(dense["_model"] == model) & (dense["_suite"] == suite)]
        name = f"dense ({model}, {suite})" if several else "dense"
        rows.append([name, "-", "-"] + [_combine(list(d[c])) for c in header[3:header.index("trainable")]]
                    + [None] * 5 + ["-"])
        for _, g in block.groupby("_group", sort=False):
            seeds = [s for s in g["seed"] if s is not None and s == s]
            row = [None if c == "seeds" else _combine(list(g[c])) if len(g) > 1 else g[c].iloc[0] for c in header]
            row[1] = ",".join(str(int(s)) for s in seeds) if seeds else "-"
            rows.append([None if (isinstance(v, float) and v != v) else v for v in row])  # pandas' NaN = none
    return header, rows


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


def _avg(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


NOT_SIGNIFICANT = "≈"  # marks a compressed model's score that does not differ significantly from dense


def _count(n: int) -> str:
    """A parameter count readable at every size: 950, 16.5k, 134.5M, 6.7B."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _fmt(v) -> str:
    if v is None:
        return "-"
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


def write_tables(header, rows, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    md.append("")
    md.append(f"Accuracy: {METRIC_NOTE}; ± is half the 95% bootstrap interval over items; {NOT_SIGNIFICANT} marks "
              "a compressed model's score that does not differ significantly from the dense model's on the same "
              "items (task: exact McNemar p >= 0.05; avg: the paired stratified bootstrap interval of the "
              "difference contains 0). A row over several seeds shows mean±standard deviation across its runs "
              "instead (no interval). Stability: paper formula (weights by the spread of the dense model's mean "
              "NLL over prompt + option); agreement: unweighted. ppl: perplexity on a text no stage trains or "
              "selects on (results.json `perplexity.text`).")
    (out / "table.md").write_text("\n".join(md) + "\n")
    _frame(header, rows).to_csv(out / "table.csv", index=False)
    tex = ["\\begin{tabular}{" + "l" * 2 + "r" * (len(header) - 2) + "}", "\\toprule",
           " & ".join(_tex(h) for h in header) + " \\\\", "\\midrule"]
    tex += [" & ".join(_tex(_fmt(v)) for v in row) + " \\\\" for row in rows]
    tex += ["\\bottomrule", "\\end{tabular}"]
    (out / "table.tex").write_text("\n".join(tex) + "\n")


def _frame(header: list[str], rows: list[list]):
    """The table as numbers for a CSV reader: a mean's spread in its own `<column> std` column."""
    import pandas as pd

    frame = pd.DataFrame([[float(v) if isinstance(v, float) else v for v in row] for row in rows], columns=header)
    for j, col in enumerate(header):
        stds = [row[j].std if isinstance(row[j], Spread) else None for row in rows]
        if any(x is not None for x in stds):
            frame.insert(frame.columns.get_loc(col) + 1, f"{col} std", stds)
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


def plot_train_tokens(results: list[dict], out: Path) -> Path | None:
    """`quality_vs_train_tokens.png`: held-out perplexity and the average acc over all tasks with its stratified
    bootstrap 95% interval (`significance.average.acc`: one metric, so the interval exists; the table's mixed
    acc/acc_norm average has none) against the training tokens the replacement saw (`train.tokens`: blocks x
    seq_len x epochs); one line per method, block and suite, each suite's dense model dashed. Drawn only when
    some line has two or more token counts (a data-size sweep)."""
    series: dict[str, list[tuple]] = {}
    dense: dict[str, tuple] = {}
    for r in results:
        tokens = (r.get("train") or {}).get("tokens")
        avg = ((r.get("significance") or {}).get("average") or {}).get("acc")
        if not tokens or not avg:
            continue
        suite = f"({r['model']['name']}, {_suite(r)})"
        ppl = r.get("perplexity") or {}
        dense[suite] = (((ppl.get("dense") or {}).get("ppl")), avg["a"])
        name = f"{label(r)} {_where(r['layers'])} {suite}"
        series.setdefault(name, []).append((tokens, (ppl.get("pruned") or {}).get("ppl"), Cell(avg["b"], avg["b_ci"])))
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
    for r in results:
        if r.get("similarity_profile"):
            by_model.setdefault(r["model"]["name"], []).append(r)
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
    if c is None:
        return "-"
    return f"{c:.3f}" + (f" [{c.ci[0]:.3f}, {c.ci[1]:.3f}]" if c.ci is not None else "")


def summary(r: dict) -> str:
    """A run's results as a short console table: the block removed, parameters, perplexity and per-task accuracy
    dense → pruned (95% intervals; ≈ = not significantly different from dense), stability, wall time."""
    lay, params = r["layers"], r["params"]
    ppl = r.get("perplexity") or {}
    lines = [f"{r['model']['name']} · {label(r)} · layers removed {_where(lay)} of {lay.get('n_original', '?')}",
             f"{'params':<25} {_count(params['dense'])} → {_count(params['pruned'])} "
             f"({params['sparsity']:.1%} fewer)"]
    if ppl.get("dense") and ppl.get("pruned"):
        lines.append(f"{'perplexity':<25} {ppl['dense']['ppl']:.1f} → {ppl['pruned']['ppl']:.1f}")
    dense_scores, pruned_scores = [], []
    for task in sorted(r["eval"]):
        d, p = _task_cell(r, task, "dense"), _task_cell(r, task, "pruned")
        dense_scores.append(d)
        pruned_scores.append(p)
        metric = task_metric(r["eval"][task].get("dense", {}), task)
        mark = f" {NOT_SIGNIFICANT}" if p is not None and p.significant is False else ""
        lines.append(f"{f'{task} ({metric})':<25} {_interval(d)} → {_interval(p)}{mark}")
    avg_d, avg_p = _avg_cell(r, dense_scores, "dense"), _avg_cell(r, pruned_scores, "pruned")
    if avg_d is not None and avg_p is not None:
        mark = f" {NOT_SIGNIFICANT}" if avg_p.significant is False else ""
        # the mean of the metrics listed above (acc or acc_norm per task), not of one metric
        lines.append(f"{'average of the above':<25} {_interval(avg_d)} → {_interval(avg_p)}{mark}")
    stab = (r.get("stability") or {}).get("average") or {}
    if stab.get("stability") is not None:
        lines.append(f"{'stability':<25} {stab['stability']:.3f} (agreement {stab.get('agreement', float('nan')):.3f})")
    lines.append(f"{'wall time':<25} {sum((r.get('timings') or {}).values()):.1f} s")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ two runs, paired

def _samples_of(spec: str) -> tuple[str, list[dict]]:
    """A run directory's compressed-model rows, or its dense model's with the suffix `:dense`."""
    from llm_streamline.evaluate.harness import load_samples_jsonl

    path, _, which = spec.partition(":")
    which = which or "pruned"
    if which not in ("pruned", "dense"):
        raise SystemExit(f"llm-streamline-report: error: {spec}: the suffix must be :dense or :pruned")
    f = Path(path) / f"samples_{which}.jsonl"
    if not f.exists():
        raise SystemExit(f"llm-streamline-report: error: {f} does not exist (a run directory holds samples_*.jsonl)")
    name = "dense" if which == "dense" else Path(path).name
    res = Path(path) / "results.json"
    if which == "pruned" and res.exists():
        name = f"{label(json.loads(res.read_text()))} ({Path(path).name})"
    return name, load_samples_jsonl(f)


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
        lines.append(f"| average ({len(e['tasks'])} tasks) | {metric} | | {e['a']:.3f} {ci(e['a_ci'])} "
                     f"| {e['b']:.3f} {ci(e['b_ci'])} | {e['diff']:+.3f} {dci(e['diff_ci'])} | | | | {mark} |")
    unpaired = sum(e["unpaired"] for per in cmp["tasks"].values() for e in per.values())
    lines += ["", "Paired on the items both runs scored" + (f" ({unpaired} item-metrics scored by one run only were "
              "left out)" if unpaired else "") + "; intervals: bootstrap over items (averages: stratified by task); "
              "a task difference is significant when the exact McNemar p < 0.05, an average when its interval "
              "excludes 0."]
    return "\n".join(lines) + "\n"


def compare_runs(spec_a: str, spec_b: str, out: Path | None = None) -> dict:
    from llm_streamline.evaluate.significance import compare_rows

    (name_a, rows_a), (name_b, rows_b) = _samples_of(spec_a), _samples_of(spec_b)
    cmp = compare_rows(rows_a, rows_b)
    text = compare_table(name_a, name_b, cmp)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(text)
        (out / "compare.json").write_text(json.dumps({"a": name_a, "b": name_b, **cmp}, indent=1))
    print(text)
    return cmp


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="llm-streamline-report", description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="?", help="a directory searched recursively for results.json")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                    help="paired comparison of two run directories on the items both scored (RUN:dense = that "
                         "run's dense model)")
    args = ap.parse_args(argv)
    if args.compare:
        compare_runs(*args.compare, out=args.out)
        return
    if args.runs is None or args.out is None:
        ap.error("give a runs directory and --out, or --compare RUN_A RUN_B")
    results = find_results(args.runs)
    if not results:
        raise SystemExit(f"llm-streamline-report: error: no results.json under {args.runs}")
    header, rows = rows_of(results, root=args.runs)
    write_tables(header, rows, args.out)
    plot(results, args.out)
    plot_train_tokens(results, args.out)
    plot_similarity(results, args.out)
    print((args.out / "table.md").read_text())


if __name__ == "__main__":
    main()
