"""One copy of the weights: the pruned model of every method is a second model over the dense one's tensors
(`share_weights`), built without writing into them, so the dense model stays bit-identical for the stages that
still need it (teacher, distillation, speed) and no method doubles the weights."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from hydra import compose, initialize_config_dir

from llm_streamline.cli import CONF_DIR, to_run_config
from llm_streamline.models.layers import find_decoder_stack, remove_block, share_weights
from llm_streamline.models.loading import tiny_model
from llm_streamline.recipes import baseline, common, streamline


def compose_run(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_run_config(compose(config_name="config", overrides=list(overrides)))


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k, v in before.items() if not torch.equal(after[k], v)]
    assert not changed, f"the dense model's weights changed: {changed[:3]}"


def shared_tensors(a, b) -> int:
    """How many of a's parameters live in b's storage."""
    ptrs = {p.data_ptr() for p in b.parameters()}
    return sum(p.data_ptr() in ptrs for p in a.parameters())


def test_share_weights_shares_storage_but_not_structure():
    model = tiny_model("llama", 128, seed=0)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = model(ids).logits
    pruned = share_weights(model)
    assert shared_tensors(pruned, model) == len(list(model.parameters()))
    assert all(p is not q for p, q in zip(pruned.parameters(), model.parameters()))   # own Parameter objects
    remove_block(pruned, 2, 3, [])
    pruned.requires_grad_(False)
    next(pruned.parameters()).data = torch.zeros(1)  # `.data =` replaces the pruned model's tensor only
    assert find_decoder_stack(model).num_layers == 8 and model.config.num_hidden_layers == 8
    assert find_decoder_stack(pruned).num_layers == 5 and pruned.config.num_hidden_layers == 5
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(model(ids).logits, logits)


def _ctx(tmp_path, *overrides: str) -> common.Run:
    cfg = compose_run("experiment=smoke", *overrides)
    ctx = common.start_run(cfg, tmp_path)
    common.load_dense_model(ctx)
    common.load_data(ctx)
    return ctx


@pytest.mark.parametrize("method", ["shortgpt", "gromov", "laco", "sleb", "llm_pruner"])
def test_baselines_share_the_dense_weights_and_leave_them_intact(method, tmp_path):
    extra = ["method.heal=lora", "train.max_steps=2"] if method == "gromov" else []  # gromov: LoRA healing too
    if method == "llm_pruner":
        extra = ["method.first_layer=1", "method.last_layers_kept=1", "method.grad_samples=2",
                 "method.grad_seq_len=16"]
    ctx = _ctx(tmp_path, f"method={method}", *extra)
    before = snapshot(ctx.model)
    profile = common.similarity(ctx)
    c, _ = baseline.compress(ctx, profile, 2, 0)
    if ctx.cfg.method.heal == "lora":
        c.model, _ = common.heal(ctx, c.model, "lora-test-" + method)
    assert_unchanged(ctx.model, before)
    assert find_decoder_stack(ctx.model).num_layers == 8
    # layer removal and LaCo keep most tensors shared; LLM-Pruner shares the embeddings and the layers it keeps
    assert shared_tensors(c.model, ctx.model) >= (1 if method in ("llm_pruner", "gromov") else
                                                  len(list(c.model.parameters())) - 12)


@pytest.mark.parametrize("overrides", [("replacement=layer",), ("replacement=ffn", "train=lm", "train.max_steps=2"),
                                       ("replacement=linear",),  # fused into layer start-1's MLP output map
                                       ("replacement=none", "train=lora", "train.max_steps=2")])
def test_streamline_pruned_model_shares_the_dense_weights(overrides, tmp_path):
    ctx = _ctx(tmp_path, *overrides)
    before = snapshot(ctx.model)
    c = streamline.replace_block(ctx, 2, 2)
    assert_unchanged(ctx.model, before)
    fused = 1 if ctx.cfg.replacement.type == "linear" else None  # its MLP output map is new
    kept = [p for i, layer in enumerate(find_decoder_stack(ctx.model).layers) if i not in (2, 3)
            for name, p in layer.named_parameters() if not (i == fused and "down_proj" in name)]
    ptrs = {p.data_ptr() for p in c.model.parameters()}
    assert all(p.data_ptr() in ptrs for p in kept)  # train=lora: healed by the recipe after the dense model's release
    assert find_decoder_stack(c.model).num_layers == 8 - 2 + len(c.slot)


def _healed(tcfg, counter: list | None = None):
    from llm_streamline.train import train_lora

    model = tiny_model("llama", 128, seed=0)
    if counter is not None:  # forward calls of one decoder layer (twice per training batch when recomputed)
        find_decoder_stack(model).layers[3].mlp.register_forward_pre_hook(lambda *a: counter.append(1))
    g = torch.Generator().manual_seed(1)
    train, val = torch.randint(0, 128, (8, 16), generator=g), torch.randint(0, 128, (4, 16), generator=g)
    merged, log = train_lora(model, train, val, tcfg, rank=4, alpha=8, seed=0, progress=False)
    return merged.state_dict(), log


def test_lora_checkpointing_and_accumulation_train_the_same_adapters():
    from llm_streamline.config import TrainConfig

    base = TrainConfig(loss="lora", epochs=1, batch_size=4, lr=1e-2, min_lr=1e-3, max_steps=2)
    plain_calls, ckpt_calls = [], []
    ref, log = _healed(base, plain_calls)
    ckpt, _ = _healed(TrainConfig(**{**vars(base), "grad_checkpointing": True}), ckpt_calls)
    accum, alog = _healed(TrainConfig(**{**vars(base), "batch_size": 2, "grad_accum": 2}))
    assert len(ckpt_calls) - len(plain_calls) == 2            # 2 training batches, each layer recomputed once
    assert (alog["steps"], alog["effective_batch_size"], log["steps"]) == (2, 4, 2)
    for other in (ckpt, accum):
        worst = max((other[k] - v).abs().max().item() for k, v in ref.items())
        assert worst < 1e-5, worst


def _storages(model) -> dict[int, weakref.ref]:
    """{storage id: weak reference} of every parameter and buffer (torch keeps one Python object per storage)."""
    return {id(s): weakref.ref(s) for s in (t.untyped_storage() for t in (*model.parameters(), *model.buffers()))}


@pytest.mark.parametrize("overrides", [("replacement=ffn", "eval.speed=true", "eval.speed_tokens=16"),
                                       ("method=gromov", "method.heal=lora", "train.max_steps=2")],
                         ids=["streamline-ffn-speed", "gromov-lora"])
def test_the_dense_model_is_freed_before_the_pruned_evaluation(overrides, tmp_path, monkeypatch):
    """After its last use (the speed side by side) the dense model is released: when the pruned model is evaluated
    no dense tensor is alive that the pruned model does not use (the removed block is freed); a LoRA-healed model
    was merged in place (its weights are the dense model's tensors, no second copy). Fails with the dense model
    held to the end of the run, or with LoRA's copying merge."""
    from llm_streamline import recipes

    dense, seen = {}, {}
    real_load, real_eval = common.load_model, common.evaluate_suite

    def load_model(cfg, seed=0):
        model, tok = real_load(cfg, seed)
        dense["model"], dense["storages"] = weakref.ref(model), _storages(model)
        return model, tok

    def evaluate_suite(model, tok, cfg, stage, *a, **k):
        gc.collect()
        alive = {i for i, r in dense["storages"].items() if r() is not None}
        seen[stage] = (dense["model"]() is not None, alive, set(_storages(model)))
        return real_eval(model, tok, cfg, stage, *a, **k)

    monkeypatch.setattr(common, "load_model", load_model)
    monkeypatch.setattr(common, "evaluate_suite", evaluate_suite)
    monkeypatch.setenv("LLM_STREAMLINE_STAGES", str(tmp_path / "stages"))  # every stage computed, none reused
    res = recipes.run(compose_run("experiment=smoke", *overrides), tmp_path / "run")
    assert seen["eval_dense"][0] and len(seen["eval_dense"][1]) == len(dense["storages"])
    held, alive, pruned = seen["eval_pruned"]
    assert not held, "the dense model is still referenced when the pruned model is evaluated"
    assert alive <= pruned, f"{len(alive - pruned)} tensors only the dense model used are still alive"
    assert len(dense["storages"]) - len(alive) >= 2 * 9  # at least the 2 removed layers' 9 tensors each were freed
    if "method.heal=lora" in overrides:
        assert pruned <= set(dense["storages"]), "LoRA's merge made new tensors: the adapted weights were held twice"
    else:
        assert res["speed"]["prefill_speedup"] > 0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["params"]["removed_layer_params"] > 0


def _current_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def _resident(mib: int) -> float:
    """Make `mib` MiB resident for a moment (torch.ones writes every page), then free them."""
    x = torch.ones(mib * 2**18)
    return float(x[-1])


@pytest.mark.skipif(not common._reset_peak_rss(), reason="the kernel's peak mark cannot be reset here (not Linux)")
def test_the_run_peak_is_the_largest_of_every_stage_and_between_them():
    """results.json's peak_memory.rss_mib is the run's true maximum. Each stage resets the kernel's high-water mark,
    which ru_maxrss reads too: taken at the end (as before), the run's peak was only the last stage's, below the
    largest stage's (recorded runs: 1856 MiB against perplexity_pruned's 3120). A stage inside another counts in
    both; what happens between stages counts in the run's peak."""
    t = common.Timings()
    base = common._peak_rss_mib()
    with t.stage("big"):
        _resident(300)
    resident_before_small = _current_rss_mib()  # the allocator may keep big's freed pages (seen in the full suite)
    with t.stage("small"):
        _resident(1)
    with t.stage("outer"):
        with t.stage("inner"):
            _resident(200)
    # small's peak is its own (the mark reset at its start), not big's: at most what was resident when it began
    assert t.peak_rss_mib["big"] >= base + 250 and t.peak_rss_mib["small"] <= resident_before_small + 50
    assert t.peak_rss_mib["outer"] >= t.peak_rss_mib["inner"] >= base + 150
    assert common.peak_memory(t)["rss_mib"] >= max(t.peak_rss_mib.values())
    _resident(400)  # after the last stage, before the record is written
    assert common.peak_memory(t)["rss_mib"] >= base + 350
