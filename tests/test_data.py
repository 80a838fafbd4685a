"""Tests of llm_streamline.data with the real SmolLM2 tokenizer and the embedded offline corpus.

Hub presets cannot be reached from the test machines: their streaming code is exercised against a local
`datasets.IterableDataset` patched in for `datasets.load_dataset`, and their no-network error is checked
for speed and wording.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from llm_streamline import data
from llm_streamline.config import DataConfig

SMALL = DataConfig(name="offline", seq_len=256, calib_samples=16, train_samples=64, val_samples=8, seed=0)




@pytest.fixture(scope="session")
def blocks(tok):
    return data.load_blocks(SMALL, tok)


@pytest.fixture
def tmp_data_cache(tmp_path, monkeypatch):
    """Point the module's own caches (corpus, tokens, blocks) at a fresh directory."""
    monkeypatch.setattr(data.tokens, "cache_dir", lambda sub: tmp_path / sub)
    return tmp_path


# ---------------------------------------------------------------------------------------------- corpus

def test_offline_corpus_is_deduplicated_deterministic_and_cached():
    docs = data.offline_corpus()
    assert len(docs) > 5000 and sum(map(len, docs)) > 3_000_000
    assert len(set(docs)) == len(docs)
    assert all(d == d.strip() and d for d in docs)
    assert data.corpus.corpus_path().exists()
    rebuilt, per_source = data.corpus.build_offline_corpus()
    assert rebuilt == docs  # the cache holds exactly what parsing gives, in the same order
    assert set(per_source) == {"lambada", "coqa", "squad", "drop"} and min(per_source.values()) > 300
    # squad: the paragraph only, no prompt scaffolding
    assert not any(d.startswith(("Title:", "Background:", "Passage:")) or "\nQuestion:" in d for d in docs)


def test_corpus_cache_written_atomically(tmp_data_cache):
    docs = data.offline_corpus()  # builds into the fresh dir
    path = data.corpus.corpus_path()
    assert path.parent == tmp_data_cache / "corpus"
    # no temporary left behind: the corpus and its manifest (stages.seal)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".manifest"]
    assert data.offline_corpus() == docs


def test_token_cache_roundtrip(tok, tmp_data_cache):
    docs = data.offline_corpus()[:50]
    ids = data.tokens.cached_token_stream(docs, tok, "t")
    files = [p for p in (tmp_data_cache / "tokens").iterdir() if p.suffix != ".manifest"]
    assert len(files) == 1 and files[0].suffix == ".npy"
    expected = []
    for d in docs:  # no BOS, EOS after every document
        expected += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids.tolist() == expected
    assert np.array_equal(data.tokens.cached_token_stream(docs, tok, "t"), ids)


# ---------------------------------------------------------------------------------------------- blocks

def test_shapes_and_counts(blocks):
    b = blocks
    assert b.calib.shape == (16, 256) and b.train.shape == (64, 256) and b.val.shape == (8, 256)
    for t in (b.calib, b.train, b.val):
        assert t.dtype == torch.long
    assert b.seq_len == 256 and b.source.startswith("offline:")
    assert b.token_counts["corpus"] > 500_000  # about 846k with SmolLM2
    assert b.token_counts["blocks"] == b.token_counts["corpus"] // 256
    assert b.token_counts["train"] == 64 * 256


def test_splits_are_disjoint(blocks):
    b = blocks
    idx = [set(b.val_idx.tolist()), set(b.calib_idx.tolist()), set(b.train_idx.tolist())]
    assert [len(s) for s in idx] == [8, 16, 64]
    assert not (idx[0] & idx[1]) and not (idx[0] & idx[2]) and not (idx[1] & idx[2])
    rows = [tuple(r) for t in (b.val, b.calib, b.train) for r in t.tolist()]
    assert len(set(rows)) == len(rows)


def _kept_stream(tok):
    kept, _ = data.corpus.offline_split_docs()
    return data.corpus.kept_stream(tok), kept


def test_blocks_are_slices_of_the_token_stream(blocks, tok):
    ids, kept = _kept_stream(tok)
    i = int(blocks.train_idx[0])
    assert blocks.train[0].tolist() == ids[i * 256:(i + 1) * 256].tolist()
    eos = int((torch.from_numpy(ids.astype(np.int64)) == tok.eos_token_id).sum())
    assert eos == len(kept)  # exactly one EOS per document
    assert not (blocks.val == tok.bos_token_id).any()


def test_seed_determinism(blocks, tok):
    again = data.load_blocks(SMALL, tok)
    for a, c in ((blocks.calib, again.calib), (blocks.train, again.train), (blocks.val, again.val)):
        assert torch.equal(a, c)
    other = data.load_blocks(replace(SMALL, seed=1), tok)
    assert not torch.equal(other.val, blocks.val)
    assert not torch.equal(other.train_idx, blocks.train_idx)


def test_val_stable_when_train_samples_change(blocks, tok):
    more = data.load_blocks(replace(SMALL, train_samples=200), tok)
    assert torch.equal(more.val, blocks.val) and torch.equal(more.val_idx, blocks.val_idx)
    assert torch.equal(more.calib, blocks.calib)
    assert torch.equal(more.train[:64], blocks.train)  # the first 64 are the same blocks


def _fingerprint(*tensors: torch.Tensor) -> str:
    import hashlib

    h = hashlib.sha256()
    for t in tensors:
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def test_splits_are_the_recorded_layout(blocks, tok):
    """The blocks of SMALL and the held-out text, byte for byte, as SPLIT_LAYOUT=2 recorded them: a change
    here changes every stage keyed on the data and must bump data.SPLIT_LAYOUT (and this fingerprint)."""
    assert data.SPLIT_LAYOUT == 2
    b = blocks
    assert _fingerprint(b.val, b.calib, b.train, b.val_idx, b.calib_idx, b.train_idx) == "da694100390a95e8"
    held = data.perplexity_text("heldout", tok, seq_len=128, max_blocks=None)
    assert _fingerprint(held.blocks) == "dfd74b848204c39b" and held.tokens_available == 37816


def test_decoded_block_is_english(blocks, tok):
    text = tok.decode(blocks.val[0])
    letters = sum(c.isascii() and (c.isalpha() or c.isspace()) for c in text)
    assert letters / len(text) > 0.8
    words = re.findall(r"[a-z]+", text.lower())
    assert len(words) > 100
    assert sum(w in {"the", "and", "of", "to", "a", "in", "was", "he", "she", "it"} for w in words) > 15


def test_too_many_samples_is_a_clear_error(tok):
    with pytest.raises(ValueError) as e:
        data.load_blocks(replace(SMALL, train_samples=100_000), tok)
    msg = str(e.value)
    assert "\n" not in msg
    assert "data=offline" in msg and "train_samples=100000" in msg and "seq_len=256" in msg
    assert re.search(r"gives \d+ blocks", msg)


def test_nonpositive_counts_rejected(tok):
    with pytest.raises(ValueError, match="val_samples=0"):
        data.load_blocks(replace(SMALL, val_samples=0), tok)


def test_seq_len_has_the_config_validations_bound(tok):
    """One check, one bound: a DataConfig built in code meets the same seq_len >= 8 as a composed config."""
    from llm_streamline.config import ConfigError, ModelConfig, RunConfig, validate

    for check in (lambda: data.load_blocks(replace(SMALL, seq_len=4), tok),
                  lambda: validate(replace(RunConfig(), model=ModelConfig(name="t", source="tiny", family="llama"),
                                            data=replace(SMALL, seq_len=4)))):
        with pytest.raises(ConfigError, match=r"^data.seq_len=4: must be >= 8$"):
            check()


# ---------------------------------------------------------------------------------------------- hub presets

@pytest.mark.parametrize("name", ["slimpajama", "wikitext2", "c4"])
def test_hub_preset_offline_is_a_quick_clear_error(name, tok, tmp_data_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError) as e:
        data.load_blocks(replace(SMALL, name=name), tok)
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert f"data={name} needs network access to the Hugging Face hub; use data=offline" in msg
    assert "\n" not in msg


def test_hub_offline_error_in_a_fresh_process(tokenizer_dir, tmp_path):
    code = ("import logging; from transformers import AutoTokenizer; from llm_streamline import data; "
            "from llm_streamline.config import DataConfig; "
            f"data.load_blocks(DataConfig(name='c4'), AutoTokenizer.from_pretrained({str(tokenizer_dir)!r}))")
    env = dict(os.environ, HF_HUB_OFFLINE="1", LLM_STREAMLINE_CACHE=str(tmp_path))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode != 0
    assert time.perf_counter() - t0 < 60
    last = proc.stderr.strip().splitlines()[-1]
    assert "data=c4 needs network access to the Hugging Face hub; use data=offline" in last


def test_connection_error_from_datasets_becomes_the_clear_error(tok, tmp_data_cache, monkeypatch):
    import datasets

    def unreachable(*a, **k):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(data.hub, "preflight", lambda name: None)
    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(data.HubUnavailable, match="data=c4 needs network access to the Hugging Face hub; "
                                                  "use data=offline .*LocalEntryNotFoundError"):
        data.load_blocks(replace(SMALL, name="c4"), tok)


class FakeHub:
    """Stands in for datasets.load_dataset: local IterableDatasets, counting the rows read."""

    def __init__(self, splits: dict[str, list[str]], field: str = "text"):
        self.splits, self.field, self.read, self.calls = splits, field, 0, []

    def __call__(self, path, name=None, split=None, streaming=False):
        import datasets

        assert streaming, "hub presets must stream"
        self.calls.append((path, name, split))
        rows = self.splits[split]

        def gen(shards):
            for s in shards:
                for i in range(s, len(rows), 4):
                    self.read += 1
                    yield {self.field: rows[i], "meta": "x"}

        return datasets.IterableDataset.from_generator(gen, gen_kwargs={"shards": [0, 1, 2, 3]})


@pytest.fixture
def fake_hub(tmp_data_cache, monkeypatch):
    import datasets

    docs = data.offline_corpus()
    coqa = [d for d in docs if len(d) > 1000][:400]  # long docs: a few blocks each
    hub = FakeHub({"train": [f"Document {i}. {d}" for i, d in enumerate(coqa[:300])],
                   "validation": [f"Document {i}. {d}" for i, d in enumerate(coqa[300:], 300)]})
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(data.hub, "preflight", lambda name: None)
    monkeypatch.setattr(data.hub, "SHUFFLE_BUFFER", 20)
    monkeypatch.setattr(datasets, "load_dataset", hub)
    return hub


def test_streamed_preset_with_fake_hub(tok, fake_hub):
    cfg = DataConfig(name="c4", seq_len=128, calib_samples=6, train_samples=20, val_samples=4, seed=3)
    b = data.load_blocks(cfg, tok)
    assert fake_hub.calls == [("allenai/c4", "en", "validation"), ("allenai/c4", "en", "train")]
    assert b.val.shape == (4, 128) and b.calib.shape == (6, 128) and b.train.shape == (20, 128)
    assert b.source == "hub:allenai/c4/en[train+validation]"
    # only as much of the stream as needed: buffer + a tokenizer batch + the docs used, not all 400
    assert fake_hub.read < 200
    # every split starts on a fresh document (splits share no document)
    for t in (b.val, b.calib, b.train):
        assert tok.decode(t[0][:4]).startswith("Document ")
    val_docs = set(re.findall(r"Document (\d+)\.", tok.decode(b.val.flatten())))
    train_docs = set(re.findall(r"Document (\d+)\.", tok.decode(torch.cat([b.calib, b.train]).flatten())))
    assert val_docs and train_docs and all(int(i) >= 300 for i in val_docs)
    assert all(int(i) < 300 for i in train_docs)
    idx = [set(x.tolist()) for x in (b.val_idx, b.calib_idx, b.train_idx)]
    assert not (idx[0] & idx[1] or idx[0] & idx[2] or idx[1] & idx[2])
    # cached: a second call reads nothing from the hub
    fake_hub.calls.clear()
    again = data.load_blocks(cfg, tok)
    assert fake_hub.calls == [] and torch.equal(again.train, b.train) and torch.equal(again.val_idx, b.val_idx)


def test_streamed_single_split_seed_and_stability(tok, fake_hub):
    cfg = DataConfig(name="slimpajama", seq_len=128, calib_samples=4, train_samples=8, val_samples=4, seed=0)
    a = data.load_blocks(cfg, tok)
    assert all(c == ("DKYoon/SlimPajama-6B", None, "train") for c in fake_hub.calls)
    more = data.load_blocks(replace(cfg, train_samples=16), tok)  # not cached: a different request
    assert torch.equal(more.val, a.val) and torch.equal(more.calib, a.calib)
    other = data.load_blocks(replace(cfg, seed=1), tok)
    assert not torch.equal(other.val, a.val)
    with pytest.raises(ValueError, match=r"data=slimpajama: .*stream ended after \d+ blocks.*train_samples=100000"):
        data.load_blocks(replace(cfg, train_samples=100_000), tok)


def test_overrides_and_missing_field(tok, fake_hub):
    cfg = DataConfig(name="slimpajama", seq_len=64, calib_samples=2, train_samples=2, val_samples=2,
                     hub_path="me/my-corpus", hub_name="sub", hub_split="validation")
    b = data.load_blocks(cfg, tok)
    assert fake_hub.calls[-1] == ("me/my-corpus", "sub", "validation")
    assert b.source == "hub:me/my-corpus/sub[validation]"
    with pytest.raises(ValueError, match="has no column 'body'.*data.text_field"):
        data.load_blocks(replace(cfg, text_field="body"), tok)


def test_wikitext2_reads_whole_splits_and_permutes(tok, fake_hub):
    cfg = DataConfig(name="wikitext2", seq_len=128, calib_samples=5, train_samples=10, val_samples=3, seed=0)
    b = data.load_blocks(cfg, tok)
    assert fake_hub.calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "validation"),
                              ("Salesforce/wikitext", "wikitext-2-raw-v1", "train")]
    assert fake_hub.read == sum(map(len, fake_hub.splits.values()))  # both splits read whole, in order
    # one numbering: the validation split's blocks first, then the train split's
    assert int(b.val_idx.max()) < min(int(b.calib_idx.min()), int(b.train_idx.min()))
    val_docs = set(map(int, re.findall(r"Document (\d+)\.", tok.decode(b.val.flatten()))))
    assert all(i >= 300 for i in val_docs)
    more = data.load_blocks(replace(cfg, train_samples=30), tok)
    assert torch.equal(more.val, b.val) and torch.equal(more.calib, b.calib)


def test_network_failure_mid_stream_becomes_the_clear_error(tok, fake_hub, monkeypatch):
    import datasets
    import httpx

    def broken(path, name=None, split=None, streaming=False):
        def gen():
            yield {"text": "A first document that arrived."}
            raise httpx.ConnectError("[Errno -2] Name or service not known")

        return datasets.IterableDataset.from_generator(gen)

    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(data.HubUnavailable, match=r"data=slimpajama needs network access .*ConnectError"):
        data.load_blocks(DataConfig(name="slimpajama", seq_len=64, calib_samples=2, train_samples=2,
                                    val_samples=2), tok)


# ------------------------------------------------------------------ the reported perplexity's text

def test_heldout_documents_are_out_of_every_other_split(tok, blocks):
    docs = data.offline_corpus()
    kept, held = data.corpus.offline_split_docs()
    assert len(kept) + len(held) == len(docs) and not set(kept) & set(held)
    assert 0.03 < len(held) / len(docs) < 0.07  # one in HELDOUT_EVERY=20 by content hash
    text = data.perplexity_text("heldout", tok, seq_len=64, max_blocks=None)
    assert text.blocks.shape[1] == 64 and text.blocks.shape[0] * 64 > 20_000
    assert text.source.startswith("heldout")
    # no 16-token window of the held-out text occurs anywhere in the stream that calibration, training and
    # validation blocks are cut from (blocks are slices of it: test_blocks_are_slices_of_the_token_stream)
    stream, _ = _kept_stream(tok)
    windows = {tuple(stream[i:i + 16]) for i in range(0, stream.size - 16)}
    held_ids = text.blocks.flatten().tolist()
    hits = sum(tuple(held_ids[i:i + 16]) in windows for i in range(0, len(held_ids) - 16, 7))
    assert hits == 0
    for split in (blocks.val, blocks.calib, blocks.train):
        rows = {tuple(r) for r in split.tolist()}
        assert not rows & {tuple(r) for r in data.perplexity_text("heldout", tok, 256, None).blocks.tolist()}


def test_heldout_text_is_fixed_and_cut_to_the_asked_blocks(tok):
    a = data.perplexity_text("heldout", tok, seq_len=128, max_blocks=5)
    b = data.perplexity_text("heldout", tok, seq_len=128, max_blocks=None)
    assert a.blocks.shape == (5, 128) and torch.equal(a.blocks, b.blocks[:5])
    assert a.describe() == {"text": a.source, "blocks": 5, "seq_len": 128, "tokens_available": b.tokens_available}
    with pytest.raises(ValueError, match="perplexity_text='wiki'"):
        data.perplexity_text("wiki", tok, 128, 5)


def test_wikitext2_perplexity_reads_the_test_split(tok, fake_hub, monkeypatch):
    fake_hub.splits["test"] = [f"Article {i}. " + d for i, d in enumerate(data.offline_corpus()[:40])]
    text = data.perplexity_text("wikitext2", tok, seq_len=128, max_blocks=3)
    assert fake_hub.calls[-1] == ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")
    assert text.blocks.shape == (3, 128) and tok.decode(text.blocks[0][:3]).startswith("Article 0")
