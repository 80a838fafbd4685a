"""The pre-norm FFN, the relative MSE, checkpoint selection and distillation through the frozen tail,
on tiny random-weight models."""

from __future__ import annotations

import copy

import pytest
import torch

from llm_streamline.config import ReplacementConfig, TrainConfig
from llm_streamline.models.anatomy import anatomy_of
from llm_streamline.models.checkpoints import load_pruned, save_checkpoint
from llm_streamline.models.layers import find_decoder_stack, remove_block, run_layers
from llm_streamline.models.loading import TINY_CONFIGS, tiny_model
from llm_streamline.replace import build_replacement, slot_checkpoint
from llm_streamline.train import _mse, train_distill, train_mse, write_teacher_shards

VOCAB = 512
SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
# what each family's pre-MLP norm is called (the probe does not know these names; the test does)
PRE_MLP_NORM = {"gemma2": "pre_feedforward_layernorm", "gemma3": "pre_feedforward_layernorm",
                "opt": "final_layer_norm"}


def make(family: str, seed: int = 0):
    return tiny_model(family, VOCAB, special_ids=SPECIAL, seed=seed).eval()


def ids(n=4, t=24, seed=0):
    return torch.randint(3, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


class _FakeTokenizer:
    def save_pretrained(self, path):
        pass


@pytest.mark.parametrize("family", list(TINY_CONFIGS))
def test_prenorm_ffn_copies_the_pre_mlp_norm_starts_as_plain_pruning_and_round_trips(family, tmp_path):
    model = make(family)
    anatomy = anatomy_of(model, 2, ids(1, 12))
    path = anatomy.mlp_norm
    assert path == PRE_MLP_NORM.get(family, "post_attention_layernorm")
    pruned, plain = copy.deepcopy(model), copy.deepcopy(model)
    pst = find_decoder_stack(pruned)
    rcfg = ReplacementConfig(type="ffn", pre_norm=True)
    probe = run_layers(model, ids(1, 8), outputs_at=(2,))
    slot = build_replacement(rcfg, list(pst.layers[2:5]), pst.config, probe.output_is_tuple, anatomy)
    norm = pst.layers[2].get_submodule(path)
    assert type(slot[0].norm) is type(norm) and slot[0].norm is not norm
    assert all(torch.equal(a, b) for a, b in zip(slot[0].norm.parameters(), norm.parameters()))
    remove_block(pruned, 2, 3, slot)
    remove_block(plain, 2, 3, [])
    x = ids(2, 12, seed=4)
    with torch.no_grad():
        assert torch.equal(pruned(x).logits, plain(x).logits)  # zero output layer: the identity
        for p in slot[0].parameters():
            p.add_(0.05 * torch.randn_like(p))
        before = pruned(x).logits
    save_checkpoint(pruned, _FakeTokenizer(), tmp_path / "m", {}, *slot_checkpoint(rcfg, pruned, 2))
    with torch.no_grad():
        assert torch.equal(load_pruned(tmp_path / "m")(x).logits, before)


def test_relative_mse_weighs_every_token_alike():
    target = torch.ones(1, 3, 4)
    target[0, 1] *= 1000.0  # one massive-activation token
    pred = target * 1.1     # 10% error on every token
    assert _mse(pred, target, "include", "relative").item() == pytest.approx(0.01, rel=1e-5)
    absolute = _mse(pred, target, "include", "absolute").item()
    assert absolute == pytest.approx(((0.1 ** 2) * 2 + 100.0 ** 2) / 3, rel=1e-5)  # one token is all of it
    assert _mse(pred, target, "exclude", "relative").item() == pytest.approx(0.01, rel=1e-5)


@pytest.mark.parametrize("select", ["best", "final"])
@pytest.mark.parametrize("mse_target", ["absolute", "relative"])
def test_selection_keeps_the_weights_it_reports(select, mse_target, tmp_path):
    model = make("llama")
    blocks = ids(40, 16, seed=1)
    tr = write_teacher_shards(model, blocks[:32], 2, 3, tmp_path / "t", 4)
    va = write_teacher_shards(model, blocks[32:], 2, 3, tmp_path / "v", 4)
    pst = find_decoder_stack(copy.deepcopy(model))
    slot = build_replacement(ReplacementConfig(type="ffn"), list(pst.layers[2:5]), pst.config)
    cfg = TrainConfig(batch_size=4, epochs=3, lr=3e-2, min_lr=3e-2, warmup_ratio=0.0, select=select,
                      mse_target=mse_target, first_token="include")  # a high lr: the validation loss moves both ways
    log = train_mse(model, slot, 2, blocks[:32], tr, va, cfg, seed=0)
    with torch.no_grad():
        val = sum(_mse(slot[0](va.load(i)[0]), va.load(i)[1], "include", mse_target).item() * 4
                  for i in range(len(va))) / 8
    if select == "best":
        assert log.selected_step == log.best_step and val == pytest.approx(log.best_val_loss, rel=1e-5)
    else:
        assert log.selected_step == log.steps and val == pytest.approx(log.val_loss[-1][1], rel=1e-5)
    assert log.best_step != log.steps or log.val_loss[-1][1] == log.best_val_loss


@pytest.mark.parametrize("family", ["llama", "gemma2", "opt"])
def test_distillation_is_zero_for_the_teachers_own_layer_and_trains_only_the_slot(family):
    model = make(family)
    blocks = ids(24, 16, seed=2)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    # a one-layer block replaced by a copy of that layer: the pruned model is the dense one, KL = 0
    pruned = copy.deepcopy(model)
    pst = find_decoder_stack(pruned)
    slot = build_replacement(ReplacementConfig(type="layer"), [pst.layers[3]], pst.config)
    remove_block(pruned, 3, 1, slot)
    cfg = TrainConfig(loss="distill", batch_size=4, epochs=1, max_steps=1, distill_alpha=1.0)
    log = train_distill(model, pruned, slot, 3, 1, blocks[:16], blocks[16:], cfg, seed=0)
    assert log.initial_val_loss == pytest.approx(0.0, abs=1e-5)
    # a three-layer block replaced by an FFN: the KL falls, the dense model and the frozen tail stay put
    with torch.no_grad():  # a block whose MLPs stand out of the init noise: something for the FFN to learn
        for layer in find_decoder_stack(model).layers[2:5]:
            for name, m in layer.named_modules():
                if isinstance(m, torch.nn.Linear) and "attn" not in name and "attention" not in name:
                    m.weight.mul_(4.0)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = copy.deepcopy(model)
    pst = find_decoder_stack(pruned)
    slot = build_replacement(ReplacementConfig(type="ffn"), list(pst.layers[2:5]), pst.config)
    remove_block(pruned, 2, 3, slot)
    frozen = {k: v.clone() for k, v in pruned.state_dict().items()}
    cfg = TrainConfig(loss="distill", batch_size=4, epochs=4, lr=3e-3, warmup_ratio=0.0, distill_temperature=2.0)
    log = train_distill(model, pruned, slot, 2, 3, blocks[:16], blocks[:8], cfg, seed=0)
    assert log.best_val_loss < 0.99 * log.initial_val_loss
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in dense_state.items())
    moved = {k for k, v in pruned.state_dict().items() if not torch.equal(v, frozen[k])}
    assert moved and all(".2.fc_" in k for k in moved), moved  # the slot's maps (in layer slot 2), nothing else


def compose_run(*overrides: str):
    from hydra import compose, initialize_config_dir

    from llm_streamline.cli import CONF_DIR, to_run_config

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_run_config(compose(config_name="config", overrides=list(overrides)))


@pytest.mark.parametrize("overrides", [("replacement=ffn_prenorm", "train=mse_relative", "train.max_steps=4"),
                                       ("replacement=ffn_prenorm", "train=distill", "train.select=final",
                                        "train.max_steps=3", "train.batch_size=4"),
                                       ("replacement=swiglu", "sparsity.start=0", "train.max_steps=2")])
def test_pipeline_trains_the_new_options(overrides, tmp_path):
    from llm_streamline import recipes

    cfg = compose_run("experiment=smoke", "model=tiny-qwen3", *overrides)
    res = recipes.run(cfg, tmp_path)
    assert res["train"]["steps"] == cfg.train.max_steps
    assert res["train"]["selected_step"] == (cfg.train.max_steps if cfg.train.select == "final"
                                             else res["train"]["best_step"])
    assert res["replacement"]["pre_norm"] == cfg.replacement.pre_norm and res["perplexity"]["pruned"]["ppl"] > 1
    assert res["layers"]["removed"][0] == (cfg.sparsity.start if cfg.sparsity.start is not None
                                           else res["layers"]["removed"][0])
    assert res["train_config"]["loss"] == cfg.train.loss
    p = res["params"]  # the row's net parameter count: what left the model minus what the slot brought back
    assert p["net_removed"] == p["dense"] - p["pruned"] == p["removed_layer_params"] - p["replacement_params"]


@pytest.mark.parametrize("family", list(TINY_CONFIGS))
@pytest.mark.parametrize("rtype", ["ffn", "swiglu"])
def test_mlp_slot_at_layer_0_keeps_the_cache_length_and_cached_decoding_exact(family, rtype):
    """transformers reads the cache's length from layer 0 (positions and masks of the next step): without the
    slot's placeholder entry it reads 0 and an incremental decoding step is wrong (checked: off by up to 0.14
    in the logits on the tiny OPT)."""
    model = make(family)
    pruned = copy.deepcopy(model)
    pst = find_decoder_stack(pruned)
    probe = run_layers(model, ids(1, 8), outputs_at=(0,))
    slot = build_replacement(ReplacementConfig(type=rtype), list(pst.layers[0:2]), pst.config,
                             probe.output_is_tuple, anatomy_of(model, 0))
    with torch.no_grad():  # move it off the identity, so the slot's output matters
        for p in slot[0].parameters():
            p.add_(0.05 * torch.randn_like(p))
    remove_block(pruned, 0, 2, slot)
    x = ids(2, 20, seed=5)  # longer than Gemma's sliding window of 16
    with torch.no_grad():
        out = pruned(x, use_cache=True)
        cache = out.past_key_values
        assert cache.get_seq_length() == x.shape[1]
        nxt = out.logits[:, -1:].argmax(-1)
        step = pruned(nxt, past_key_values=cache, use_cache=True).logits[:, -1]
        full = pruned(torch.cat([x, nxt], 1), use_cache=False).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)
    cached = pruned.generate(x[:1, :8], max_new_tokens=12, do_sample=False, use_cache=True)
    plain = pruned.generate(x[:1, :8], max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


@pytest.mark.parametrize("rtype,layers,removed", [("none", 2, 2), ("layer", 2, 3), ("layers", 2, 4), ("ffn", 2, 2)])
def test_net_count_removes_the_replacements_size_in_layers_more(rtype, layers, removed):
    from llm_streamline.preflight import resolve_block_size

    cfg = compose_run("experiment=smoke", "model=tiny-llama", f"replacement={rtype}", f"sparsity.layers={layers}",
                      "sparsity.count=net")
    model = tiny_model("llama", VOCAB, special_ids=SPECIAL)
    # tiny llama: the FFN (width 128 on d=64) has 16.6k parameters, a decoder layer 37.0k: 0.45 layer rounds to 0
    assert resolve_block_size(cfg, model, find_decoder_stack(model)) == removed


@pytest.mark.parametrize("k", [2, 3])
def test_k_decoder_layers_train_in_place_of_half_the_model(k, tmp_path):
    """replacement=layers at 4 of 8 layers (as 15 of 30): built from the block's first k layers, trained by MSE."""
    model = make("llama")
    blocks = ids(40, 16, seed=1)
    tr = write_teacher_shards(model, blocks[:32], 2, 4, tmp_path / "t", 8)
    va = write_teacher_shards(model, blocks[32:], 2, 4, tmp_path / "v", 8)
    pruned = copy.deepcopy(model)
    pst = find_decoder_stack(pruned)
    probe = run_layers(model, blocks[:1], outputs_at=(2,))
    slot = build_replacement(ReplacementConfig(type="layers", num_layers=k), list(pst.layers[2:6]), pst.config,
                             probe.output_is_tuple)
    assert len(slot) == k
    cfg = TrainConfig(batch_size=8, epochs=4, lr=1e-3, min_lr=1e-4, warmup_ratio=0.0)
    log = train_mse(model, slot, 2, blocks[:32], tr, va, cfg, seed=0)
    assert log.best_val_loss < 0.95 * log.initial_val_loss
    remove_block(pruned, 2, 4, slot)
    assert find_decoder_stack(pruned).num_layers == 8 - 4 + k


def test_teacher_shards_are_training_batches_whatever_the_forward_batch(tmp_path):
    """model.infer_batch_size sizes the forward passes that write cached pairs, not the shards: each shard stays
    one training batch (the ragged last one too), with the pairs one batch at a time would give."""
    model = make("llama")
    blocks = ids(18, 16, seed=3)
    one = write_teacher_shards(model, blocks, 2, 3, tmp_path / "one", 4)
    many = write_teacher_shards(model, blocks, 2, 3, tmp_path / "many", 4, forward_batch=12)
    assert many.index == one.index == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15], [16, 17]]
    for i in range(len(one)):
        for a, b in zip(one.load(i)[:2], many.load(i)[:2]):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
