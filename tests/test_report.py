"""The report command on the committed SmolLM2 CPU runs: one table row per run plus the dense reference."""

from __future__ import annotations

from pathlib import Path

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
