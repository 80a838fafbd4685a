"""Device audit: every stage of every method on a tiny model whose weights live on a fake GPU, and on one split
over two fake GPUs as accelerate's device_map splits it, on this CPU-only machine.

How (tests/fake_devices.py has the details): torch's FakeTensorMode propagates devices through every op without
computing, and raises FakeTensorDeviceMismatchError when an op meets two devices, as CUDA raises "Expected all
tensors to be on the same device". The fake card is PrivateUse1 renamed `fakegpu` (a fake `cuda:0` cannot be
indexed or differentiated in a CPU-only build); the model is built on the meta device from its config (no random
init) and given fake weights. `one`: everything on fakegpu:0, forward and backward. `split`: embedding and the
first half of the layers on fakegpu:0, the rest, final norm and LM head on fakegpu:1, each group under accelerate's
AlignDevicesHook (hidden states move between cards with the layers, as in a device_map run); the backward pass is
skipped there (this build's Python device guard knows one device), the losses' forward runs across both cards.
What a fake tensor cannot give (`.item()`, `.tolist()`) returns a placeholder: values are meaningless, only devices
are tested. Each test asserts where the stage's outputs live, so a stage that silently moved everything to the CPU
fails too.

Found on the main branch of 2026-12-06 before the fixes (each a test here): the similarity profile's float64 running
sums on the CPU received GPU scalars; the block probe fed CPU token ids to the model (recipes/streamline.py,
run_layers(calib[:1])); on the split, hidden states of layers on different cards were compared (profile), the
MSE replacement was fed on the first card while it sits on the second, and every `next(model.parameters())`
stood for the input embedding's device.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fake_devices as fd

fd.setup()

VOCAB = 512
CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, tie_word_embeddings=False)
LAYOUTS = ("one", "split")


def blocks(n: int = 4, t: int = 16) -> torch.Tensor:
    """Calibration-like token blocks, real and on the CPU (as the data stage gives them)."""
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(0))


@pytest.fixture(params=LAYOUTS)
def layout(request):
    return request.param


def model_in(layout: str, family: str = "llama", **over):
    return fd.build(family, layout, **{**CONFIG, **over})


def on_fake(t: torch.Tensor, device=None) -> None:
    assert fd.is_fake(t), f"a real {t.device} tensor where the model's device was expected"
    if device is not None:
        assert t.device == device, f"on {t.device}, expected {device}"


def test_fake_devices_catch_a_cpu_tensor_meeting_a_gpu_one():
    """The premise: under the audit mode a CPU tensor into a fake-GPU embedding raises, as on CUDA."""
    from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError

    with fd.audit():
        model = model_in("one")
        with pytest.raises(FakeTensorDeviceMismatchError):
            model(input_ids=blocks())
        out = model(input_ids=blocks().to(fd.GPU0))
        on_fake(out.logits, fd.GPU0)


# -------------------------------------------------------------------------------------- LLM-Streamline
def test_similarity_profile(layout):
    from llm_streamline.importance import similarity_profile

    with fd.audit():
        model = model_in(layout)
        prof = similarity_profile(model, blocks(), ns=[1, 2], batch_size=2, progress=False)
    assert len(prof.mean_cos[2]) == 3 and all(isinstance(v, float) for v in prof.mean_cos[1])


def test_block_probe_and_anatomy(layout):
    """What recipes/streamline.py runs before building the replacement, on calibration ids from the CPU."""
    from llm_streamline.models.anatomy import anatomy_of
    from llm_streamline.models.layers import run_layers

    calib = blocks()
    with fd.audit():
        model = model_in(layout)
        cap = run_layers(model, calib[:1], outputs_at=(2,))
        on_fake(cap.outputs[2], fd.GPU1 if layout == "split" else fd.GPU0)
        anatomy_of(model, 2, calib[:1])


def test_block_perplexities(layout):
    from llm_streamline.importance import block_perplexities

    with fd.audit():
        out = block_perplexities(model_in(layout), blocks(), n=1, batch_size=2, progress=False)
    assert len(out) == 4


def test_perplexity(layout):
    from llm_streamline.evaluate.perplexity import perplexity

    with fd.audit():
        assert perplexity(model_in(layout), blocks(), batch_size=2)["tokens"] == 4 * 15


def _train_cfg(**over):
    from llm_streamline.config import TrainConfig

    return TrainConfig(**{**dict(epochs=1, batch_size=2, max_steps=2, warmup_ratio=0.0), **over})


def _slot(model, kind: str, start: int, n: int):
    from llm_streamline.config import ReplacementConfig
    from llm_streamline.models.anatomy import anatomy_of
    from llm_streamline.models.layers import find_decoder_stack, run_layers
    from llm_streamline.replace import build_replacement, needs_anatomy

    cfg = ReplacementConfig(type=kind)
    stack = find_decoder_stack(model)
    anatomy = anatomy_of(model, start) if needs_anatomy(cfg) else None
    probe = run_layers(model, blocks()[:1], outputs_at=(start,), stack=stack)
    return build_replacement(cfg, list(stack.layers[start:start + n]), stack.config, probe.output_is_tuple, anatomy)


@pytest.mark.parametrize("kind", ["ffn", "layer"])
def test_teacher_pairs_and_mse_training(layout, kind, tmp_path, monkeypatch):
    """Teacher pairs written from the cards (CPU files), the replacement trained on its slot's card. The block
    [1, 3) straddles the two cards of the split."""
    import safetensors.torch

    from llm_streamline import train

    monkeypatch.setattr(train, "save_file", fd.save_file_on_cpu(safetensors.torch.save_file))
    monkeypatch.setattr(train, "load_file", fd.load_file_real(safetensors.torch.load_file))
    start, n = 1, 2
    with fd.audit(backward=layout == "one"):
        model = model_in(layout)
        data = blocks(6)
        tr = train.write_teacher_shards(model, data[:4], start, n, tmp_path / "t" / "train", 2, "train")
        va = train.write_teacher_shards(model, data[4:], start, n, tmp_path / "t" / "val", 2, "val")
        slot = _slot(model, kind, start, n)
        log = train.train_mse(model, slot, start, data[:4], tr, va, _train_cfg(), seed=0)
    assert log.steps == 2
    if layout == "one":
        assert all(p.grad is None or p.grad.device == fd.GPU0 for m in slot for p in m.parameters())


@pytest.mark.parametrize("loss", ["lm", "distill"])
def test_lm_and_distill_training(layout, loss):
    from llm_streamline import train
    from llm_streamline.models.layers import remove_block

    start, n = 1, 2
    cfg = _train_cfg(loss=loss, distill_alpha=0.5 if loss == "distill" else 0.0)
    # no backward on either layout: the LM head's chunks are checkpointed (losses._chunk_sums), and recomputing
    # them in autograd's worker thread for the fake card aborts the process; the forward is what mixes devices
    with fd.audit(backward=False):
        dense = model_in(layout)
        pruned = copy.deepcopy(dense)
        slot = _slot(pruned, "ffn", start, n)
        remove_block(pruned, start, n, slot)
        data = blocks(6)
        if loss == "lm":
            log = train.train_lm(pruned, slot, data[:4], data[4:], cfg, seed=0)
        else:
            log = train.train_distill(dense, pruned, slot, start, n, data[:4], data[4:], cfg, seed=0)
    assert log.steps == 2


# -------------------------------------------------------------------------------------- baselines
def test_sleb(layout):
    from llm_streamline.baselines.layer_removal import sleb

    with fd.audit():
        model = model_in(layout, num_hidden_layers=6)
        removed, steps = sleb(model, blocks(), 1, blocks=2, progress=False)
    assert len(removed) == 1 and steps[0]["candidates_ppl"]


def test_laco(layout):
    from llm_streamline.baselines.laco import laco

    with fd.audit():
        model = model_in(layout, num_hidden_layers=6)
        removed, _ = laco(model, blocks(), 1, merge=2, progress=False)
    assert len(removed) == 1


@pytest.mark.parametrize("name", ["shortgpt", "gromov"])
def test_profile_baselines(layout, name):
    """ShortGPT and Gromov choose from the similarity profile (its stage is audited above), then remove layers."""
    from llm_streamline.baselines.layer_removal import apply
    from llm_streamline.config import RunConfig
    from llm_streamline.importance import similarity_profile
    from llm_streamline.models.layers import find_decoder_stack

    with fd.audit():
        model = model_in(layout, num_hidden_layers=6)
        prof = similarity_profile(model, blocks(), ns=[1, 2], batch_size=2, progress=False)
        res = apply(name, model, blocks(), prof, 2, RunConfig())
        out = model(input_ids=blocks().to(fd.GPU0))
    assert find_decoder_stack(res.model).num_layers == 4
    on_fake(out.logits)


@pytest.mark.parametrize("importance", ["element1", "mix"])
def test_llm_pruner_importance(layout, importance):
    """Taylor gradients of the LM loss on calibration ids from the CPU and the per-unit scores of every structure
    (the choice of units and the surgery work on CPU indices of scores: data-dependent shapes a fake tensor cannot
    give, left to the CUDA tests)."""
    from llm_streamline.baselines import llm_pruner

    with fd.audit(backward=layout == "one"):
        model = model_in(layout)
        structs = llm_pruner.find_structures(model, [0, 3], "head")
        params = [m.linear.weight for s in structs for m in s.members]
        g, fisher = llm_pruner.taylor_gradients(model, blocks(2), params, with_fisher=importance == "mix")
        for s in structs:
            scores = llm_pruner.structure_scores(s, g, fisher, importance)
            assert scores.device.type == "cpu" and scores.shape == (s.n_units,)
    for p in params:
        assert g[id(p)].device == p.device


# -------------------------------------------------------------------------------------- evaluation
def test_speed(layout):
    from llm_streamline.evaluate.speed import measure_throughput, paired_prefill_speedup

    with fd.audit():
        model = model_in(layout)
        r = measure_throughput(model, batch_size=1, prompt_len=8, decode_tokens=2, repeats=1)
        paired_prefill_speedup(model, model, prompt_len=8, rounds=1)
    assert r["prefill_seconds"] > 0
