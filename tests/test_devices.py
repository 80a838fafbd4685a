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
fails too. The stock lm-eval scorer (`eval.scorer=hflm`) and two whole recipes (streamline with MSE training, a
baseline with LoRA healing) run on the split with accelerate's model-level hook too, as a device_map load gives it.

Found on the main branch of 2026-12-06 before the fixes (each a test here): the similarity profile's float64 running
sums on the CPU received GPU scalars; the block probe fed CPU token ids to the model (recipes/streamline.py,
run_layers(calib[:1])); on the split, hidden states of layers on different cards were compared (profile), the
MSE replacement was fed on the first card while it sits on the second, and every `next(model.parameters())`
stood for the input embedding's device.
"""

from __future__ import annotations

import contextlib
import copy

import fake_devices as fd
import pytest
import torch

fd.setup()

VOCAB = 512
CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, tie_word_embeddings=False)
# The same stages on real CUDA (tiny random models in bf16; `cuda2`: split over two cards by accelerate's
# dispatch_model), run on a GPU machine (`pytest -m cuda tests/test_devices.py`), skipped here.
CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
CUDA2 = [pytest.mark.cuda, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="fewer than two CUDA devices")]
LAYOUTS = ("one", "split", pytest.param("cuda", marks=CUDA), pytest.param("cuda2", marks=CUDA2))


def blocks(n: int = 4, t: int = 16) -> torch.Tensor:
    """Calibration-like token blocks, real and on the CPU (as the data stage gives them)."""
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(0))


@pytest.fixture(params=LAYOUTS)
def layout(request):
    return request.param


def real(layout: str) -> bool:
    return layout.startswith("cuda")


def card(layout: str, i: int) -> torch.device:
    """Card i of the layout (the one-device layouts have only card 0)."""
    if real(layout):
        return torch.device("cuda", i if layout == "cuda2" else 0)
    return (fd.GPU0, fd.GPU1)[i] if layout == "split" else fd.GPU0


def audit(layout: str, backward: bool = True):
    """The fake-device mode (no backward on the split: see fake_devices), or nothing on real CUDA."""
    if real(layout):
        return contextlib.nullcontext()
    return fd.audit(backward=backward and layout == "one")


def model_in(layout: str, family: str = "llama", io_same_device: bool = False, **over):
    """The tiny model on the layout's cards; `io_same_device`: the fake split also gets the model-level hook of
    accelerate's dispatch_model (the real split always has it)."""
    if not real(layout):
        return fd.build(family, layout, io_same_device, **{**CONFIG, **over})
    from accelerate import dispatch_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **{**CONFIG, **over}),
                                             dtype=torch.bfloat16).eval()
    if layout == "cuda":
        return model.to("cuda:0")
    names = {id(m): n for n, m in model.named_modules()}
    return dispatch_model(model, device_map={names[id(m)]: i for m, i in fd.split_groups(model)})


def on_device(layout: str, t: torch.Tensor, device=None) -> None:
    if not real(layout):
        assert fd.is_fake(t), f"a real {t.device} tensor where the model's device was expected"
    assert t.device.type != "cpu", f"on the CPU, expected on {device or 'the model card'}"
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
        on_device("one", out.logits, fd.GPU0)


# -------------------------------------------------------------------------------------- LLM-Streamline
def test_similarity_profile(layout):
    from llm_streamline.importance import similarity_profile

    with audit(layout):
        model = model_in(layout)
        prof = similarity_profile(model, blocks(), ns=[1, 2], batch_size=2, progress=False)
    assert len(prof.mean_cos[2]) == 3 and all(isinstance(v, float) for v in prof.mean_cos[1])


def test_block_probe_and_anatomy(layout):
    """What recipes/streamline.py runs before building the replacement, on calibration ids from the CPU."""
    from llm_streamline.models.anatomy import anatomy_of
    from llm_streamline.models.layers import run_layers

    calib = blocks()
    with audit(layout):
        model = model_in(layout)
        cap = run_layers(model, calib[:1], outputs_at=(2,))
        on_device(layout, cap.outputs[2], card(layout, 1))
        anatomy_of(model, 2, calib[:1])


def test_block_perplexities(layout):
    from llm_streamline.importance import block_perplexities

    with audit(layout):
        out = block_perplexities(model_in(layout), blocks(), n=1, batch_size=2, progress=False)
    assert len(out) == 4


def test_perplexity(layout):
    from llm_streamline.evaluate.perplexity import perplexity

    with audit(layout):
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
    """Teacher pairs written from the cards (CPU files, train.teacher=cached), the replacement trained on its slot's
    card. The block [1, 3) straddles the two cards of the split."""
    import safetensors.torch

    from llm_streamline import train

    monkeypatch.setattr(train, "save_file", fd.save_file_on_cpu(safetensors.torch.save_file))
    monkeypatch.setattr(train, "load_file", fd.load_file_real(safetensors.torch.load_file))
    start, n = 1, 2
    with audit(layout):
        model = model_in(layout)
        data = blocks(6)
        tr = train.write_teacher_shards(model, data[:4], start, n, tmp_path / "t" / "train", 2, "train")
        va = train.write_teacher_shards(model, data[4:], start, n, tmp_path / "t" / "val", 2, "val")
        slot = _slot(model, kind, start, n)
        log = train.train_mse(model, slot, start, data[:4], tr, va, _train_cfg(), seed=0)
    assert log.steps == 2
    if layout != "split":  # trained where it sits (the split skips the backward)
        assert all(p.grad is None or p.grad.device == card(layout, 0) for m in slot for p in m.parameters())


def test_online_teacher_mse_training(layout):
    """train.teacher=online: the pairs computed per batch from the frozen dense model on its cards, fed to the
    replacement on its slot's card."""
    from llm_streamline import train

    start, n = 1, 2
    with audit(layout):
        model = model_in(layout)
        data = blocks(6)
        tr = train.OnlineTeacher(model, data[:4], start, n, 2)
        va = train.OnlineTeacher(model, data[4:], start, n, 2)
        slot = _slot(model, "ffn", start, n)
        log = train.train_mse(model, slot, start, data[:4], tr, va, _train_cfg(), seed=0)
    assert log.steps == 2


@pytest.mark.parametrize("loss", ["lm", "distill"])
def test_lm_and_distill_training(layout, loss):
    from llm_streamline import train
    from llm_streamline.models.layers import remove_block

    start, n = 1, 2
    cfg = _train_cfg(loss=loss, distill_alpha=0.5 if loss == "distill" else 0.0)
    # no backward on either layout: the LM head's chunks are checkpointed (losses._chunk_sums), and recomputing
    # them in autograd's worker thread for the fake card aborts the process; the forward is what mixes devices
    with audit(layout, backward=False):
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

    with audit(layout):
        model = model_in(layout, num_hidden_layers=6)
        removed, steps = sleb(model, blocks(), 1, blocks=2, progress=False)
    assert len(removed) == 1 and steps[0]["candidates_ppl"]


def test_laco(layout):
    from llm_streamline.baselines.laco import laco

    with audit(layout):
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

    with audit(layout):
        model = model_in(layout, num_hidden_layers=6)
        prof = similarity_profile(model, blocks(), ns=[1, 2], batch_size=2, progress=False)
        res = apply(name, model, blocks(), prof, 2, RunConfig())
        out = model(input_ids=blocks().to(card(layout, 0)))
    assert find_decoder_stack(res.model).num_layers == 4
    on_device(layout, out.logits)


@pytest.mark.parametrize("importance", ["element1", "mix"])
def test_llm_pruner(layout, importance):
    """Taylor gradients of the LM loss on calibration ids from the CPU, per-unit scores, the ratio matched to one
    layer's parameters and the surgery (unit indices from the CPU into each card's weights); the pruned model
    runs."""
    from llm_streamline.baselines import llm_pruner
    from llm_streamline.config import LLMPrunerConfig, RunConfig

    cfg = RunConfig(method=LLMPrunerConfig(first_layer=0, last_layers_kept=0, grad_samples=2, importance=importance))
    with audit(layout):
        model = model_in(layout)
        res = llm_pruner.apply(model, blocks(), 1, cfg)
        out = model(input_ids=blocks().to(card(layout, 0)))
    assert res.record["ratio"] > 0
    on_device(layout, out.logits)


# -------------------------------------------------------------------------------------- evaluation
def test_speed(layout):
    from llm_streamline.evaluate.speed import measure_throughput, paired_prefill_speedup

    with audit(layout):
        model = model_in(layout)
        r = measure_throughput(model, batch_size=1, prompt_len=8, decode_tokens=2, repeats=1)
        paired_prefill_speedup(model, model, prompt_len=8, rounds=1)
    assert r["prefill_seconds"] > 0


class _Event:
    """A CUDA event as `Clock` uses it, on a timeline of integers (ms)."""
    now = 0

    def __init__(self, log):
        self.log, self.t = log, None

    def record(self):
        _Event.now += 7
        self.t = _Event.now
        self.log.append("record")

    def synchronize(self):
        self.log.append("wait")

    def elapsed_time(self, other):
        return float(other.t - self.t)


def test_clock_on_cuda_synchronises_every_card_and_reads_events():
    """The CUDA branch without a GPU: each mark synchronises every CUDA card of the model before recording its
    event; the seconds are the events' elapsed time after waiting for the end event."""
    from llm_streamline.evaluate.speed import Clock

    log = []
    clock = Clock(["cuda:1", "cuda:0", "cuda:1", "cpu"], synchronize=lambda d: log.append(f"sync {d}"),
                  event=lambda: _Event(log))
    a = clock.mark()
    b = clock.mark()
    assert clock.seconds(a, b) == pytest.approx(0.007)
    assert log == ["sync cuda:0", "sync cuda:1", "record", "sync cuda:0", "sync cuda:1", "record", "wait"]
    cpu = Clock(["cpu"], synchronize=lambda d: pytest.fail("synchronised a CPU model"))
    t0 = cpu.mark()
    assert isinstance(t0, float) and cpu.seconds(t0, cpu.mark()) >= 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_speed_on_cuda_times_the_kernels():
    """On CUDA the timed prefill of a model that does real work takes longer than its kernel launches alone: a
    4096-token prefill of a 4-layer model cannot finish in the ~1 ms Python needs to queue it."""
    from llm_streamline.evaluate.speed import measure_throughput

    model = model_in("cuda", hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_key_value_heads=4,
                     max_position_embeddings=4096)
    r = measure_throughput(model, batch_size=4, prompt_len=1024, decode_tokens=4, repeats=2)
    assert r["prefill_seconds"] > 1e-3


# -------------------------------------------------------------------------------------- added replacements, healing
@pytest.mark.parametrize("objective", ["lstsq", "cosine"])
def test_replaceme_map(layout, objective):
    """ReplaceMe's boundary (layer s-1's MLP output and x^(s+n), on two cards of the split when the block [2, 3)
    starts where the split does), the fit and its log."""
    from llm_streamline.config import ReplacementConfig
    from llm_streamline.linear_map import replaceme_map

    cfg = ReplacementConfig(type="linear", objective=objective, fit_epochs=1, fit_batch_tokens=16)
    with audit(layout):
        t, log = replaceme_map(model_in(layout), blocks(), 2, 1, cfg, batch_size=2)
    assert t.shape == (64, 64) and log["calibration_tokens"] == 4 * 16


def test_linear_patch_and_linear_inits(layout):
    from llm_streamline.linear_map import init_ffn_linear, init_layer_linear, linear_patch_matrix

    with audit(layout):
        model = model_in(layout)
        p, _ = linear_patch_matrix(model, blocks(), 1, 2, batch_size=2)
        init_ffn_linear(_slot(model, "ffn", 1, 2)[0], model, blocks(), 1, 2, batch_size=2)
        init_layer_linear(_slot(model, "layer", 1, 2)[0], model, blocks(), 1, 2, batch_size=2)
    assert p.shape == (64, 64)


def test_lora_healing(layout):
    """LoRA adapters injected by peft on a (possibly split) pruned model sharing the dense weights, trained and
    merged."""
    from llm_streamline import train
    from llm_streamline.models.layers import remove_layers, share_weights

    with audit(layout, backward=False):
        dense = model_in(layout)
        pruned = share_weights(dense)
        remove_layers(pruned, [1])
        data = blocks(6)
        merged, log = train.train_lora(pruned, data[:4], data[4:], _train_cfg(loss="lora"), rank=2, alpha=4,
                                       seed=0, progress=False)
        out = merged(input_ids=data[:1].to(card(layout, 0)))
    assert log["steps"] == 2
    on_device(layout, out.logits)


# -------------------------------------------------------------------------------------- evaluation: the scorers
def _scorer(cls, model):
    """lm-eval's HFLM subclass around `model` with only what scoring reads (its constructor would build a
    tokenizer and probe the device; `device` is transformers' `model.device`, as HFLM sets it for a model given
    as an object)."""
    from lm_eval.api.model import CacheHook

    lm = cls.__new__(cls)
    lm._model, lm._device, lm._max_length, lm.batch_size_per_gpu, lm._rank = model, model.device, 64, 8, 0
    lm.softmax_dtype, lm.mixed_precision_dtype, lm.backend, lm.pack_tokens = None, None, "causal", 1024
    lm.cache_hook = CacheHook(None)
    lm.fast_stats = {"shared_requests": 0, "stock_requests": 0, "packs": 0, "oversize_groups": 0, "packed_tokens": 0}
    return lm


def test_scorers_option_loglikelihoods_and_context_nll(layout):
    """The multiple-choice rows accuracy and stability read: FastHFLM's shared-context option scores and the
    contexts' NLL (RecordingHFLM.score_contexts, the dense model's option_mean_nll)."""
    pytest.importorskip("lm_eval")
    from llm_streamline.evaluate.fast_hflm import FastHFLM

    requests = [(("ctx", " a"), [5, 6, 7, 8], [9, 10]), (("ctx", " b"), [5, 6, 7, 8], [11])]
    with audit(layout):
        lm = _scorer(FastHFLM, model_in(layout))
        assert lm._fast_supported()
        out = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    assert len(out) == 2 and lm.fast_stats["shared_requests"] == 2
    assert set(lm.context_nll) == {(5, 6, 7, 8)}


def test_fault_diagnosis_probe(layout):
    """A non-finite perplexity or log-likelihood is diagnosed by re-running the model on a calibration block from
    the CPU (faults.diagnose): the diagnosis must not fail with a device error instead."""
    from llm_streamline import faults

    with audit(layout):
        assert isinstance(faults.diagnose(model_in(layout), blocks()[:1]), str)


def test_stock_hflm_scorer(layout, tok):
    """eval.scorer=hflm: lm-eval's own HFLM, as `harness.make_lm` builds it around the model the recipes hand over
    (RecordingHFLM: stock option scores, then each context's NLL for option_mean_nll). lm-eval puts the ids and
    the continuation tokens it compares with the logits on `model.device`; under a device_map the logits come back
    there through dispatch_model's model-level hook, which the fake split is given here as every device_map model
    of this framework has it (loading, `checkpoints.place`)."""
    from llm_streamline.evaluate.harness import make_lm

    requests = [(("ctx", " a"), [5, 6, 7, 8], [9, 10]), (("ctx", " b"), [5, 6, 7, 8], [11]),
                (("other", " c"), [12, 13], [14, 15, 16])]
    with audit(layout):
        model = model_in(layout, io_same_device=True)
        lm = make_lm(model, tok, 2, scorer="hflm")
        assert lm.device == card(layout, 0)
        out = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    assert len(out) == 3 and all(isinstance(ll, float) and isinstance(greedy, bool) for ll, greedy in out)
    assert set(lm.context_nll) == {(5, 6, 7, 8), (12, 13)}
    assert lm.continuation_tokens[("other", " c")] == 3


# -------------------------------------------------------------------------------------- whole recipes
def _fake_loading(monkeypatch, layout: str, tmp_path):
    """The recipes' model loading gives the preset's model on the fake cards of `layout` (with dispatch_model's
    model-level hook, as device_map loading gives it); every safetensors write checks it is handed CPU tensors;
    a private stage cache (the fake run's values are placeholders)."""
    import safetensors.torch
    import transformers.modeling_utils

    from llm_streamline import train
    from llm_streamline.models import checkpoints
    from llm_streamline.recipes import common, streamline

    real_load, loaded = common.load_model, []

    def load_model(cfg, seed=0):
        with torch._subclasses.fake_tensor.unset_fake_temporarily():
            model, tok = real_load(cfg, seed)
        loaded.append(fd.build_from(model.config, layout, io_same_device=True))
        return loaded[-1], tok

    monkeypatch.setattr(common, "load_model", load_model)
    save = fd.save_file_on_cpu(safetensors.torch.save_file)
    load = fd.load_file_real(safetensors.torch.load_file)
    for mod in (train, streamline, common, checkpoints):  # the modules that import safetensors' functions
        for name, fn in (("save_file", save), ("load_file", load)):
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, fn)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file",
                        fd.save_file_on_cpu(safetensors.torch.save_file, strict=False))
    monkeypatch.setattr(transformers.modeling_utils, "id_tensor_storage",
                        fd.storage_id(transformers.modeling_utils.id_tensor_storage))
    monkeypatch.setenv("LLM_STREAMLINE_STAGES", str(tmp_path / "stages"))
    return loaded


@pytest.mark.parametrize("overrides", [("replacement=ffn", "eval.scorer=hflm"),
                                       ("method=gromov", "method.heal=lora", "train.max_steps=2", "eval.scorer=hflm")],
                         ids=["streamline-ffn-mse", "gromov-lora"])
def test_whole_recipe(overrides, tmp_path, monkeypatch):
    """A whole run of a recipe as the CLI runs it (the smoke preset: data, profile, dense evaluation of lm-eval's
    tasks by the stock scorer, teacher pairs and MSE training / the baseline and LoRA healing, the pruned model's
    evaluation, perplexity, saving, records; the speed stage is test_speed's, too slow under the fake mode) on the
    split over two fake cards: every stage, and the glue between them, keeps its tensors on the devices of the
    modules that consume them. About 10 s of CPU each."""
    layout = "split"
    import json

    from hydra import compose, initialize_config_dir

    from llm_streamline import recipes
    from llm_streamline.cli import CONF_DIR, to_run_config

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = to_run_config(compose(config_name="config", overrides=[
            "experiment=smoke", "eval.perplexity_blocks=8", *overrides]))
    loaded = _fake_loading(monkeypatch, layout, tmp_path)
    with audit(layout):
        recipes.run(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["layers"]["n_removed"] == 2 and saved["eval_meta"]["scorer"] == cfg.eval.scorer
    assert (tmp_path / "run" / "model").is_dir() and (tmp_path / "run" / "samples_pruned.jsonl").exists()
    assert len(loaded) == 1 and fd.devices_of(loaded[0]) == {card(layout, 0), card(layout, 1)}
