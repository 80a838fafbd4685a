"""`llm-streamline-report` on damaged inputs: a truncated results.json is skipped with its reason (never a
traceback), a truncated samples file under --compare is one line naming it, also when it was cut at a line
boundary (it still parses: its row count against the record's items tells)."""

from __future__ import annotations

import shutil

import pytest

from llm_streamline import report


def test_a_truncated_results_json_is_skipped_with_its_reason(uninterrupted_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    for name in ("good", "cut"):
        shutil.copytree(uninterrupted_dir / "run", runs / name, ignore=shutil.ignore_patterns("model"))
    cut = runs / "cut" / "results.json"
    cut.write_bytes(cut.read_bytes()[:200])
    report.main([str(runs), "--out", str(tmp_path / "report")])
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"llm-streamline-report: skipped {runs / 'cut'}: " in err, err
    assert (tmp_path / "report" / "table.md").exists()


@pytest.mark.parametrize("cut", ["mid-line", "at a line boundary"])
def test_a_truncated_samples_file_under_compare_is_one_line(cut, uninterrupted_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted_dir / "run", run, ignore=shutil.ignore_patterns("model"))
    samples = run / "samples_pruned.jsonl"
    lines = samples.read_text().splitlines(keepends=True)
    samples.write_text("".join(lines[:-1]) + (lines[-1][:20] if cut == "mid-line" else ""))
    with pytest.raises(SystemExit) as e:
        report.main(["--compare", f"{run}:dense", str(run)])
    msg = str(e.value)
    assert msg.startswith(f"llm-streamline-report: error: {samples} ") and "\n" not in msg, msg
    assert ("unreadable" if cut == "mid-line" else "rows of") in msg, msg


def test_report_errors_exit_2_with_one_line(tmp_path):
    """As every other command's bad input: exit 2, one line (a SystemExit carrying text exits 1)."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "llm_streamline.report", str(tmp_path), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res
    want = f"llm-streamline-report: error: no readable results.json under {tmp_path}"
    assert res.stderr.strip().splitlines() == [want]
