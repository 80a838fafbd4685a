"""`llm-streamline-cache`: report by kind, clean one kind, and never remove what the framework did not write
(a shared stages directory on a cluster holds other people's files)."""

from __future__ import annotations

import pytest

from llm_streamline import stages


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """(asset cache root, stage root), both marked as the framework's by `mark_owned`."""
    cache, stage_root = tmp_path / "cache", tmp_path / "stages"
    monkeypatch.setenv("LLM_STREAMLINE_CACHE", str(cache))
    monkeypatch.setenv("LLM_STREAMLINE_STAGES", str(stage_root))
    stages.stage_dir("x")  # a run creates and marks both roots
    return cache, stage_root


def key(kind: str, i: int = 0) -> str:
    return stages.stage_key(kind, i=i)


def test_cache_report_and_clean_by_kind(caches, capsys):
    cache, stage_root = caches
    (cache / "wheels").mkdir(parents=True)
    (cache / "wheels" / "w.whl").write_bytes(b"0" * 2**20)
    teacher = stage_root / key("teacher")
    (teacher / "train").mkdir(parents=True)
    (teacher / "train" / "shard-00000.safetensors").write_bytes(b"0" * 3 * 2**20)
    (teacher / ".tmp-val123").mkdir()  # what a SIGKILL mid-collection leaves
    (stage_root / f"{key('train')}.partial").mkdir()  # an older version's name for an unfinished train entry
    (stage_root / f".tmp-{key('train', 1)}x_9z").mkdir()  # `stages.atomic_dir`'s
    stages.write_sealed_json(stage_root / f"{key('eval_dense')}.json", key("eval_dense"), {"metrics": {}})
    stages.cache_main(["report"])
    out = capsys.readouterr().out
    assert "3.0 MiB" in out and "teacher-* (1 entries)" in out and "leftovers-* (3 entries)" in out
    assert "1.0 MiB" in out and "eval_dense-* (1 entries)" in out and "left alone" not in out
    stages.cache_main(["clean", "--what", "leftovers"])
    assert not (stage_root / f"{key('train')}.partial").exists() and not (teacher / ".tmp-val123").exists()
    assert not (stage_root / f".tmp-{key('train', 1)}x_9z").exists()
    assert (teacher / "train" / "shard-00000.safetensors").exists()
    stages.cache_main(["clean", "--what", "teacher"])
    assert not teacher.exists() and (stage_root / f"{key('eval_dense')}.json").exists()
    stages.cache_main(["clean", "--what", "eval_dense"])
    assert [p.name for p in stage_root.iterdir() if not p.name.startswith(".")] == []  # its manifest went with it
    with pytest.raises(SystemExit, match="nothing named 'nope'"):
        stages.cache_main(["clean", "--what", "nope"])


def test_clean_removes_only_what_the_framework_wrote_in_a_shared_directory(caches, capsys):
    cache, stage_root = caches
    foreign = [stage_root / ".envrc", stage_root / "notes.txt", stage_root / "results" / "run.json",
               stage_root / "teacher-notahash" / "mine.txt", cache / "my-models" / "w.bin", cache / ".bashrc"]
    for f in foreign:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("someone else's")
    ours = [stage_root / f"{key('profile')}.json", stage_root / f".{key('profile', 1)}.json.abc123.tmp",
            stage_root / f"{key('train')}.json{stages.CORRUPT}20260101-000000-42", cache / "corpus" / "c.json"]
    for f in ours:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("{}")
    for what in ("leftovers", "stages", "all"):
        stages.cache_main(["clean", "--what", what])
        assert "left alone (" in capsys.readouterr().out
    assert all(f.exists() for f in foreign), [f for f in foreign if not f.exists()]
    assert not any(f.exists() for f in ours), [f for f in ours if f.exists()]


def test_an_unmarked_directory_is_never_cleaned(tmp_path, monkeypatch, capsys):
    stage_root = tmp_path / "shared"
    stage_root.mkdir()
    entry = stage_root / f"{key('eval_dense')}.json"  # named like an entry, but no run ever marked this directory
    entry.write_text("{}")
    monkeypatch.setenv("LLM_STREAMLINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LLM_STREAMLINE_STAGES", str(stage_root))
    stages.cache_main(["clean", "--what", "stages"])
    assert entry.exists() and "left alone (1" in capsys.readouterr().out
