"""`llm-streamline-export` writes into a new (or empty) directory only: an `out` that holds anything (the
current directory, a run directory, the folder of all runs, an earlier export) or is a file is refused in one
line (exit 2) before the model is read, and every file there is left as it was (issue 26: `out=.` deleted the
current directory, `out=<the runs folder>` two runs, with exit 0)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_streamline import export


def saved_run(root: Path) -> Path:
    """What the export reads first (the refusal comes before the weights are loaded)."""
    run = root / "runs" / "run-a"
    (run / "model").mkdir(parents=True)
    (run / "model" / "llm_streamline.json").write_text('{"format": "stock"}')
    (run / "results.json").write_text('{"eval": {}}')
    (run / "samples_pruned.jsonl").write_text("{}\n")
    (root / "runs" / "run-b").mkdir()
    (root / "runs" / "run-b" / "results.json").write_text('{"eval": {}}')
    (root / "notes.txt").write_text("the user's")
    return run


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


OUTS = {
    "the current directory": (".", "is not empty"),
    "the run directory": ("{run}", "is not empty"),
    "the folder of all runs": ("{tmp}/runs", "is not empty"),
    "an earlier export (the default out)": (None, "is not empty"),
    "a file": ("{tmp}/notes.txt", "is a file"),
    "inside the model directory": ("{run}/model/export", "is inside the model directory"),
}


@pytest.mark.parametrize("name", OUTS)
def test_export_refuses_an_out_that_holds_anything_and_deletes_nothing(name, tmp_path, monkeypatch, capsys):
    run = saved_run(tmp_path)
    out, needle = OUTS[name]
    if out is None:
        (run / "export").mkdir()
        (run / "export" / "README.md").write_text("an earlier export, edited by the user")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    argv = [f"run={run}"] + ([f"out={out.format(run=run, tmp=tmp_path)}"] if out else [])
    with pytest.raises(SystemExit) as e:
        export.main(argv)
    assert e.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("llm-streamline-export: error: out=") and needle in line, line
    assert snapshot(tmp_path) == before
