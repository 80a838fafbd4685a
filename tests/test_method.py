"""The method on tiny random-weight models of every supported family.

Checks: block selection on a constructed case with a known answer; pruned-but-not-replaced logits equal
the same model with the block skipped; each replacement type trains and lowers its loss; generation with
a KV cache after pruning equals generation without one; save/load round trip gives identical logits.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from llm_streamline.config import ReplacementConfig, TrainConfig
from llm_streamline.importance import choose_block, lowest_bi_layers, similarity_profile
from llm_streamline.models.anatomy import anatomy_of
from llm_streamline.models.checkpoints import load_pruned, save_checkpoint
from llm_streamline.models.layers import find_decoder_stack, remove_block, run_layers
from llm_streamline.models.loading import TINY_CONFIGS, tiny_model
from llm_streamline.replace import build_replacement, export_stock, slot_checkpoint
from llm_streamline.train import train_lm, train_mse, write_teacher_shards

FAMILIES = list(TINY_CONFIGS)
VOCAB = 512
SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def make(family: str, seed: int = 0):
    return tiny_model(family, VOCAB, special_ids=SPECIAL, seed=seed).eval()


def ids(n=4, t=24, seed=0):
    return torch.randint(3, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def make_identity(layer: nn.Module, hidden: int) -> None:
    """Zero every linear map that writes into the residual stream: the layer then returns its input."""
    for m in layer.modules():
        if isinstance(m, nn.Linear) and m.out_features == hidden:
            nn.init.zeros_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def zero_attention(layer: nn.Module, hidden: int) -> None:
    """Silence a layer's attention so that the block becomes a per-token map a replacement can learn
    (a random model's attention over random tokens is noise no per-token network can fit)."""
    for name, m in layer.named_modules():
        if ("attn" in name or "attention" in name) and isinstance(m, nn.Linear) and m.out_features == hidden:
            nn.init.zeros_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    if hasattr(layer, "pre_feedforward_layernorm"):
        # Gemma normalises the attention branch itself (post_attention_layernorm, scale 1 + w): a zero
        # branch then has an unbounded gradient. w = -1 closes the branch for good.
        nn.init.constant_(layer.post_attention_layernorm.weight, -1.0)


def amplify_mlp(layer: nn.Module, gain: float = 4.0) -> None:
    """Scale a layer's MLP weights up so that its contribution stands out of the init noise."""
    for name, m in layer.named_modules():
        if not ("attn" in name or "attention" in name) and isinstance(m, nn.Linear):
            m.weight.data.mul_(gain)


def skip_hooks(stack, start, end):
    def identity(module, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        return (x,) + tuple(out[1:]) if isinstance(out, tuple) else x
    return [stack.layers[i].register_forward_hook(identity, with_kwargs=True) for i in range(start, end)]


class _FakeTokenizer:
    def save_pretrained(self, path):
        pass


@pytest.mark.parametrize("family", FAMILIES)
def test_block_selection_finds_the_identity_block(family):
    model = make(family)
    stack = find_decoder_stack(model)
    hidden = stack.config.hidden_size
    for i in (4, 5):
        make_identity(stack.layers[i], hidden)
    prof = similarity_profile(model, ids(), ns=[1, 2, 3], batch_size=2, progress=False)
    assert choose_block(prof, 2, "cosine") == 4
    assert prof.mean_cos[2][4] == pytest.approx(1.0, abs=1e-5)
    assert choose_block(prof, 2, "angular") == 4
    assert lowest_bi_layers(prof, 2) == [4, 5]


@pytest.mark.parametrize("family", FAMILIES)
def test_last_layer_is_scored_unnormed(family):
    """x^(L) must be the last layer's raw output, not the final-norm output of output_hidden_states."""
    model = make(family)
    L = find_decoder_stack(model).num_layers
    x = ids(2, 16)
    cap = run_layers(model, x, outputs_at=(L - 2, L - 1))
    with torch.no_grad():
        hs = model(x, output_hidden_states=True).hidden_states
    assert not torch.allclose(cap.outputs[L - 1], hs[-1])  # hs[-1] went through the final norm
    assert torch.allclose(cap.outputs[L - 2], hs[L - 1], atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_logits_equal_block_skipped_and_cache_generation(family):
    model = make(family)
    x = ids(2, 20)
    hooks = skip_hooks(find_decoder_stack(model), 2, 5)
    with torch.no_grad():
        ref = model(x).logits
    for h in hooks:
        h.remove()
    pruned = copy.deepcopy(model)
    block = remove_block(pruned, 2, 3, [])
    assert block.as_dict()["kept"] == 5 and pruned.config.get_text_config().num_hidden_layers == 5
    with torch.no_grad():
        got = pruned(x).logits
    assert torch.equal(got, ref)
    lt = getattr(model.config, "layer_types", None)
    if lt is not None:
        assert pruned.config.layer_types == lt[:2] + lt[5:]
    g_cache = pruned.generate(x[:1, :8], max_new_tokens=6, do_sample=False, use_cache=True)
    g_plain = pruned.generate(x[:1, :8], max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(g_cache, g_plain)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rtype", ["ffn", "swiglu", "layer", "layers"])
def test_replacement_trains_and_generates(family, rtype, tmp_path):
    model = make(family)
    start, n = 2, 3
    stack = find_decoder_stack(model)
    for layer in stack.layers[start:start + n]:
        zero_attention(layer, stack.config.hidden_size)
        amplify_mlp(layer)
    blocks = ids(136, 16, seed=1)
    probe = run_layers(model, blocks[:1], outputs_at=(start,))
    lr = 3e-3 if rtype in ("ffn", "swiglu") else 1e-4  # whole layers move faster per unit of lr
    cfg = TrainConfig(batch_size=8, lr=lr, min_lr=lr / 10, warmup_ratio=0.0, epochs=1)
    train_sh = write_teacher_shards(model, blocks[:128], start, n, tmp_path / "train", 8)
    val_sh = write_teacher_shards(model, blocks[128:], start, n, tmp_path / "val", 8)
    pruned = copy.deepcopy(model)
    pst = find_decoder_stack(pruned)
    rcfg = ReplacementConfig(type=rtype, num_layers=2)
    slot = build_replacement(rcfg, list(pst.layers[start:start + n]), pst.config, probe.output_is_tuple,
                             anatomy_of(model, start))
    log = train_mse(model, slot, start, blocks[:128], train_sh, val_sh, cfg, seed=0)
    assert log.best_val_loss < 0.998 * log.initial_val_loss
    remove_block(pruned, start, n, slot)
    x = ids(1, 8, seed=3)
    g_cache = pruned.generate(x, max_new_tokens=6, do_sample=False, use_cache=True)
    g_plain = pruned.generate(x, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(g_cache, g_plain)
    # save / load round trip
    with torch.no_grad():
        before = pruned(x).logits
    fmt = save_checkpoint(pruned, _FakeTokenizer(), tmp_path / "model", {"test": True},
                          *slot_checkpoint(rcfg, pruned, start))
    if rtype in ("layer", "layers"):
        assert fmt == "stock"
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()  # stock, no project code
    else:
        assert fmt == "streamline" and not (tmp_path / "model" / "config.json").exists()
        again = load_pruned(tmp_path / "model")
    with torch.no_grad():
        assert torch.equal(again(x).logits, before)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "phi3", "opt", "gptneox", "gemma2"])
def test_swiglu_exports_to_an_exact_stock_layer(family, tmp_path):
    model = make(family)
    pruned = copy.deepcopy(model)
    pst = find_decoder_stack(pruned)
    ref_layer = pst.layers[2]
    slot = build_replacement(ReplacementConfig(type="swiglu"), list(pst.layers[2:5]), pst.config,
                             anatomy=anatomy_of(model, 2))
    with torch.no_grad():  # move it away from its initial copy
        for p in slot[0].parameters():
            p.add_(0.01 * torch.randn_like(p))
    remove_block(pruned, 2, 3, slot)
    x = ids(2, 12)
    with torch.no_grad():
        before = pruned(x).logits
    export_stock(pruned, 2, ref_layer)
    pruned.save_pretrained(tmp_path / "stock")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "stock").eval()
    with torch.no_grad():
        assert torch.allclose(again(x).logits, before, atol=1e-5)


def test_a_stock_export_that_would_not_be_exact_is_refused(monkeypatch):
    """The export is checked by running the slot and the new layer on the same input: a layer given the slot's
    norm in the wrong place (as an anatomy mistake would) is refused and the model left as it was."""
    import dataclasses

    from llm_streamline import replace as replace_mod

    model = make("llama")
    pst = find_decoder_stack(model)
    ref_layer = pst.layers[1]
    slot = build_replacement(ReplacementConfig(type="swiglu"), list(pst.layers[2:5]), pst.config,
                             anatomy=anatomy_of(model, 2))
    with torch.no_grad():
        for p in slot[0].parameters():
            p.add_(0.01 * torch.randn_like(p))
    remove_block(model, 2, 3, slot)
    real = replace_mod.anatomy_of
    monkeypatch.setattr(replace_mod, "anatomy_of", lambda m, i: dataclasses.replace(
        real(m, i), mlp_norm=real(m, i).attention_norm))
    with pytest.raises(ValueError, match="no exact stock layer for this slot"):
        export_stock(model, 2, ref_layer)
    assert find_decoder_stack(model).layers[2] is slot[0]


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_lm_loss_training_lowers_validation_loss(family):
    model = make(family)
    blocks = ids(40, 16, seed=2)
    pruned = copy.deepcopy(model)
    pst = find_decoder_stack(pruned)
    slot = build_replacement(ReplacementConfig(type="ffn"), list(pst.layers[2:5]), pst.config)
    remove_block(pruned, 2, 3, slot)
    log = train_lm(pruned, slot, blocks[:32], blocks[32:], TrainConfig(batch_size=4, lr=3e-3, epochs=2,
                                                                        warmup_ratio=0.0), seed=0)
    assert log.best_val_loss < log.initial_val_loss
    # the frozen model did not move
    for name, p in pruned.named_parameters():
        if not name.startswith(tuple(n for n, m in pruned.named_modules() if m is slot[0])):
            assert not p.requires_grad


def test_training_is_deterministic(tmp_path):
    results = []
    for run in range(2):
        model = make("llama")
        blocks = ids(12, 16, seed=1)
        pst = find_decoder_stack(model)
        slot = build_replacement(ReplacementConfig(type="ffn"), list(pst.layers[2:4]), pst.config)
        tr = write_teacher_shards(model, blocks[:8], 2, 2, tmp_path / f"t{run}", 4)
        va = write_teacher_shards(model, blocks[8:], 2, 2, tmp_path / f"v{run}", 4)
        train_mse(model, slot, 2, blocks[:8], tr, va, TrainConfig(batch_size=4, epochs=2), seed=0)
        results.append(torch.cat([p.detach().flatten() for p in slot[0].parameters()]))
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_call_arguments_depend_on_shape_not_tokens(family):
    """train_mse captures a layer's call arguments once per batch shape and reuses them: that is right only if
    they do not depend on the tokens (unpadded blocks). Two different batches of one shape must give equal
    arguments at every layer, including the sliding-window layers of Gemma and Mistral."""
    model = make(family)
    stack = find_decoder_stack(model)
    where = tuple(range(stack.num_layers))
    a = run_layers(model, ids(seed=1), kwargs_at=where, stack=stack).call_kwargs
    b = run_layers(model, ids(seed=2), kwargs_at=where, stack=stack).call_kwargs
    for i in where:
        assert a[i].keys() == b[i].keys()
        for k, v in a[i].items():
            flat_a = v if isinstance(v, (tuple, list)) else (v,)
            flat_b = b[i][k] if isinstance(b[i][k], (tuple, list)) else (b[i][k],)
            for x, y in zip(flat_a, flat_b):
                if isinstance(x, torch.Tensor):
                    assert torch.equal(x, y), (family, i, k)
                else:
                    assert x == y, (family, i, k)


@pytest.mark.parametrize("family", ["llama", "opt", "gemma3"])
def test_block_perplexity_equals_the_perplexity_of_the_pruned_model(family):
    """sparsity.importance=perplexity scores start l by the calibration perplexity with [l, l+n) skipped:
    the same number as the perplexity of the model with the block actually removed."""
    from llm_streamline.evaluate.perplexity import perplexity
    from llm_streamline.importance import block_perplexities

    model, x = make(family), ids(n=4, t=16)
    scores = block_perplexities(model, x, n=2, batch_size=2, progress=False)
    assert len(scores) == find_decoder_stack(model).num_layers - 1
    for start in (0, 3, 6):
        pruned = copy.deepcopy(model)
        remove_block(pruned, start, 2, [])
        assert scores[start] == pytest.approx(perplexity(pruned, x, batch_size=2)["ppl"], rel=1e-5)
