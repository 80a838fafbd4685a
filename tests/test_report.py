"""The report command on the committed SmolLM2 CPU runs: one table row per run plus the dense reference."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_streamline import report

RUNS = Path(__file__).resolve().parents[1] / "experiments" / "smollm2-cpu" / "runs"


def test_report_tables_and_plot_from_committed_runs(tmp_path):
    report.main([str(RUNS), "--out", str(tmp_path)])
    md = (tmp_path / "table.md").read_text().splitlines()
    runs = list(RUNS.glob("*/results.json"))
    rows = [line for line in md if line.startswith("| ") and not line.startswith("| run")]
    assert len(rows) == len(runs) + 1 and rows[0].startswith("| dense")
    assert any("sleb" in r for r in rows) and any("streamline:swiglu" in r for r in rows)
    assert (tmp_path / "table.csv").exists() and (tmp_path / "table.tex").exists()
    assert (tmp_path / "accuracy_vs_sparsity.png").stat().st_size > 10_000
    assert (tmp_path / "similarity_smollm2-135m.png").stat().st_size > 10_000
    header = md[0].split(" | ")
    assert {"trainable", "compress s", "compress MiB"} <= set(header)


def test_compress_cost_counts_training_and_its_peak_memory():
    r = {"train": {"trainable_params": 1234}, "timings": {"teacher_pairs": 10.0, "train": 5.5, "eval_pruned": 99},
         "peak_memory": {"stage_rss_mib": {"teacher_pairs": 900.0, "train": 1100.0, "eval_pruned": 3000.0}}}
    assert report.compress_cost(r) == (1234, 15.5, 1100.0)
    assert report.compress_cost({"timings": {"eval_pruned": 3.0}}) == (None, None, None)


def _run_dir(path: Path, name: str, correct: list[int], dense: list[int]) -> Path:
    from llm_streamline.evaluate.harness import save_samples_jsonl

    d = path / name
    d.mkdir(parents=True)

    def rows(c):
        return [{"task": "piqa", "doc_id": i, "correct": bool(x), "correct_norm": bool(x)} for i, x in enumerate(c)]

    save_samples_jsonl(rows(correct), d / "samples_pruned.jsonl")
    save_samples_jsonl(rows(dense), d / "samples_dense.jsonl")
    return d


def test_compare_two_runs_prints_paired_intervals_and_p_values(tmp_path, capsys):
    dense = [1] * 120 + [0] * 80
    a = _run_dir(tmp_path, "a", [1] * 100 + [0] * 100, dense)
    b = _run_dir(tmp_path, "b", [1] * 104 + [0] * 96, dense)  # 4 more items right: not significant
    cmp = report.main(["--compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) or report.compare_runs(
        str(a), str(b))
    text = capsys.readouterr().out
    assert "| piqa | acc | 200 | 0.500" in text and "| 0.520" in text and "not significant" in text
    e = cmp["tasks"]["piqa"]["acc"]
    assert (e["a_only"], e["b_only"], e["p"]) == (0, 4, 2 / 16)
    assert (tmp_path / "cmp" / "compare.md").exists()
    vs_dense = report.compare_runs(f"{a}:dense", str(a))["tasks"]["piqa"]["acc"]
    assert vs_dense["significant"] and vs_dense["a_only"] == 20


def test_table_cells_carry_intervals_and_mark_what_is_not_significant():
    sig = {"tasks": {"piqa": {"acc_norm": {"a_ci": (0.6, 0.7), "b_ci": (0.55, 0.65), "significant": False,
                                           "p": 0.3}}},
           "average": {"acc_norm": {"a_ci": (0.6, 0.7), "b_ci": (0.55, 0.65), "significant": False}}}
    r = {"eval": {"piqa": {"dense": {"acc": 0.7, "acc_norm": 0.65}, "pruned": {"acc": 0.6, "acc_norm": 0.6}}},
         "significance": sig}
    cell = report._task_cell(r, "piqa", "pruned")  # piqa reports acc: no interval recorded for acc here
    assert cell == 0.6 and cell.ci is None
    r["significance"]["tasks"]["piqa"]["acc"] = {"a_ci": (0.65, 0.75), "b_ci": (0.55, 0.65), "significant": False,
                                                 "p": 0.3}
    assert report._fmt(report._task_cell(r, "piqa", "pruned")) == "0.600±0.050 ≈"
    assert report._fmt(report._task_cell(r, "piqa", "dense")) == "0.700±0.050"
    assert report._tex("a_b & 50% ±") == r"a\_b \& 50\% $\pm$"


# --------------------------------------------------------------- hand-made records: grouping, dense rows, LaTeX

def _record(root: Path, name: str, *, model="tiny-llama", suite="smoke", seed=None, replacement="ffn",
            pruned=0.5, dense=0.7, params=16_500, label=None, train_tokens=None, ppl=20.0) -> Path:
    """A minimal results.json (and, when `seed` is given, the Hydra config a run keeps beside it)."""
    import json

    import yaml

    d = root / name
    d.mkdir(parents=True)
    r = {"model": {"name": model}, "method": "streamline" if label is None else "shortgpt",
         "replacement": {"type": replacement}, "baseline": {"label": label} if label else None,
         "layers": {"removed": [2, 4], "removed_indices": [2, 3], "contiguous": True, "n_removed": 2},
         "params": {"dense": 2 * params, "pruned": params, "sparsity": 0.5},
         "eval": {"piqa": {"dense": {"acc": dense}, "pruned": {"acc": pruned}}},
         "eval_meta": {"suite": suite}, "perplexity": {"dense": {"ppl": 10.0}, "pruned": {"ppl": ppl}},
         "stability": {"average": {"stability": 0.9, "agreement": 0.8}}, "timings": {"train": 1.0}}
    if train_tokens is not None:
        r["train"] = {"tokens": train_tokens, "trainable_params": 100}
        r["significance"] = {"average": {"acc": {"a": dense, "b": pruned, "a_ci": [dense - 0.05, dense + 0.05],
                                                 "b_ci": [pruned - 0.05, pruned + 0.05], "significant": True}}}
    (d / "results.json").write_text(json.dumps(r))
    if seed is not None:
        (d / ".hydra").mkdir()
        cfg = {"seed": seed, "model": {"name": model}, "replacement": {"type": replacement}, "eval": {"name": suite}}
        (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    return d


def _table(tmp_path: Path) -> tuple[list[str], list[dict]]:
    report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    lines = (tmp_path / "out" / "table.md").read_text().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]
            if line.startswith("| ")]
    return header, rows


def test_repeated_seeds_are_one_row_with_mean_and_std_and_their_paths(tmp_path):
    runs = tmp_path / "runs"
    for seed, acc in enumerate((0.50, 0.60, 0.70)):
        _record(runs, f"ffn-seed{seed}", seed=seed, pruned=acc)
    _record(runs, "layer-seed0", seed=0, replacement="layer", pruned=0.4)  # another experiment: its own row
    _record(runs, "ffn-no-config", pruned=0.55)  # no recorded config: never grouped
    header, rows = _table(tmp_path)
    assert "path" in header and "seeds" in header
    (grouped,) = [r for r in rows if r["seeds"] == "0,1,2"]
    assert grouped["piqa"] == "0.600±0.100" and grouped["params"] == "16.5k"  # not "0.0M"
    assert grouped["path"] == "ffn-seed0 ffn-seed1 ffn-seed2"
    assert [r["path"] for r in rows if r["run"].startswith("streamline")] == [
        "ffn-no-config", "ffn-seed0 ffn-seed1 ffn-seed2", "layer-seed0"]
    assert len(rows) == 1 + 3
    csv = (tmp_path / "out" / "table.csv").read_text().splitlines()
    assert "piqa std" in csv[0].split(",")


def test_a_dense_row_per_model_and_suite_from_its_own_runs(tmp_path):
    runs = tmp_path / "runs"
    _record(runs, "a", model="tiny-llama", suite="smoke", dense=0.70, params=16_500)
    _record(runs, "b", model="tiny-opt", suite="smoke", dense=0.30, params=950)
    _record(runs, "c", model="tiny-opt", suite="cpu", dense=0.40, params=134_515_008)
    _, rows = _table(tmp_path)
    dense = {r["run"]: r for r in rows if r["run"].startswith("dense")}
    assert dense["dense (tiny-llama, smoke)"]["piqa"] == "0.7000"
    assert dense["dense (tiny-opt, smoke)"]["piqa"] == "0.3000" and dense["dense (tiny-opt, smoke)"]["params"] == "1.9k"
    assert dense["dense (tiny-opt, cpu)"]["piqa"] == "0.4000" and dense["dense (tiny-opt, cpu)"]["params"] == "269.0M"
    order = [r["run"].split(" (")[0] + ":" + r["path"] for r in rows]
    assert order == ["dense:-", "streamline:ffn:a", "dense:-", "streamline:ffn:b", "dense:-", "streamline:ffn:c"]


def test_latex_escapes_every_special_character(tmp_path):
    nasty = r"x_1 & 50% $5 #2 {a} ~b ^c \d <e> |f|"
    _record(tmp_path / "runs", "nasty", label=nasty)
    _table(tmp_path)
    tex = (tmp_path / "out" / "table.tex").read_text()
    line = next(line for line in tex.splitlines() if line.startswith("x"))
    assert line.startswith(r"x\_1 \& 50\% \$5 \#2 \{a\} \textasciitilde{}b \textasciicircum{}c \textbackslash{}d "
                           r"\textless{}e\textgreater{} \textbar{}f\textbar{} & ")
    assert report._count(16_500) == "16.5k" and report._count(950) == "950" and report._count(6.7e9) == "6.7B"


def test_summary_of_a_run_is_a_short_table_dense_to_pruned():
    sig = {"tasks": {"piqa": {"acc_norm": {"a_ci": (0.62, 0.74), "b_ci": (0.58, 0.70), "significant": False,
                                           "p": 0.4},
                              "acc": {"a_ci": (0.60, 0.72), "b_ci": (0.40, 0.52), "significant": True, "p": 0.001}},
                     "boolq": {"acc": {"a_ci": (0.55, 0.65), "b_ci": (0.30, 0.40), "significant": True,
                                       "p": 0.001}}},
           "average": {"acc": {"a_ci": (0.60, 0.66), "b_ci": (0.38, 0.44), "significant": True}}}
    r = {"model": {"name": "smollm2-135m"}, "method": "streamline", "replacement": {"type": "ffn"},
         "layers": {"removed": [11, 19], "removed_indices": list(range(11, 19)), "contiguous": True,
                    "n_removed": 8, "n_original": 30},
         "params": {"dense": 134_515_008, "pruned": 108_000_000, "sparsity": 0.197},
         "perplexity": {"dense": {"ppl": 61.13}, "pruned": {"ppl": 151.6}},
         "eval": {"piqa": {"dense": {"acc": 0.66, "acc_norm": 0.68}, "pruned": {"acc": 0.46, "acc_norm": 0.64}},
                  "boolq": {"dense": {"acc": 0.6}, "pruned": {"acc": 0.35}}},
         "significance": sig, "stability": {"average": {"stability": 0.714, "agreement": 0.74}},
         "timings": {"load_model": 4.0, "train": 81.5, "eval_pruned": 100.0}}
    text = report.summary(r)
    lines = text.splitlines()
    assert lines[0] == "smollm2-135m · streamline:ffn · layers removed [11,19) of 30"
    assert lines[1].split() == ["params", "134.5M", "→", "108.0M", "(19.7%", "fewer)"]
    assert lines[2].split() == ["perplexity", "61.1", "→", "151.6"]
    assert lines[3].split() == ["boolq", "(acc)", "0.600", "[0.550,", "0.650]", "→", "0.350", "[0.300,", "0.400]"]
    assert lines[4].split()[:2] == ["piqa", "(acc)"] and lines[4].endswith("0.460 [0.400, 0.520]")
    assert lines[5].split() == ["average", "of", "the", "above", "0.630", "[0.600,", "0.660]", "→", "0.405",
                                "[0.380,", "0.440]"]
    assert lines[6].split() == ["stability", "0.714", "(agreement", "0.740)"]
    assert lines[7].split() == ["wall", "time", "185.5", "s"] and len(lines) == 8
    r["significance"]["tasks"]["boolq"]["acc"]["significant"] = False
    assert report.summary(r).splitlines()[3].endswith("≈")


def test_a_laco_row_says_how_many_collapses_its_rule_rejected_and_were_forced():
    base = {"method": "laco", "replacement": {"type": "none"}, "train": None}
    paper = {**base, "baseline": {"label": "laco", "merge": 4, "fallbacks": 0, "merges": [{}, {}]}}
    forced = {**base, "baseline": {"label": "laco", "merge": 4, "fallbacks": 2, "merges": [{}, {}, {}]}}
    assert report.label(paper) == "laco C=4"
    assert report.label(forced) == "laco C=4 (2 of 3 collapses forced)"


def test_a_data_size_sweep_gets_a_train_tokens_column_and_its_curve(tmp_path):
    runs = tmp_path / "runs"
    for blocks, acc, ppl in ((64, 0.50, 40.0), (256, 0.55, 30.0), (1024, 0.60, 25.0)):
        _record(runs, f"layer-{blocks}", seed=0, replacement="layer", train_tokens=blocks * 256 * 4, pruned=acc,
                ppl=ppl)
        # configs differ only in data.train_samples: each size is its own row, not a mean over seeds
        cfg = runs / f"layer-{blocks}" / ".hydra" / "config.yaml"
        cfg.write_text(cfg.read_text() + f"data:\n  train_samples: {blocks}\n")
    header, rows = _table(tmp_path)
    assert [r["train tokens"] for r in rows] == ["-", "65.5k", "262.1k", "1.0M"]
    png = tmp_path / "out" / "quality_vs_train_tokens.png"
    assert png.stat().st_size > 10_000
    png.unlink()
    single = tmp_path / "single"
    _record(single / "runs", "layer", replacement="layer", train_tokens=1000)
    _table(single)
    assert not (single / "out" / "quality_vs_train_tokens.png").exists()  # one size: no curve to draw


def _tex_rows_balanced(tex: str) -> list[int]:
    """Structural LaTeX check (no TeX installation here): every row's cell count, braces balanced, and the
    booktabs rules in order."""
    lines = tex.splitlines()
    body = [ln for ln in lines if ln.endswith("\\\\")]
    assert [ln for ln in lines if ln.startswith("\\") and "rule" in ln][0] == "\\toprule"
    assert lines[-2] == "\\bottomrule" and lines[-1] == "\\end{tabular}" and "booktabs" in lines[0]
    for ln in lines:
        unescaped = ln.replace("\\{", "").replace("\\}", "")
        assert unescaped.count("{") == unescaped.count("}"), ln
    return [ln.replace("\\&", "").count("&") + 1 for ln in body]


def test_report_columns_labels_latex_csv_and_seconds(tmp_path):
    runs = tmp_path / "runs"
    _record(runs, "a", pruned=0.5)
    _record(runs, "b", replacement="layer", pruned=0.6)
    (tmp_path / "labels.yaml").write_text("a: FFN (ours)\nstreamline:layer: Decoder layer\n")
    report.main([str(runs), "--out", str(tmp_path / "out"), "--columns", "avg,ppl,wall s",
                 "--labels", str(tmp_path / "labels.yaml")])
    lines = (tmp_path / "out" / "table.md").read_text().splitlines()
    assert lines[0] == "| run | avg | ppl | wall s |"
    assert "| FFN (ours) | 0.5000 | 20.0 | 1.0 |" in lines and "| Decoder layer | 0.6000 | 20.0 | 1.0 |" in lines
    tex = (tmp_path / "out" / "table.tex").read_text()
    assert set(_tex_rows_balanced(tex)) == {4}
    with pytest.raises(SystemExit, match="no such column"):
        report.main([str(runs), "--out", str(tmp_path / "x"), "--columns", "avg,colour"])


def test_runs_are_grouped_by_the_evaluated_task_set_and_items_and_skipped_runs_are_listed(tmp_path, capsys):
    import json

    runs = tmp_path / "runs"
    # same preset name "smoke", different items per task: two dense rows, not one averaged over both
    for name, n, dense in (("a", 50, 0.7), ("b", 100, 0.6)):
        d = _record(runs, name, dense=dense)
        r = json.loads((d / "results.json").read_text())
        r["eval_meta"]["n_samples"] = {"piqa": {"original": 1838, "effective": n}}
        (d / "results.json").write_text(json.dumps(r))
    (runs / "broken").mkdir()
    (runs / "broken" / "results.json").write_text('{"eval": ')
    header, rows = _table(tmp_path)
    dense = sorted(r["run"] for r in rows if r["run"].startswith("dense"))
    assert dense == ["dense (tiny-llama, piqa:100)", "dense (tiny-llama, piqa:50)"]
    err = capsys.readouterr().err
    assert "skipped" in err and "broken" in err and "not a complete results.json" in err
    assert "skipped" in (tmp_path / "out" / "table.md").read_text()


def test_runs_with_the_same_seed_are_not_replicates(tmp_path):
    runs = tmp_path / "runs"
    _record(runs, "x1", seed=0, pruned=0.5)
    _record(runs, "x2", seed=0, pruned=0.7)  # a rerun with the same seed: not a second sample of the seed spread
    _, rows = _table(tmp_path)
    assert sorted(r["piqa"] for r in rows if r["run"].startswith("streamline")) == ["0.5000", "0.7000"]


def test_different_configs_under_one_label_are_told_apart(tmp_path):
    import yaml

    runs = tmp_path / "runs"
    for name, blocks in (("small", 256), ("large", 1024)):
        d = _record(runs, name, seed=0)
        cfg = yaml.safe_load((d / ".hydra" / "config.yaml").read_text())
        cfg["data"] = {"train_samples": blocks}
        (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    _, rows = _table(tmp_path)
    assert sorted(r["run"] for r in rows if r["run"].startswith("streamline")) == [
        "streamline:ffn (data.train_samples=1024)", "streamline:ffn (data.train_samples=256)"]
