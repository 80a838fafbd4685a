"""`llm-streamline-report <runs dir> --out <dir>`: runs' results.json -> paper-style tables and plots.

Reads records only (never reruns a stage). Writes `table.md`, `table.csv`, `table.tex` (one row per run
plus the dense reference: accuracy per task, average, stability, perplexity, parameters, the cost of
compressing: trainable parameters, seconds and peak memory of the search/training stages, total wall time),
`accuracy_vs_sparsity.png` (average accuracy, stability and perplexity against achieved sparsity, one
line per method/replacement) and `similarity_<model>.png` (the layer-similarity heat map of each model,
with every block the runs removed marked).
"""

from __future__ import annotations

import argparse
import csv
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


def task_score(metrics: dict, task: str) -> float | None:
    key = "acc_norm" if task in NORM_TASKS and "acc_norm" in metrics else "acc"
    v = metrics.get(key)
    return None if v is None else float(v)


def label(r: dict) -> str:
    """method:replacement, plus the options that differ from the defaults."""
    rep = r["replacement"]["type"]
    if r["method"] != "streamline":  # baselines have no replacement; say how they were configured
        base = r.get("baseline") or {}
        name = base.get("label", r["method"])   # e.g. llm_pruner_style(kv-group): what the row is
        if "merge" in base:
            name += f" C={base['merge']}"
        if r.get("train"):
            name += " +LoRA"
        return name
    name = f"{r['method']}:{rep}"
    if (r.get("train_config") or {}).get("loss") == "lora":  # the paper's comparison: LoRA on plain pruning
        return f"{name} +LoRA"
    if rep == "ffn" and not r["replacement"].get("residual", True):
        name += "(no residual)"
    tc = r.get("train_config") or {}
    if rep != "none":
        if tc.get("loss", "mse") != "mse":
            name += f" loss={tc['loss']}"
        if tc.get("loss", "mse") == "mse" and tc.get("first_token", "exclude") != "exclude":  # default: exclude
            name += f" first_token={tc['first_token']}"
    return name


def rows_of(results: list[dict]) -> tuple[list[str], list[list]]:
    tasks = sorted({t for r in results for t in r["eval"]})
    header = ["run", "layers removed", "params", "sparsity"] + tasks + ["avg", "stability", "agreement",
                                                                         "ppl", "trainable", "compress s",
                                                                         "compress MiB", "wall s"]
    rows = []
    if results:  # the dense reference, from the first run that has it
        r0 = results[0]
        dense = [task_score(r0["eval"][t]["dense"], t) for t in tasks]
        ppl = (r0.get("perplexity") or {}).get("dense") or {}
        rows.append(["dense", "-", r0["params"]["dense"], 0.0] + dense
                    + [_avg(dense), 1.0, 1.0, ppl.get("ppl"), None, None, None, None])
    for r in results:
        scores = [task_score(r["eval"].get(t, {}).get("pruned", {}), t) for t in tasks]
        stab = (r.get("stability") or {}).get("average", {})
        ppl = (r.get("perplexity") or {}).get("pruned") or {}
        lay = r["layers"]
        if lay.get("removed_indices") == []:
            where = "width"
        elif lay.get("contiguous", True):
            where = f"[{lay['removed'][0]},{lay['removed'][1]})"
        else:
            where = ",".join(str(i) for i in lay["removed_indices"]) or "width"
        rows.append([label(r), where, r["params"]["pruned"],
                     r["params"]["sparsity"]] + scores
                    + [_avg(scores), stab.get("stability"), stab.get("agreement"), ppl.get("ppl"),
                       *compress_cost(r), round(sum(r.get("timings", {}).values()), 1)])
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


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    if isinstance(v, int) and v > 10_000:
        return f"{v / 1e6:.1f}M"
    return str(v)


def write_tables(header, rows, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    md.append("")
    md.append(f"Accuracy: {METRIC_NOTE}. Stability: paper formula (weights by the dense model's per-option "
              f"perplexity spread); agreement: unweighted.")
    (out / "table.md").write_text("\n".join(md) + "\n")
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    tex = ["\\begin{tabular}{" + "l" * 2 + "r" * (len(header) - 2) + "}", "\\toprule",
           " & ".join(h.replace("_", "\\_") for h in header) + " \\\\", "\\midrule"]
    tex += [" & ".join(_fmt(v).replace("_", "\\_") for v in row) + " \\\\" for row in rows]
    tex += ["\\bottomrule", "\\end{tabular}"]
    (out / "table.tex").write_text("\n".join(tex) + "\n")


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    header, rows = rows_of(results)
    i_avg, i_stab, i_sp = header.index("avg"), header.index("stability"), header.index("sparsity")
    series: dict[str, list[tuple]] = {}
    for row in rows[1:]:
        series.setdefault(row[0], []).append((row[i_sp], row[i_avg], row[i_stab], row[header.index("ppl")]))
    i_ppl = header.index("ppl")
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.5))
    # ten distinct colours first, then the lighter tab20 shades for more series
    colors = plt.get_cmap("tab10").colors + plt.get_cmap("tab20").colors[1::2]
    for k, (name, pts) in enumerate(sorted(series.items())):
        pts.sort()
        style = dict(color=colors[k % len(colors)], marker="os^Dv"[k % 5], label=name)
        for ax, j in zip(axes, (1, 2, 3)):
            xy = [(p[0], p[j]) for p in pts if p[j] is not None]
            ax.plot([x for x, _ in xy], [y for _, y in xy], "-", **style)
    if rows:
        axes[0].axhline(rows[0][i_avg], color="k", ls="--", lw=1, label="dense")
        if rows[0][i_ppl]:
            axes[2].axhline(rows[0][i_ppl], color="k", ls="--", lw=1, label="dense")
    for ax, name in zip(axes, ("average accuracy", "stability", "perplexity (log scale)")):
        ax.set_xlabel("sparsity (fraction of all parameters removed)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[2].set_yscale("log")
    axes[2].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_sparsity.png", dpi=110)
    plt.close(fig)


def plot_similarity(results: list[dict], out: Path) -> list[Path]:
    """One heat map per model (its calibration profile), with every contiguous block a run removed."""
    from llm_streamline.importance import SimilarityProfile, plot_profile

    by_model: dict[str, list[dict]] = {}
    for r in results:
        if r.get("similarity_profile"):
            by_model.setdefault(r["model"]["name"], []).append(r)
    paths = []
    for name, runs in sorted(by_model.items()):
        prof = runs[0]["similarity_profile"]
        profile = SimilarityProfile(num_layers=prof["num_layers"], tokens=prof["tokens"],
                                    mean_cos={int(k): v for k, v in prof["cosine"].items()},
                                    mean_angular={int(k): v for k, v in prof["angular"].items()})
        blocks = sorted({(r["layers"]["removed"][0], r["layers"]["n_removed"]) for r in runs
                         if r["layers"].get("contiguous") and r["layers"].get("n_removed")})
        path = out / f"similarity_{name}.png"
        plot_profile(profile, path, chosen=blocks,
                     title=f"{name}: layer similarity on {profile.tokens} calibration tokens; x = blocks removed")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="llm-streamline-report", description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, help="a directory searched recursively for results.json")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    results = find_results(args.runs)
    if not results:
        raise SystemExit(f"llm-streamline-report: error: no results.json under {args.runs}")
    header, rows = rows_of(results)
    write_tables(header, rows, args.out)
    plot(results, args.out)
    plot_similarity(results, args.out)
    print((args.out / "table.md").read_text())


if __name__ == "__main__":
    main()
