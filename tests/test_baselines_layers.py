"""Layer-removal baselines (ShortGPT, Gromov, SLEB), LaCo and LoRA healing on tiny random models:
exactly n layers go, the result equals the dense model with those layers skipped, the KV cache and a stock
save/load round trip still work, each method finds a constructed redundant layer, and each runs end to end
through the pipeline."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from llm_streamline import recipes
from llm_streamline.baselines import laco, layer_removal
from llm_streamline.config import METHOD_SCHEMAS, LaCoConfig, RunConfig, heal_train_config
from llm_streamline.importance import similarity_profile
from llm_streamline.models.layers import find_decoder_stack, layer_view, per_layer_config_keys, remove_layers, skipping
from llm_streamline.models.loading import tiny_model
from llm_streamline.train import train_lora

V = 512
SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = ["llama", "qwen2", "opt"]


def _model(family: str, seed: int = 0, **over):
    return tiny_model(family, V, overrides=over or None, seed=seed, special_ids=SPECIAL).eval()


def _blocks(n: int = 4, t: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, V, (n, t), generator=torch.Generator().manual_seed(seed))


def _make_identity(model, idx: int) -> None:
    """Zero every Linear writing into the residual stream of layer idx: the layer then returns its input."""
    hidden = find_decoder_stack(model).config.hidden_size
    with torch.no_grad():
        for m in find_decoder_stack(model).layers[idx].modules():
            if isinstance(m, nn.Linear) and m.out_features == hidden:
                m.weight.zero_()
                if m.bias is not None:
                    m.bias.zero_()


def _check_consistent(model, n_layers: int) -> None:
    stack = find_decoder_stack(model)
    assert stack.num_layers == n_layers == model.config.num_hidden_layers
    for key in per_layer_config_keys(stack.config):
        assert len(getattr(stack.config, key)) == n_layers
    for i, layer in enumerate(stack.layers):
        for m in layer.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                assert m.layer_idx == i


@torch.no_grad()
def _check_cache_and_roundtrip(model, tmp_path) -> None:
    prompt = _blocks(2, 6, seed=7)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, use_cache=True, **kw), model.generate(prompt, use_cache=False, **kw))
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(loaded) is type(model)
    ids = _blocks(2, 16, seed=8)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["shortgpt", "gromov", "sleb"])
def test_layer_removal_equals_dense_with_layers_skipped(family, method, tmp_path):
    dense = _model(family)
    calib = _blocks()
    prof = similarity_profile(dense, calib, ns=list(range(1, 9)), progress=False)
    res = layer_removal.apply(method, copy.deepcopy(dense), calib, prof, 2, RunConfig(method=METHOD_SCHEMAS[method]()))
    assert len(res.removed_layers) == 2 and res.record["removed"] == res.removed_layers
    _check_consistent(res.model, 6)
    ids = _blocks(2, 24, seed=3)
    with torch.no_grad(), skipping(dense, res.removed_layers):
        ref = dense(ids).logits
    torch.testing.assert_close(res.model(ids).logits, ref, rtol=1e-5, atol=1e-5)
    if method == "sleb":
        assert [s["layer"] for s in res.record["steps"]] == res.record["removal_order"]
    _check_cache_and_roundtrip(res.model, tmp_path)


def test_remove_layers_non_contiguous_keeps_layer_types():
    model = _model("qwen2", layer_types=["full_attention", "sliding_attention"] * 4, use_sliding_window=True,
                   sliding_window=8)
    types = list(model.config.layer_types)
    assert remove_layers(model, [6, 1, 3]) == [1, 3, 6]
    _check_consistent(model, 5)
    assert model.config.layer_types == [t for i, t in enumerate(types) if i not in (1, 3, 6)]


@pytest.mark.parametrize("family", FAMILIES)
def test_sleb_scores_equal_full_forward_with_a_layer_skipped(family):
    model = _model(family)
    ids = _blocks(2, 16)
    fast = layer_removal.sleb_candidate_losses(model, ids)
    for i in range(find_decoder_stack(model).num_layers):
        with torch.no_grad(), skipping(model, [i]):
            s, t = layer_removal._lm_loss_sum(model, ids)
        assert fast[i] == pytest.approx(s / t, rel=1e-5)


def test_sleb_calibration_windows_and_batches():
    calib = _blocks(4, 32)
    win = layer_removal.sleb_tokens(calib, 2, 48)     # the blocks concatenated, cut into 48-token windows
    assert win.shape == (2, 48) and torch.equal(win.reshape(-1), calib.reshape(-1)[:96])
    assert torch.equal(layer_removal.sleb_tokens(calib, 3, None), calib[:3])
    with pytest.raises(ValueError, match="needs 160 calibration tokens; the data gives 128"):
        layer_removal.sleb_tokens(calib, 5, 32)
    model = _model("llama")
    whole = layer_removal.sleb_candidate_losses(model, win, [1, 3, 7])
    assert layer_removal.sleb_candidate_losses(model, win, [1, 3, 7], batch_size=1) == pytest.approx(whole, rel=1e-5)


def test_sleb_sizes_are_method_options_and_checked_before_work():
    from hydra import compose, initialize_config_dir

    from llm_streamline.cli import CONF_DIR, to_run_config
    from llm_streamline.config import ConfigError, validate

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cpu = to_run_config(compose(config_name="config", overrides=["method=sleb"]))
        gpu = to_run_config(compose(config_name="config", overrides=["method=sleb_gpu", "data=slimpajama"]))
        short = to_run_config(compose(config_name="config", overrides=["method=sleb_gpu"]))
    assert (cpu.method.sleb_samples, cpu.method.sleb_seq_len) == (4, None)
    assert (gpu.method.name, gpu.method.sleb_samples, gpu.method.sleb_seq_len) == ("sleb", 128, 2048)
    validate(cpu)
    validate(gpu)
    with pytest.raises(ConfigError, match="262144 calibration tokens, but data.calib_samples x data.seq_len = 16384"):
        validate(short)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_shortgpt_and_gromov_find_constructed_identity_layers(family):
    model = _model(family)
    _make_identity(model, 3)
    prof = similarity_profile(model, _blocks(), ns=[1, 2], progress=False)
    assert prof.block_influence()[3] == pytest.approx(0.0, abs=1e-6)
    assert layer_removal.apply("shortgpt", copy.deepcopy(model), None, prof, 1, RunConfig()).removed_layers == [3]
    _make_identity(model, 4)
    prof = similarity_profile(model, _blocks(), ns=[1, 2], progress=False)
    res = layer_removal.apply("gromov", copy.deepcopy(model), None, prof, 2, RunConfig())
    assert res.removed_layers == [3, 4] and res.record["angular_distance"] < 1e-3


def _states_at_angles(angles: list[list[float]], samples: int = 2, hidden: int = 8) -> list[torch.Tensor]:
    """x^(j) for each j: per token, the unit vector at angle angles[j][t] (radians) in a plane, [samples, T, H]."""
    out = []
    for row in angles:
        a = torch.tensor(row, dtype=torch.float64)
        h = torch.zeros(samples, len(row), hidden, dtype=torch.float64)
        h[..., 0], h[..., 1] = torch.cos(a), torch.sin(a)
        out.append(h)
    return out


def test_gromov_uses_the_last_token_distance_which_picks_another_block_than_the_all_token_mean():
    """Four layers, n = 1. Block 1 changes only the last token (by 90 degrees: all-token mean 0.5 / 4 = 0.125,
    last token 0.5); block 2 turns every token by 0.2 pi (0.2 either way); blocks 0 and 3 by 90 degrees.
    The all-token mean picks block 1, the paper's last-token rule (Gromov et al. §3.2) block 2."""
    from math import pi

    from llm_streamline.importance import profile_from_states

    T = 4
    a0 = [0.0] * T
    a1 = [pi / 2] * T
    a2 = a1[:-1] + [pi]
    a3 = [a + 0.2 * pi for a in a2]
    a4 = [a + pi / 2 for a in a3]
    prof = profile_from_states([_states_at_angles([a0, a1, a2, a3, a4])] * 3, ns=[1])
    assert prof.mean_angular[1] == pytest.approx([0.5, 0.125, 0.2, 0.5])
    assert prof.last_angular[1] == pytest.approx([0.5, 0.5, 0.2, 0.5])
    assert prof.best_start(1, "angular") == 1 and prof.best_start(1, "angular_last") == 2
    model = _model("llama", num_hidden_layers=4)
    res = layer_removal.apply("gromov", model, None, prof, 1, RunConfig())
    assert res.removed_layers == [2] and res.record["metric"] == "angular_last"
    assert res.record["angular_distance"] == pytest.approx(0.2)


def test_profile_round_trips_through_its_dict():
    from llm_streamline.importance import SimilarityProfile

    prof = similarity_profile(_model("llama"), _blocks(), ns=[1, 3], progress=False)
    again = SimilarityProfile.from_dict(json.loads(json.dumps(prof.as_dict())))
    assert again == prof and set(prof.last_angular) == {1, 3} and len(prof.last_angular[3]) == 6


@torch.no_grad()
def _sample_from(model, n: int, t: int, seed: int) -> torch.Tensor:
    """Blocks sampled from the model itself: in expectation no other model scores them better (Gibbs)."""
    torch.manual_seed(seed)
    start = _blocks(n, 1, seed=seed)
    return model.generate(start, do_sample=True, max_new_tokens=t - 1, min_new_tokens=t - 1, top_k=0, top_p=1.0,
                          pad_token_id=0)


def test_sleb_picks_the_identity_layer():
    model = _model("llama", initializer_range=0.1)
    _make_identity(model, 5)
    calib = _sample_from(model, 16, 32, seed=1)
    order, steps = layer_removal.sleb(copy.deepcopy(model), calib, 1, blocks=16, progress=False)
    assert set(steps[0]["candidates_ppl"]) == {str(i) for i in range(1, 7)}   # sleb.py: first, last kept
    assert order == [5]
    assert steps[0]["ppl"] == min(steps[0]["candidates_ppl"].values())


def _replay_rdsc(dense, merges) -> dict[int, dict]:
    """Replay recorded collapses on the dense parameters: Linear weights by RDSC
    theta_l + sum_k (theta_{l+k} - theta_l), every other parameter (norms, biases) kept from layer l."""
    layers = find_decoder_stack(dense).layers
    linear = set(laco.merged_weight_names(layers[0]))
    cur = {i: {k: p.detach().clone() for k, p in layer.named_parameters()} for i, layer in enumerate(layers)}
    for m in merges:
        base = cur[m["into"]]
        cur[m["into"]] = {k: (v + sum(cur[g][k] - v for g in m["merged"])) if k in linear else v
                          for k, v in base.items()}
        for g in m["merged"]:
            del cur[g]
    return cur


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("merge,n", [(2, 3), (3, 3), (4, 3)])
def test_laco_removes_exactly_n_and_merges_by_rdsc(family, merge, n, tmp_path):
    dense = _model(family)
    cfg = RunConfig(method=LaCoConfig(laco_merge=merge))
    res = laco.apply(copy.deepcopy(dense), _blocks(), n, cfg)
    assert len(res.removed_layers) == n == sum(len(m["merged"]) for m in res.record["merges"])
    assert res.record["fallbacks"] == sum(m["fallback"] for m in res.record["merges"])
    _check_consistent(res.model, 8 - n)
    cur = _replay_rdsc(dense, res.record["merges"])
    assert sorted(cur) == [i for i in range(8) if i not in res.removed_layers]
    for pos, i in enumerate(sorted(cur)):
        got = dict(find_decoder_stack(res.model).layers[pos].named_parameters())
        for k, want in cur[i].items():
            torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6)
    _check_cache_and_roundtrip(res.model, tmp_path)


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt"])
def test_rdsc_merges_linear_weights_only_and_leaves_norms_and_biases(family):
    """C = 3: the paper's theta_0 + (theta_1 - theta_0) + (theta_2 - theta_0) on every attention / MLP Linear
    weight (not the official notebook's running update, which would give theta_2); norms and biases: layer 0's."""
    layers = list(find_decoder_stack(_model(family)).layers[2:5])
    merged = laco.rdsc_merge(layers)
    names = laco.merged_weight_names(layers[0])
    attn_mlp = {"q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2"}
    assert {k.split(".")[-2] for k in names} <= attn_mlp and len(names) == (7 if family != "opt" else 6)
    others = [k for k, _ in layers[0].named_parameters() if k not in names]
    assert any("norm" in k for k in others)
    assert family == "llama" or any(k.endswith(".bias") for k in others)
    w = [dict(layer.named_parameters()) for layer in layers]
    for k, p in merged.named_parameters():
        if k in names:
            torch.testing.assert_close(p, w[1][k] + w[2][k] - w[0][k])
            assert not torch.allclose(p, w[2][k])
        else:
            assert torch.equal(p, w[0][k]), k


def test_laco_similarity_is_the_notebooks_flattened_final_hidden_cosine():
    model = _model("llama")
    ids = _blocks(3, 16)
    with torch.no_grad():
        ref = laco._final_hidden(model, ids)
        layers = find_decoder_stack(model).layers
        with layer_view(model, [layers[0], laco.rdsc_merge(list(layers[1:3]))] + list(layers[3:]),
                                      [0, 1] + list(range(3, 8))):
            h = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[-1]
        want = sum(torch.nn.functional.cosine_similarity(h[j].flatten(), ref[j], dim=0) for j in range(3)) / 3
        assert laco._similarity(model, ids, ref, 1, 2) == pytest.approx(float(want), rel=1e-5)
        assert laco._similarity(model, ids, ref, 1, 1) == pytest.approx(1.0, abs=1e-5)


def test_laco_merging_an_equal_layer_gives_it_back():
    """The notebooks' pass starts at L - 1 - C (= 5 for C = 2): layers 5, 6 equal -> merged into an equal layer."""
    model = _model("llama")
    layers = find_decoder_stack(model).layers
    layers[6].load_state_dict(layers[5].state_dict())
    want = {k: v.clone() for k, v in layers[5].state_dict().items()}
    res = laco.apply(model, _blocks(), 1, RunConfig(method=LaCoConfig(laco_merge=2)))
    first = res.record["merges"][0]
    assert res.removed_layers == [6] and first["into"] == 5 and not first["fallback"]
    for k, v in find_decoder_stack(res.model).layers[5].state_dict().items():
        assert torch.equal(v, want[k])


def _heal(model, train, val, cfg: RunConfig, **kw):
    """LoRA healing as the recipes call it for this run config."""
    return train_lora(model, train, val, heal_train_config(cfg), cfg.method.lora_rank, cfg.method.lora_alpha,
                      cfg.seed, progress=False, **kw)


def test_lora_heal_lowers_val_loss_and_merges_to_the_original_class(tmp_path):
    model = _model("llama")
    cls = type(model)
    # a learnable stream: each block repeats a short random pattern
    g = torch.Generator().manual_seed(0)
    pat = torch.randint(3, V, (24, 4), generator=g)
    blocks = pat.repeat(1, 8)
    cfg = RunConfig()
    cfg.method.lora_lr, cfg.method.lora_epochs, cfg.train.batch_size = 5e-3, 3, 4
    healed, log = _heal(model, blocks[:20], blocks[20:], cfg)
    assert type(healed) is cls and not any("lora" in n for n, _ in healed.named_parameters())
    assert log["best_val_loss"] < log["initial_val_loss"] - 0.05
    assert log["steps"] == 15 and log["tokens"] == 15 * 4 * 32 and log["trainable_params"] > 0
    with torch.no_grad():
        loss = healed(input_ids=blocks[20:], labels=blocks[20:]).loss.item()
    assert loss == pytest.approx(log["best_val_loss"], rel=1e-4)
    _check_cache_and_roundtrip(healed, tmp_path)


def test_lora_adapters_kept_and_reapplied_give_the_same_model():
    """The pipeline keeps the trained adapters (stage cache) and a rerun applies them without training."""
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(3, V, (24, 4), generator=g).repeat(1, 8)
    cfg = RunConfig()
    cfg.method.lora_lr, cfg.method.lora_epochs, cfg.train.batch_size = 5e-3, 1, 4
    kept = {}
    trained, log = _heal(_model("llama"), blocks[:20], blocks[20:], cfg,
                         on_trained=lambda adapters, lg: kept.update(adapters=adapters, log=lg))
    assert kept["log"] is log and all("lora_" in k for k in kept["adapters"])
    again, log2 = _heal(_model("llama"), blocks[:20], blocks[20:], cfg,
                        cached=(kept["adapters"], kept["log"]))
    assert log2 is log
    want = trained.state_dict()
    for k, v in again.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_lora_healing_trains_with_the_methods_budget_whatever_the_train_group_says():
    """method.heal=lora, the one LoRA switch (train=lora sets it for LLM-Streamline's plain pruning): healing trains
    at method.lora_lr for method.lora_epochs with its fixed schedule (5% warm-up, cosine to a tenth, no weight
    decay, best kept) and takes only batch_size, grad_clip, max_steps, grad_accum and grad_checkpointing of train."""
    from dataclasses import replace

    from llm_streamline.config import MethodConfig, TrainConfig, heal_train_config

    cfg = RunConfig()
    own = heal_train_config(cfg)
    assert (own.loss, own.lr, own.epochs, own.min_lr, own.weight_decay, own.warmup_ratio, own.select) == \
        ("lora", cfg.method.lora_lr, cfg.method.lora_epochs, pytest.approx(0.1 * cfg.method.lora_lr), 0.0, 0.05, "best")
    assert (own.batch_size, own.grad_clip, own.max_steps) == (cfg.train.batch_size, cfg.train.grad_clip, None)

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(3, V, (24, 4), generator=g).repeat(1, 8)
    cfg = replace(RunConfig(), method=MethodConfig(heal="lora", lora_lr=5e-3, lora_epochs=2),
                  train=TrainConfig(lr=9.0, min_lr=1.0, weight_decay=0.5, warmup_ratio=0.9, epochs=7, select="final",
                                    batch_size=4, grad_clip=2.0))
    h = heal_train_config(cfg)
    assert (h.lr, h.min_lr, h.weight_decay, h.warmup_ratio, h.epochs, h.select, h.batch_size, h.grad_clip) == \
        (5e-3, pytest.approx(5e-4), 0.0, 0.05, 2, "best", 4, 2.0)
    lrs = []
    _, log = _heal(_model("llama"), blocks[:20], blocks[20:], cfg,
                   on_step=lambda step, m: lrs.append(m["train/lr"]) if "train/lr" in m else None)
    assert log["steps"] == 10 and 0.95 * 5e-3 < max(lrs) <= 5e-3  # method.lora_lr, not train.lr
    assert lrs[-1] == pytest.approx(5e-4)  # cosine down to a tenth of method.lora_lr
    assert log["selected_step"] == log["best_step"]  # the lowest validation loss kept


@pytest.mark.parametrize("method", ["shortgpt", "gromov", "laco", "sleb"])
def test_baseline_through_the_pipeline(method, tmp_path):
    from hydra import compose, initialize_config_dir

    from llm_streamline.cli import CONF_DIR, to_run_config

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = to_run_config(compose(config_name="config", overrides=[
            "experiment=smoke", f"method={method}", "replacement=none", "eval.speed=false"]))
    recipes.run(cfg, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["method"] == method and saved["layers"]["n_removed"] == 2 and saved["layers"]["n_after"] == 6
    assert saved["baseline"]["removed"] == saved["layers"]["removed_indices"]
    assert (saved["train"] is not None) == (method == "gromov")
    assert 0.0 <= saved["stability"]["average"]["stability"] <= 1.0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert loaded.config.num_hidden_layers == 6
    # a rerun takes the layer choice (SLEB's search) and the LoRA adapters from the stage cache
    recipes.run(cfg, tmp_path / "again")
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    for key in ("layers", "baseline", "params", "eval", "perplexity", "train"):
        assert again[key] == saved[key], key
