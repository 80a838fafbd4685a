"""One run record, read the same everywhere: the summary, the report, --compare, the W&B summary, the sweep
objective, the model card and an eval job on the saved model give the same average (record.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from llm_streamline import record, report
from llm_streamline.cli import CONF_DIR, to_run_config

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def compose_run(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_run_config(compose(config_name="config", overrides=list(overrides)))


def offline_summary(run_dir: Path, key: str) -> dict:
    """An offline W&B run's summary, once wandb-core has written `key` (it may append after finish())."""
    import time

    from llm_streamline.tracking import read_offline_run

    deadline = time.monotonic() + 30
    while True:
        summary = read_offline_run(next((run_dir / "wandb").glob("offline-run-*")))["summary"]
        if key in summary or time.monotonic() > deadline:
            return summary
        time.sleep(0.5)


def _average_line(text: str) -> list[str]:
    return re.search(r"average of the above\s+(.*)", text).group(1).split()


def test_every_reader_gives_the_same_average(tmp_path, monkeypatch, caplog):
    from llm_streamline import recipes
    from llm_streamline.export import ExportConfig, export
    from llm_streamline.recipes import eval_checkpoint
    from llm_streamline.tracking import sweep_objective

    monkeypatch.setenv("WANDB_MODE", "offline")
    # arc_challenge reports acc_norm, the others acc: the average is neither metric's own average
    suite = ("experiment=smoke", "eval.tasks=[piqa,arc_easy,arc_challenge]", "eval.limit=12")
    run = tmp_path / "runs" / "run"
    caplog.set_level("INFO", logger="llm_streamline")
    results = recipes.run(compose_run(*suite, "replacement=ffn", "objective=avg_acc"), run)
    rec = record.read(run)
    avg, avg_dense = rec.average("pruned"), rec.average("dense")
    assert avg.ci is not None and avg_dense.ci is not None and avg.metric == record.PAPER
    assert rec.data["schema"] == record.SCHEMA and rec.kind == "run"
    assert float(avg) == pytest.approx(sum(rec.score(t) for t in rec.tasks) / 3, abs=1e-12)
    printed = avg.text()  # "0.xxx [0.xxx, 0.xxx]": the digits every reader must agree on

    # the summary printed at the end of the run
    line = " ".join(_average_line(caplog.text)).removesuffix(" ≈")
    assert line == f"{avg_dense.text()} → {printed}"
    # the sweep objective (what the CLI returns to Hydra)
    assert f"{sweep_objective(results, 'avg_acc'):.3f}" == f"{avg:.3f}"
    # the W&B summary, read back from the offline files
    summary = offline_summary(run, "objective/avg_acc")
    assert summary["acc/average"] == pytest.approx(float(avg), abs=1e-12)
    assert (summary["acc/average_low"], summary["acc/average_high"]) == pytest.approx(avg.ci)
    assert summary["objective/avg_acc"] == pytest.approx(float(avg), abs=1e-12)
    assert {f"acc/{t}" for t in rec.tasks} <= set(summary) and "ppl" in summary and "stability/stability" in summary
    # the report's table and CSV
    report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")])
    md = (tmp_path / "report" / "table.md").read_text().splitlines()
    header = [c.strip() for c in md[0].strip("|").split("|")]
    row = next(dict(zip(header, (c.strip() for c in r.strip("|").split("|")))) for r in md if "streamline:ffn" in r)
    assert row["avg"].startswith(f"{avg:.3f}±")
    csv = (tmp_path / "report" / "table.csv").read_text().splitlines()
    cols = csv[0].split(",")
    assert {"avg ci_low", "avg ci_high"} <= set(cols)
    # --compare of the run's dense model against it
    cmp = report.compare_runs(f"{run}:dense", str(run))
    assert f"{cmp['average'][record.PAPER]['b']:.3f}" == f"{avg:.3f}"
    assert tuple(cmp["average"][record.PAPER]["b_ci"]) == pytest.approx(avg.ci)
    # the model card of the export
    card = (export(ExportConfig(run=str(run)), command="llm-streamline-export run=...") / "README.md").read_text()
    assert f"| **average** | reported |  | {avg_dense.text()} | {printed} |" in card
    assert "pip install llm-streamline" not in card and "held-out" not in card.split("---")[1]
    meta = card.split("---")[1]
    assert "pipeline_tag: text-generation" in meta and "model-index:" in meta and "license:" in meta
    # llm-streamline-eval on the saved model: the same model on the same items gives the same average
    caplog.clear()
    ev_dir = tmp_path / "runs" / "eval"
    ev_dir.mkdir()
    eval_checkpoint.run(compose_run(*suite, "mode=eval", f"checkpoint={run / 'model'}", "eval.perplexity=true",
                                    "eval.speed=true", "eval.speed_tokens=16"), ev_dir)
    ev = record.read(ev_dir)
    assert ev.kind == "eval" and f"{ev.average():.3f}" == f"{avg:.3f}" and ev.average().ci is not None
    assert ev.perplexity() == pytest.approx(rec.perplexity("pruned"), rel=1e-5)  # recorded when asked
    assert ev.speed["model"]["prefill_tokens_per_s"] > 0
    assert _average_line(caplog.text)[0] == f"{avg:.3f}"
    assert set(offline_summary(ev_dir, "speed/model/prefill_tokens_per_s")) >= {
        "acc/average", "acc/average_low", "ppl", "speed/model/prefill_tokens_per_s"}
    # the report takes the eval job's record as a row of its own and --compare accepts its directory
    report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "report2")])
    assert any(r.startswith("| eval:run ") for r in (tmp_path / "report2" / "table.md").read_text().splitlines())
    assert report.compare_runs(str(ev_dir), str(run))["tasks"]["piqa"]["acc"]["diff"] == 0


def test_committed_records_are_read_and_migrated():
    # schema 1 with per-sample files and a mixed suite (hellaswag: acc_norm): the average's interval comes
    # from the files, and its value is the mean of the table's per-task scores
    rec = record.read(EXPERIMENTS / "smollm2-cpu-v2" / "runs" / "main-ffn")
    assert "schema" not in json.loads((rec.path / "results.json").read_text())  # migrated in memory only
    assert rec.data["schema"] == record.SCHEMA and rec.kind == "run"
    metrics = {rec.score(t).metric for t in rec.tasks}
    assert metrics == {"acc", "acc_norm"}
    avg = rec.average()
    assert avg.ci is not None and avg.ci[0] < avg < avg.ci[1]
    assert float(avg) == pytest.approx(sum(rec.score(t) for t in rec.tasks) / len(rec.tasks), abs=1e-9)
    assert all(rec.items(t) for t in rec.tasks)
    # an early record: no significance, no files: the mean without an interval, items from lm-eval's stderr
    old = record.read(next((EXPERIMENTS / "smollm2-cpu" / "runs").glob("*/results.json")))
    assert old.average() is not None and old.average().ci is None and old.items("piqa") == 50
    assert report.summary(old).splitlines()[0].startswith("smollm2-135m")
    # an eval job's record before the schema (a flat table)
    flat = record.of({"method": "eval", "model": {"name": "m"}, "eval": {"piqa": {"acc": 0.5}}})
    assert flat.kind == "eval" and flat.score("piqa") == 0.5 and flat.objective("avg_acc") == 0.5


def test_a_damaged_or_newer_record_is_one_line(tmp_path):
    (tmp_path / "results.json").write_text('{"eval": {')
    with pytest.raises(record.RecordError, match="not a complete results.json"):
        record.read(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"schema": 99, "eval": {}}))
    with pytest.raises(record.RecordError, match="newer"):
        record.read(tmp_path)
