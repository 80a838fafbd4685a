"""LLM-Pruner baseline (width pruning of coupled attention heads or KV groups / MLP channels by Taylor importance)
on tiny random models: size matches the target, ratio 0 is the identity, useless structures go first, removing
q heads under GQA equals zeroing their o_proj columns and keeps every KV group's head count equal, the pruned
model runs and generates with a KV cache, save/load round trip, hand-computed scores, and the pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

import llm_streamline
from llm_streamline import recipes
from llm_streamline.baselines import llm_pruner
from llm_streamline.cli import CONF_DIR, to_run_config
from llm_streamline.config import LLMPrunerConfig, RunConfig, ShortGPTConfig, SLEBConfig
from llm_streamline.models.checkpoints import save_checkpoint
from llm_streamline.models.layers import count_params, find_decoder_stack
from llm_streamline.models.loading import tiny_model

SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = ["llama", "qwen2", "opt"]
GQA_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"]
EIGHT_Q_TWO_KV = dict(num_attention_heads=8, num_key_value_heads=2)   # 4 q heads per KV group


def make(family: str, **overrides):
    return tiny_model(family, 512, overrides or None, seed=0, special_ids=SPECIAL).eval()  # OPT has dropout


def tokens(n: int = 4, length: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (n, length), generator=g)


def run_cfg(**method) -> RunConfig:
    kw = dict(first_layer=1, last_layers_kept=1, grad_samples=3, grad_seq_len=16)
    return RunConfig(method=LLMPrunerConfig(**{**kw, **method}))


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_count_matches_n_layers(family):
    model = make(family)
    dense = count_params(model)
    layer = count_params(find_decoder_stack(model).layers[0])
    structs = llm_pruner.find_structures(model, list(range(1, 7)))
    step = 6 * max(s.unit_params for s in structs)    # one group / channel more or less in each pruned layer
    res = llm_pruner.apply(model, tokens(), 2, run_cfg())
    removed = dense - count_params(model)
    assert res.record["params_removed"] == removed and res.removed_layers == [] and res.checkpoint[0] == "llm_pruner"
    assert abs(removed - 2 * layer) <= step
    sizes = res.record["layer_sizes"]
    assert set(sizes) == {str(i) for i in range(1, 7)}
    assert all(v["channels"] < v["channels_dense"] for v in sizes.values())
    # first and last layers untouched
    stack = find_decoder_stack(model)
    assert count_params(stack.layers[0]) == layer and count_params(stack.layers[7]) == layer


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_zero_changes_nothing(family):
    model, ref = make(family), make(family)
    x = tokens(2, 12, seed=1)
    res = llm_pruner.apply(model, tokens(), 2, run_cfg(width_ratio=0.0))
    assert res.record["params_removed"] == 0 and res.checkpoint == ("stock", {})
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)


def _zero_unit(struct, unit: int) -> None:
    with torch.no_grad():
        for m in struct.members:
            idx = m.flat_indices(torch.tensor([unit]))
            m.linear.weight.index_fill_(m.axis, idx, 0.0)
            if m.axis == 0 and m.linear.bias is not None:
                m.linear.bias.index_fill_(0, idx, 0.0)


# every family with element1; every importance variant on llama (the scoring is family-independent)
@pytest.mark.parametrize("family,importance", [(f, "element1") for f in FAMILIES]
                         + [("llama", i) for i in ("element2", "vector", "mix")])
def test_useless_structure_is_pruned_first(family, importance):
    model = make(family)
    attn, mlp = llm_pruner.find_structures(model, [3])
    _zero_unit(attn, attn.n_units - 1 if family != "opt" else 2)
    _zero_unit(mlp, 5)
    res = llm_pruner.apply(model, tokens(), 2, run_cfg(width_ratio=0.25, importance=importance,
                                                       attention_unit="kv-group"))
    sizes = res.record["layer_sizes"]["3"]
    assert sizes["kv_groups"] == sizes["kv_groups_dense"] - 1 and sizes["channels"] == 96
    attn, mlp = llm_pruner.find_structures(model, [3])
    for s in (attn, mlp):
        for m in s.members:
            w = m.linear.weight
            norms = w.abs().sum(1 - m.axis)            # per kept row (axis 0) or column (axis 1)
            assert (norms > 0).all(), f"{s.kind}: a zeroed unit survived in {tuple(w.shape)}"


def _q_head_rows(model, layer: int) -> torch.Tensor:
    """[q heads, head_dim * hidden] of layer's q_proj."""
    attn = llm_pruner.find_structures(model, [layer], "head")[0]
    q = attn.members[0]
    return q.linear.weight.detach().reshape(-1, q.size * q.linear.in_features)


@pytest.mark.parametrize("importance", ["element1", "vector"])
def test_least_important_q_heads_go_within_each_kv_group(importance):
    """Heads 1 and 2 (KV group 0) and 6 (group 1) carry nothing: each group loses one head, the least important
    of that group (1 and 2 tie: the lower index is kept), so the useless head 1 stays while a global choice would
    have removed it; k/v stay whole and the attention pairs 3 q heads with each KV head."""
    model = make("llama", **EIGHT_Q_TWO_KV)
    attn = llm_pruner.find_structures(model, [3], "head")[0]
    assert (attn.kind, attn.n_units, attn.n_groups) == ("q_heads", 8, 2)
    for h in (1, 2, 6):
        _zero_unit(attn, h)
    dense_q = _q_head_rows(model, 3).clone()
    k_before = model.model.layers[3].self_attn.k_proj.weight.detach().clone()
    res = llm_pruner.apply(model, tokens(), 2, run_cfg(width_ratio=0.25, importance=importance))
    assert torch.equal(_q_head_rows(model, 3), dense_q[[0, 1, 3, 4, 5, 7]])
    a = model.model.layers[3].self_attn
    assert torch.equal(a.k_proj.weight, k_before) and a.v_proj.out_features == 2 * a.head_dim
    assert a.num_key_value_groups == 3 and a.o_proj.in_features == 6 * a.head_dim
    assert res.record["layer_sizes"]["3"]["heads_per_kv_group"] == 3


@pytest.mark.parametrize("family", GQA_FAMILIES)
def test_removing_q_heads_equals_zeroing_their_o_proj_columns(family):
    """A q head reaches the output only through its o_proj columns: the model without heads 1, 2 (group 0) and
    5, 6 (group 1) of layer 3 gives the logits of the dense model with those columns zeroed; removing none
    changes nothing."""
    x = tokens(2, 20, seed=1)
    model, ref = make(family, **EIGHT_Q_TWO_KV), make(family, **EIGHT_Q_TWO_KV)
    attn = llm_pruner.find_structures(model, [3], "head")[0]
    llm_pruner.prune_structure(attn, torch.arange(8))
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)
    llm_pruner.prune_structure(attn, torch.tensor([0, 3, 4, 7]))
    assert model.model.layers[3].self_attn.num_key_value_groups == 2
    o = llm_pruner.find_structures(ref, [3], "head")[0].members[1]
    with torch.no_grad():
        o.linear.weight.index_fill_(1, o.flat_indices(torch.tensor([1, 2, 5, 6])), 0.0)
        torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="every group must keep the same number"):
        llm_pruner.prune_structure(llm_pruner.find_structures(model, [4], "head")[0], torch.tensor([0, 1, 2, 4]))


@pytest.mark.parametrize("overrides", [EIGHT_Q_TWO_KV, dict(num_key_value_heads=1)])
def test_every_kv_group_of_a_layer_keeps_the_same_number_of_q_heads(overrides):
    """Sized by the target (ratio chosen), with 4 q heads per group and with one KV head (MQA, whose attention
    kv-group pruning leaves whole): every pruned layer keeps k/v and the same q heads per group."""
    model = make("llama", **overrides)
    res = llm_pruner.apply(model, tokens(), 2, run_cfg())
    assert (res.record["attn_unit"], res.record["label"]) == ("head", "llm_pruner")
    n_kv = model.config.num_key_value_heads
    for i in range(1, 7):
        a = model.model.layers[i].self_attn
        n_q, sizes = a.q_proj.out_features // a.head_dim, res.record["layer_sizes"][str(i)]
        assert a.k_proj.out_features == a.v_proj.out_features == n_kv * a.head_dim
        assert n_q == n_kv * a.num_key_value_groups == sizes["heads"] == n_kv * sizes["heads_per_kv_group"]
        assert 1 <= a.num_key_value_groups < model.config.num_attention_heads // n_kv


@pytest.mark.parametrize("family,unit", [(f, "head") for f in FAMILIES] + [("llama", "kv-group")])
def test_pruned_model_generates_with_cache_and_round_trips(family, unit, tmp_path):
    model = make(family)
    res = llm_pruner.apply(model, tokens(), 2, run_cfg(attention_unit=unit))
    per_group = res.record["layer_sizes"]["3"]["heads_per_kv_group"]
    assert per_group == (1 if family == "opt" or unit == "head" else 2)    # llama/qwen2: 2 q heads per group
    model.eval()
    x = tokens(2, 10, seed=2)
    with torch.no_grad():
        logits = model(x).logits
    assert logits.shape == (2, 10, 512) and torch.isfinite(logits).all()
    prompt = tokens(1, 6, seed=3)
    cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    assert cached.shape == (1, 14)
    plain = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)
    fmt = save_checkpoint(model, None, tmp_path / "m", {"method": "llm_pruner"}, "llm_pruner",
                          llm_pruner.checkpoint_fields(model))
    assert fmt == "llm_pruner" and not (tmp_path / "m" / "config.json").exists()
    saved = json.loads((tmp_path / "m" / "llm_pruner_config.json").read_text())["layer_sizes"]
    dense_per_group = res.record["layer_sizes"]["3"]["heads_per_kv_group_dense"]
    assert saved["3"]["heads_per_kv_group"] == per_group and saved["0"]["heads_per_kv_group"] == dense_per_group
    loaded = llm_streamline.load_pruned(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, logits)
    assert count_params(loaded) == count_params(model)


def test_checkpoint_sizes_without_heads_per_group_keep_the_dense_ratio():
    """Checkpoints written before per-head pruning hold kv_groups and channels only."""
    model = make("llama")
    llm_pruner.cut_to_saved_sizes(model, {"layer_sizes": {"3": {"kv_groups": 1, "channels": 100}}})
    a = model.model.layers[3].self_attn
    assert (a.q_proj.out_features, a.k_proj.out_features, a.num_key_value_groups) == (2 * 16, 16, 2)
    with pytest.raises(ValueError, match="cannot keep 3 q heads per KV group of 2"):
        llm_pruner.cut_to_saved_sizes(model, {"layer_sizes": {"4": {"kv_groups": 2, "heads_per_kv_group": 3,
                                                                              "channels": 128}}})


def test_taylor_scores_equal_hand_computed_values():
    model = make("llama", hidden_size=16, intermediate_size=8, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    x = tokens(2, 8, seed=4)
    attn, mlp = llm_pruner.find_structures(model, [1])
    params = [m.linear.weight for s in (attn, mlp) for m in s.members]
    g, fisher = llm_pruner.taylor_gradients(model, x, params)
    # by hand: per-sequence gradients of the mean next-token loss
    per = []
    for j in range(2):
        model.zero_grad()
        model(input_ids=x[j:j + 1], labels=x[j:j + 1]).loss.backward()
        per.append({n: p.grad.clone() for n, p in model.model.layers[1].named_parameters()})
    model.zero_grad()
    layer = model.model.layers[1]
    # MLP channel 3: gate row 3, up row 3, down column 3
    pieces = [(layer.mlp.gate_proj.weight[3], "mlp.gate_proj.weight", (3,)),
              (layer.mlp.up_proj.weight[3], "mlp.up_proj.weight", (3,)),
              (layer.mlp.down_proj.weight[:, 3], "mlp.down_proj.weight", (slice(None), 3))]
    e1 = vec = e2 = mix = 0.0
    for w, name, ix in pieces:
        gr = (per[0][name][ix] + per[1][name][ix]) / 2
        f = (per[0][name][ix] ** 2 + per[1][name][ix] ** 2) / 2
        wg = w.detach() * gr
        e1 += wg.abs().sum().item()
        vec += abs(wg.sum().item())          # each matrix's row (gate, up) / column (down) of channel 3
        e2 += (w.detach() ** 2 * f).sum().item()
        mix += (wg - 0.5 * w.detach() ** 2 * f).abs().sum().item()
    scores = {k: llm_pruner.structure_scores(mlp, g, fisher, k) for k in ("element1", "vector", "element2", "mix")}
    assert scores["element1"][3].item() == pytest.approx(e1, rel=1e-5)
    assert scores["vector"][3].item() == pytest.approx(vec, rel=1e-4, abs=1e-9)
    assert scores["element2"][3].item() == pytest.approx(e2, rel=1e-5)
    assert scores["mix"][3].item() == pytest.approx(mix, rel=1e-5)
    # attention KV group 1 (head_dim 4, 2 q heads per group): q rows 8..15, k/v rows 4..7, o columns 8..15
    a = layer.self_attn
    hand = 0.0
    for w, name, ix in [(a.q_proj.weight[8:16], "self_attn.q_proj.weight", (slice(8, 16),)),
                        (a.k_proj.weight[4:8], "self_attn.k_proj.weight", (slice(4, 8),)),
                        (a.v_proj.weight[4:8], "self_attn.v_proj.weight", (slice(4, 8),)),
                        (a.o_proj.weight[:, 8:16], "self_attn.o_proj.weight", (slice(None), slice(8, 16)))]:
        hand += (w.detach() * (per[0][name][ix] + per[1][name][ix]) / 2).abs().sum().item()
    assert llm_pruner.structure_scores(attn, g, fisher, "element1")[1].item() == pytest.approx(hand, rel=1e-5)
    # one q head under GQA (unit "head"): q head 3 = q rows 12..15 and o columns 12..15; k/v are not its own
    heads = llm_pruner.find_structures(model, [1], "head")[0]
    assert (heads.kind, heads.n_units, heads.n_groups) == ("q_heads", 4, 2)
    q_grad = (per[0]["self_attn.q_proj.weight"] + per[1]["self_attn.q_proj.weight"]) / 2
    o_grad = (per[0]["self_attn.o_proj.weight"] + per[1]["self_attn.o_proj.weight"]) / 2
    q_wg = a.q_proj.weight.detach()[12:16] * q_grad[12:16]              # [4 q rows, 16 inputs]
    o_wg = a.o_proj.weight.detach()[:, 12:16] * o_grad[:, 12:16]        # [16 outputs, 4 o columns]
    e1 = q_wg.abs().sum().item() + o_wg.abs().sum().item()
    vec = q_wg.sum(1).abs().sum().item() + o_wg.sum(0).abs().sum().item()   # |sum| per q row, per o column
    assert llm_pruner.structure_scores(heads, g, fisher, "element1")[3].item() == pytest.approx(e1, rel=1e-5)
    assert llm_pruner.structure_scores(heads, g, fisher, "vector")[3].item() == pytest.approx(vec, rel=1e-4)


def test_vector_importance_on_a_hand_computed_example():
    """LLM-Pruner's `vectorize`: per matrix, |sum of w*g| over each row of the structure, summed over rows and
    matrices. Unit 0 = rows 0-1 of A and columns 0-1 of B (input columns: rows of B^T)."""
    a, b = nn.Linear(2, 4, bias=False), nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        a.weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))
        b.weight.copy_(torch.tensor([[2.0, -1.0, 0.0, 0.0]]))
    g = {id(a.weight): torch.tensor([[1.0, 1.0], [1.0, -1.0], [0.0, 0.0], [0.0, 0.0]]),
         id(b.weight): torch.tensor([[-1.0, -1.0, 0.0, 0.0]])}
    s = llm_pruner.Structure("mlp", 0, nn.Module(), 2, [llm_pruner.Member(a, 0, 2), llm_pruner.Member(b, 1, 2)])
    # w*g: A rows 0, 1 -> [1, -2], [3, -1]; B columns 0, 1 -> [-2], [1]
    # vector = |1 - 2| + |3 - 1| + |-2| + |1| = 6; element1 = 1 + 2 + 3 + 1 + 2 + 1 = 10;
    # the pre-issue-14 rule (one |.| over the whole structure) would give |1 - 2 + 3 - 1 - 2 + 1| = 0
    assert llm_pruner.structure_scores(s, g, {}, "vector")[0].item() == pytest.approx(6.0)
    assert llm_pruner.structure_scores(s, g, {}, "element1")[0].item() == pytest.approx(10.0)
    assert llm_pruner.structure_scores(s, g, {}, "vector")[1].item() == 0.0
    with pytest.raises(ValueError, match="mix needs the Fisher diagonal"):
        llm_pruner.structure_scores(s, g, {}, "mix")


def test_rows_are_labelled_by_their_attention_unit():
    gqa_groups = llm_pruner.apply(make("llama"), tokens(), 2, run_cfg(attention_unit="kv-group"))
    gqa_heads = llm_pruner.apply(make("llama"), tokens(), 2, run_cfg())
    mha = llm_pruner.apply(make("llama", num_key_value_heads=4), tokens(), 2, run_cfg(attention_unit="kv-group"))
    assert make("llama").config.num_key_value_heads < make("llama").config.num_attention_heads
    assert (gqa_groups.record["attn_unit"], gqa_groups.record["label"]) == ("kv-group", "llm_pruner_style(kv-group)")
    assert (gqa_heads.record["attn_unit"], gqa_heads.record["label"]) == ("head", "llm_pruner")
    assert (mha.record["attn_unit"], mha.record["label"]) == ("head", "llm_pruner")   # a group is one head
    assert gqa_heads.record["importance_original"] == "param_first"
    assert LLMPrunerConfig().attention_unit == "head"


def test_attention_unit_enters_the_stage_key_only_where_it_matters():
    """Stage entries cached before the option existed (other methods; llm_pruner's KV groups) keep their keys,
    and so do those cached before each method had its own schema: the key holds every option the single schema
    had, at its defaults where the method has no such option."""
    from llm_streamline.config import LEGACY_METHOD_KEY
    from llm_streamline.recipes.baseline import method_key

    old = {k: v for k, v in LEGACY_METHOD_KEY.items() if k != "attention_unit"}
    assert method_key(ShortGPTConfig()) == {**old, "name": "shortgpt"}
    assert method_key(SLEBConfig(sleb_samples=8)) == {**old, "name": "sleb", "sleb_samples": 8}
    assert method_key(LLMPrunerConfig(attention_unit="kv-group")) == {**old, "name": "llm_pruner"}
    assert method_key(LLMPrunerConfig())["attention_unit"] == "head"


def test_unsupported_attention_fails_with_one_line():
    with pytest.raises(llm_pruner.UnsupportedLayerError, match="Phi3Attention"):
        llm_pruner.apply(make("phi3"), tokens(), 2, run_cfg())


def test_pipeline_runs_llm_pruner(tmp_path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = to_run_config(compose(config_name="config",
                                    overrides=["experiment=smoke", "method=llm_pruner", "replacement=none",
                                               "eval.limit=4", "eval.speed=false"]))
    recipes.run(cfg, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["params"]["pruned"] < saved["params"]["dense"]
    assert saved["layers"]["removed_indices"] == [] and saved["baseline"]["params_removed"] > 0
    base = saved["baseline"]     # tiny-llama has GQA (2 q heads per KV head): single q heads were pruned
    assert (base["attn_unit"], base["label"]) == ("head", "llm_pruner")
    assert all(v["heads_per_kv_group"] < v["heads_per_kv_group_dense"] and v["kv_groups"] == v["kv_groups_dense"]
               for v in base["layer_sizes"].values())
    loaded = llm_streamline.load_pruned(saved["checkpoint"])
    assert count_params(loaded) == saved["params"]["pruned"]


@pytest.mark.parametrize("method", ["llm_pruner", "shortgpt"])
def test_baselines_sized_like_a_streamline_ffn_row(method, tmp_path):
    """method.match_replacement=ffn: the target is what LLM-Streamline with an FFN in place of n layers removes
    net; width pruning meets it within one unit step, layer removal differs by the FFN (< one layer's MLP)."""
    from llm_streamline.config import ReplacementConfig
    from llm_streamline.replace import replacement_param_count

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = to_run_config(compose(config_name="config", overrides=[
            "experiment=smoke", f"method={method}", "method.match_replacement=ffn", "eval.limit=2",
            "eval.speed=false", "eval.perplexity=false", "save=false"]))
    saved = recipes.run(cfg, tmp_path)
    model = make("llama")
    stack = find_decoder_stack(model)
    layer = count_params(stack.layers[0])
    ffn = replacement_param_count(ReplacementConfig(type="ffn"), model)
    p = saved["params"]
    eq = p["equal_size"]
    assert eq["replacement"] == "ffn" and eq["n"] == 2 and eq["target_net_removed"] == 2 * layer - ffn
    assert p["net_removed"] == p["dense"] - p["pruned"]
    assert eq["difference"] == p["net_removed"] - eq["target_net_removed"]
    assert abs(eq["difference"]) < eq["mlp_params"]
    if method == "shortgpt":
        assert eq["difference"] == ffn
    else:
        assert saved["baseline"]["target_params_removed"] == 2 * layer - ffn
        assert abs(eq["difference"]) <= max(s.unit_params for s in llm_pruner.find_structures(model, [1])) * 8


def _reference_gradients(model, x, params):
    """The straightforward computation (LLM-Pruner's before gradients went into .grad): per-sequence
    torch.autograd.grad, float32 mean and mean square kept beside the weights."""
    g = {id(p): torch.zeros_like(p, dtype=torch.float32) for p in params}
    f = {id(p): torch.zeros_like(p, dtype=torch.float32) for p in params}
    for j in range(x.shape[0]):
        grads = torch.autograd.grad(model(input_ids=x[j:j + 1], labels=x[j:j + 1]).loss, params)
        for p, gr in zip(params, grads):
            g[id(p)] += gr.float() / x.shape[0]
            f[id(p)] += gr.float() ** 2 / x.shape[0]
    return g, f


@pytest.mark.parametrize("family", ["llama", "gptneox"])
def test_gradients_in_dot_grad_give_the_reference_scores_and_decisions(family):
    model = make(family)
    x = tokens(3, 16, seed=2)
    structs = llm_pruner.find_structures(model, list(range(1, 7)), "head")
    params = [m.linear.weight for s in structs for m in s.members]
    ref_g, ref_f = _reference_gradients(model, x, params)
    g, fisher = llm_pruner.taylor_gradients(model, x, params)
    assert all(g[id(p)] is p.grad and p.grad.dtype == p.dtype for p in params)   # no copy of the scored weights
    for s in structs:
        for imp in llm_pruner.IMPORTANCE:
            ref = llm_pruner.structure_scores(s, ref_g, ref_f, imp)
            got = llm_pruner.structure_scores(s, g, fisher, imp)
            assert torch.allclose(got, ref, rtol=1e-4, atol=1e-7 * float(ref.abs().max())), (s.layer, s.kind, imp)
            assert llm_pruner.units_to_keep(got, s, 1) == llm_pruner.units_to_keep(ref, s, 1)
    # apply frees every gradient it accumulated
    model.zero_grad(set_to_none=True)
    llm_pruner.apply(model, x, 2, run_cfg(grad_seq_len=16))
    assert all(p.grad is None for p in model.parameters())
