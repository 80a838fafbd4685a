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
