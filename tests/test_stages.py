"""The one atomic writer (`stages.write_atomic`, `stages.atomic_dir`): the result appears whole or not at all,
nothing temporary is left, and what it writes gets open()/mkdir()'s modes (tempfile's are 0600 / 0700)."""

from __future__ import annotations

import os
import stat

import pytest

from llm_streamline import stages


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(p) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_write_atomic_replaces_whole_with_default_mode(tmp_path, umask_022):
    path = tmp_path / "sub" / "results.json"
    stages.write_text_atomic(path, "old")
    stages.write_atomic(path, lambda tmp: (tmp.write_text("new"), tmp.chmod(0o600)), fsync=True)
    assert path.read_text() == "new" and mode(path) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_write_atomic_failure_keeps_the_old_file_and_leaves_nothing(tmp_path):
    path = tmp_path / "blocks.safetensors"
    stages.write_bytes_atomic(path, b"old")

    def half_then_fail(tmp):
        tmp.write_bytes(b"ha")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        stages.write_atomic(path, half_then_fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["blocks.safetensors"]


def test_atomic_dir_replaces_the_directory_with_default_modes(tmp_path, umask_022):
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "stale.bin").write_bytes(b"x")
    with stages.atomic_dir(dest) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-model") and not dest.joinpath("w").exists()
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "w.safetensors").write_bytes(b"w")
        (tmp / "sub" / "w.safetensors").chmod(0o600)  # as safetensors' save_file creates it
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == ["sub", "sub/w.safetensors"]
    assert mode(dest) == mode(dest / "sub") == 0o755 and mode(dest / "sub" / "w.safetensors") == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_atomic_dir_failure_keeps_the_old_directory_and_leaves_nothing(tmp_path):
    dest = tmp_path / "teacher"
    dest.mkdir()
    (dest / "index.json").write_text("{}")
    with pytest.raises(KeyboardInterrupt), stages.atomic_dir(dest) as tmp:
        (tmp / "shard-00000.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt
    assert [p.name for p in dest.iterdir()] == ["index.json"] and [p.name for p in tmp_path.iterdir()] == ["teacher"]
