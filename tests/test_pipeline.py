"""The Hydra app: every config group composes with Hydra's compose API; bad input fails early with one
line; the whole pipeline runs on tiny models and writes a complete results.json; reruns reuse stages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from llm_streamline import recipes
from llm_streamline.cli import CONF_DIR, to_run_config
from llm_streamline.config import ConfigError, validate

GROUPS = ["model", "data", "sparsity", "replacement", "method", "train", "eval", "experiment"]
RESULT_KEYS = {"model", "method", "replacement", "layers", "params", "eval", "stability", "timings",
               "peak_memory", "checkpoint", "perplexity", "similarity_profile", "train"}


def compose_run(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return to_run_config(cfg)


def presets(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in presets(g)])
def test_every_preset_composes_and_validates(group, option):
    overrides = [f"{group}={option}"]
    if group == "model" and option == "hub":
        overrides.append("model.name_or_path=some/model")
    if group == "train" and option == "lora":  # LoRA heals plain pruning: it asks for replacement=none
        overrides.append("replacement=none")
    if group == "method" and option == "sleb_gpu":  # SLEB's original 128 x 2048 calibration needs a large corpus
        overrides.append("data=slimpajama")
    cfg = compose_run(*overrides)
    validate(cfg)


def test_default_is_the_embedded_smollm2():
    cfg = compose_run()
    assert (cfg.model.source, cfg.data.name, cfg.eval.name) == ("embedded", "offline", "cpu")


BAD = [
    (["model=nope"], "model"),
    (["sparsity.layers=0"], "sparsity.layers"),
    (["eval.perplexity_text=ptb"], "eval.perplexity_text"),
    (["data=c4", "eval.perplexity_text=c4"], "selects checkpoints on C4 validation"),
    (["eval.perplexity_blocks=0"], "eval.perplexity_blocks"),
    (["sparsity=target25", "sparsity.target=1.5"], "sparsity.target"),
    (["sparsity=target25", "sparsity.target=0"], "sparsity.target"),
    (["sparsity.layers=8", "sparsity.target=0.25"], "exactly one"),
    (["sparsity.importance=magic"], "sparsity.importance"),
    (["sparsity.basis=half"], "sparsity.basis"),
    (["replacement.type=mamba"], "replacement.type"),
    (["replacement.num_layers=0"], "replacement.num_layers"),
    (["replacement.activation=tanh"], "replacement.activation"),
    (["train.loss=kl"], "train.loss"),
    (["train.first_token=maybe"], "train.first_token"),
    (["train.lr=-1"], "train.lr"),
    (["train.batch_size=0"], "batch_size"),
    (["data.name=pile"], "data.name"),
    (["data.seq_len=2"], "data.seq_len"),
    (["data.train_samples=0"], "data.train_samples"),
    (["model.dtype=int4"], "model.dtype"),
    (["model=hub"], "name_or_path"),
    (["model=tiny-llama", "model.family=rwkv"], "model.family"),
    (["method.name=magic"], "method"),
    (["eval.limit=0"], "eval.limit"),
    (["mode=train"], "mode"),
    (["wandb.mode=loud"], "wandb.mode"),
    (["model.source=ftp"], "model.source"),
    (["train.loss=lora", "replacement=none"], "train.loss"),  # LoRA is not a loss: method.heal=lora (train=lora)
    (["train=lora", "replacement=ffn"], "method.heal=lora heals a plainly pruned model (train=lora): use "),
    (["method.heal=lora"], "method.heal=lora heals a plainly pruned model (train=lora): use replacement=none"),
    (["method=sleb", "method.name=streamline"], "select it with method=streamline"),
    (["train=lm", "data.train_samples=4"], "data.train_samples=4 < train.batch_size=8"),
    (["method=gromov", "train.batch_size=512"], "data.train_samples=256 < train.batch_size=512"),
    (["method=llm_pruner", "method.attention_unit=channel"], "method.attention_unit='channel': head | kv-group"),
]


def test_train_lora_sets_the_one_lora_switch():
    """LoRA healing has one switch, method.heal (what a baseline uses): train=lora sets it with replacement=none
    and the MSE replacement's budget, the same healing train=lora ran before it was one switch."""
    from llm_streamline.config import check_overrides, heal_train_config

    for extra in ([], ["method=shortgpt"], ["method=gromov"]):
        cfg = compose_run("train=lora", *extra)
        validate(cfg)
        assert (cfg.method.heal, cfg.replacement.type, cfg.method.lora_lr, cfg.method.lora_epochs) == \
            ("lora", "none", 2e-4, 4)
    h = heal_train_config(compose_run("train=lora"))
    assert (h.loss, h.epochs, h.lr, h.min_lr, h.weight_decay, h.warmup_ratio, h.select, h.batch_size) == \
        ("lora", 4, 2e-4, 2e-5, 0.0, 0.05, "best", 8)
    assert compose_run("train=lora").method == compose_run("replacement=none", "method.heal=lora",
                                                           "method.lora_lr=2e-4", "method.lora_epochs=4").method
    assert compose_run("method=gromov").method.heal == "lora" and compose_run().method.heal == "none"
    cfg = compose_run("train=lora")
    check_overrides(cfg, ["train=lora", "train.max_steps=3", "train.batch_size=4"])  # what healing reads
    with pytest.raises(ConfigError, match=r"train.lr=1e-3: LoRA healing .* set the method.lora_\* option instead"):
        check_overrides(cfg, ["train=lora", "train.lr=1e-3"])  # not read: refused, not ignored


@pytest.mark.parametrize("overrides,line", [
    (["method=shortgpt", "method.sleb_samples=3"], "method.sleb_samples is an option of method=sleb, not of "
                                                   "method=shortgpt (its options: heal, lora_rank,"),
    (["method=sleb", "method.width_ratio=0.5"], "method.width_ratio is an option of method=llm_pruner, not of "
                                                "method=sleb"),
    (["method.laco_merge=3"], "method.laco_merge is an option of method=laco, not of method=streamline"),
    (["method=gromov", "method.sleb_sample=3"], "unknown key method.sleb_sample: did you mean method.sleb_samples?"),
])
def test_another_methods_option_fails_at_composition(overrides, line):
    """Each method has its own schema (conf/method/<name>.yaml extends it): Hydra's compose refuses another
    method's option, and the one line names the method that has it."""
    from hydra.errors import ConfigCompositionException

    from llm_streamline.errors import hydra_error_line

    with pytest.raises(ConfigCompositionException) as err:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            compose(config_name="config", overrides=overrides)
    assert hydra_error_line(err.value).startswith(line), hydra_error_line(err.value)
    from llm_streamline.config import LaCoConfig, SLEBConfig

    assert compose_run("method=sleb", "method.sleb_samples=8").method == SLEBConfig(sleb_samples=8)
    assert compose_run("method=laco", "method.laco_merge=3").method == LaCoConfig(laco_merge=3)


@pytest.mark.parametrize("overrides,allowed", [
    (["train.loss=kl"], "'kl', expected one of [mse, lm, distill]"),
    (["eval.scorer=slow"], "'slow', expected one of [fast, hflm]"),
    (["method=llm_pruner", "method.attention_unit=channel"], "'channel', expected one of [head, kv-group]"),
    (["sparsity.importance=magic"], "'magic', expected one of [cosine, angular, bi, perplexity]"),
    (["objective=loss"], "'loss', expected one of [ppl, avg_acc, stability]"),
])
def test_a_choice_outside_its_enum_fails_at_composition_naming_the_allowed_values(overrides, allowed):
    """Fixed choices are Enums in the schema: Hydra's compose itself refuses another value (no `validate`)."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            compose(config_name="config", overrides=overrides)
    assert allowed in str(err.value.__cause__)
    ok = compose_run("train.loss=lm", "replacement=ffn")  # a valid choice reads as its plain string
    assert ok.train.loss == "lm" and f"{ok.replacement.type}" == "ffn"


@pytest.mark.parametrize("overrides,needle", BAD)
def test_bad_values_are_refused_with_one_line(overrides, needle):
    try:
        cfg = compose_run(*overrides)
    except Exception as e:  # Hydra refuses unknown presets / keys / types itself
        assert needle.split(".")[0] in str(e)
        return
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert needle in str(err.value) and "\n" not in str(err.value)


def _cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled", HYDRA_FULL_ERROR="0")
    return subprocess.run([sys.executable, "-m", "llm_streamline", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args,needle", [
    (["experiment=smoke", "sparsity.layers=8"], "only 8 layers"),
    (["experiment=smoke", "eval.tasks=[no_such_task]"], "no_such_task"),
    (["experiment=smoke", "mode=eval", "checkpoint=/no/such/dir"], "/no/such/dir"),
])
def test_cli_bad_input_exits_2_with_one_line(args, needle, tmp_path):
    res = _cli(*args, f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("llm-streamline: error:") and needle in last
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "gemma3"])
@pytest.mark.parametrize("rtype", ["none", "ffn", "layer"])
def test_pipeline_on_tiny_models(family, rtype, tmp_path):
    cfg = compose_run("experiment=smoke", f"model=tiny-{family}", f"replacement={rtype}")
    res = recipes.run(cfg, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert RESULT_KEYS <= set(saved)
    assert saved["layers"]["n_removed"] == 2 and saved["layers"]["n_original"] == 8
    assert saved["params"]["pruned"] < saved["params"]["dense"]
    assert set(saved["eval"]) == {"synthetic_cloze"}  # eval=tiny: generated in code
    assert 0.0 <= saved["stability"]["average"]["stability"] <= 1.0
    assert (tmp_path / "samples_dense.jsonl").exists() and (tmp_path / "samples_pruned.jsonl").exists()
    assert (tmp_path / "similarity_profile.png").stat().st_size > 10_000
    assert Path(saved["checkpoint"]).exists()
    # the stage ran and was timed; a profile the session's stage cache already holds loads in under 0.5 ms,
    # which the 3-decimal timings record as 0.0
    assert "importance" in res["timings"]


def test_rerun_reuses_every_stage_and_gives_identical_results(tmp_path):
    cfg = compose_run("experiment=smoke", "replacement=ffn")
    first = recipes.run(cfg, tmp_path / "a")
    second = recipes.run(cfg, tmp_path / "b")
    assert second["cache"]["dense_eval_reused"]
    assert "teacher_pairs" not in second["timings"] and "train" not in second["timings"]
    for key in ("layers", "params", "eval", "stability", "perplexity", "train"):
        assert first[key] == second[key], key


@pytest.mark.parametrize("launcher,gpus,target", [("slurm_gpu", 1, "SlurmLauncher"), ("slurm_70b", 4, "SlurmLauncher"),
                                                  ("local", 0, "LocalLauncher")])
def test_launcher_presets_compose(launcher, gpus, target):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"hydra/launcher={launcher}", "model=llama3.1-70b"],
                      return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    assert cfg.hydra.launcher.gpus_per_node == gpus and cfg.hydra.launcher.timeout_min >= 120


def test_parallel_sweep_jobs_compute_shared_stages_once(tmp_path):
    """A multirun under the submitit launcher (the SLURM code path, run locally: each job its own process,
    jobs in parallel) computes the dense evaluation and the similarity profile once; the other job waits
    on the stage lock and reuses them. Each job is a sparsity level of the same model and suite."""
    env = dict(os.environ, WANDB_MODE="disabled", LLM_STREAMLINE_STAGES=str(tmp_path / "stages"),
               OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "llm_streamline", "-m", "hydra/launcher=local", "experiment=smoke",
                          "replacement=none", "sparsity.layers=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                         env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/results.json"))]
    assert [r["layers"]["n_removed"] for r in runs] == [1, 2]
    assert sorted(r["cache"]["dense_eval_reused"] for r in runs) == [False, True]
    assert runs[0]["eval"] == runs[0]["eval"] and all(r["eval"].keys() == runs[0]["eval"].keys() for r in runs)
    assert len(list((tmp_path / "stages").glob("eval_dense-*.json"))) == 1


def test_perplexity_importance_removes_the_block_with_the_lowest_perplexity(tmp_path):
    cfg = compose_run("experiment=smoke", "replacement=none", "sparsity.importance=perplexity")
    res = recipes.run(cfg, tmp_path)
    ppl = res["layers"]["block_perplexity"]
    assert len(ppl) == 8 - 2 + 1 and res["layers"]["removed"][0] == min(range(len(ppl)), key=ppl.__getitem__)


def test_target_sparsity_picks_the_closest_n(tmp_path):
    cfg = compose_run("experiment=smoke", "sparsity=target25", "sparsity.basis=layers", "replacement=none")
    res = recipes.run(cfg, tmp_path)
    assert res["layers"]["n_removed"] == 2  # 2 of 8 layers = 25% of the decoder-layer parameters
    assert res["params"]["sparsity_layers_basis"] == pytest.approx(0.25)


def test_wandb_offline_run_files(tmp_path):
    cfg = compose_run("experiment=smoke", "wandb.mode=offline")
    env_before = os.environ.pop("WANDB_MODE", None)
    try:
        recipes.run(cfg, tmp_path)
    finally:
        if env_before is not None:
            os.environ["WANDB_MODE"] = env_before
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


@pytest.mark.slow
def test_main_job_on_real_smollm2_with_small_limits(tmp_path):
    """The default preset (embedded SmolLM2-135M, offline data) end to end, with small sizes."""
    cfg = compose_run("data.seq_len=64", "data.calib_samples=8", "data.train_samples=16", "data.val_samples=4",
                      "eval=smoke", "eval.speed=true", "eval.speed_tokens=32", "train.batch_size=4",
                      "wandb.mode=disabled")
    res = recipes.run(cfg, tmp_path)
    assert res["model"]["num_layers"] == 30 and res["layers"]["n_removed"] == 8
    start = res["layers"]["removed"][0]
    assert 1 <= start <= 22  # neither the first layer nor past the end
    assert res["params"]["dense"] == 134_515_008
    assert 0.15 < res["params"]["sparsity"] < 0.3  # 8 of 30 layers, net of the FFN replacement
    assert res["train"]["best_val_loss"] < res["train"]["initial_val_loss"]
    assert res["perplexity"]["dense"]["ppl"] < 100  # a real model on English text
    assert res["speed"]["flops_ratio"] > 1.2
    from llm_streamline import load_pruned

    again = load_pruned(res["checkpoint"])
    assert sum(p.numel() for p in again.parameters()) == res["params"]["pruned"]


def test_same_seed_gives_bit_identical_runs_without_any_cache(tmp_path, monkeypatch):
    """Two runs that share no stage: same block, same trained weights, same metrics, bit for bit."""
    from safetensors.torch import load_file

    cfg = compose_run("experiment=smoke", "replacement=ffn")
    outs = []
    for name in ("a", "b"):
        monkeypatch.setenv("LLM_STREAMLINE_STAGES", str(tmp_path / f"stages-{name}"))
        outs.append(recipes.run(cfg, tmp_path / name))
    for key in ("layers", "params", "eval", "stability", "perplexity", "train"):
        assert outs[0][key] == outs[1][key], key
    wa, wb = (load_file(str(tmp_path / n / "model" / "model.safetensors")) for n in ("a", "b"))
    assert all((wa[k] == wb[k]).all() for k in wa)


def test_above_chance_retention_uses_each_tasks_option_count():
    from llm_streamline.recipes.common import chance_levels, eval_table

    rows = [{"task": "a", "loglikelihoods": [0.0, 0.0]}, {"task": "a", "loglikelihoods": [0.0] * 4}]
    chances = chance_levels(rows)
    assert chances == {"a": pytest.approx(0.375)}
    row = eval_table({"a": {"acc": 0.6}}, {"a": {"acc": 0.5}}, chances)["a"]
    assert row["acc_retention"] == pytest.approx(0.5 / 0.6)
    assert row["acc_above_chance_retention"] == pytest.approx((0.5 - 0.375) / (0.6 - 0.375))


def test_lora_healing_of_plain_pruning_in_the_same_harness(tmp_path):
    cfg = compose_run("experiment=smoke", "replacement=none", "train=lora", "train.max_steps=3",
                      "train.batch_size=4")
    res = recipes.run(cfg, tmp_path)
    assert res["train"]["method"] == "lora" and res["train"]["trainable_params"] > 0
    assert res["params"]["pruned"] < res["params"]["dense"]  # adapters merged back: no extra parameters
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(res["checkpoint"])  # stock checkpoint
    again = recipes.run(cfg, tmp_path / "again")  # the adapters come from the stage cache: no training
    assert "train" not in again["timings"]
    for key in ("layers", "params", "eval", "perplexity", "train"):
        assert again[key] == res[key], key


def test_schema_defaults_equal_the_default_presets():
    """A key left out of a preset, or a config built in code, means what the default run means."""
    from dataclasses import fields

    import yaml

    from llm_streamline import config as C

    conf = Path(__file__).resolve().parents[1] / "conf"
    top = yaml.safe_load((conf / "config.yaml").read_text())
    chosen = {k: v for d in top["defaults"] if isinstance(d, dict) for k, v in d.items()}
    schemas = {"data": C.DataConfig, "sparsity": C.SparsityConfig, "replacement": C.ReplacementConfig,
               "train": C.TrainConfig, "eval": C.EvalConfig, "method": C.MethodConfig}
    differ = []
    for group, schema in schemas.items():
        preset = yaml.safe_load((conf / group / f"{chosen[group]}.yaml").read_text())
        default = schema()
        names = {f.name for f in fields(schema)}
        for key, value in preset.items():
            if key in names and getattr(default, key) != value:
                differ.append(f"{group}.{key}: schema {getattr(default, key)!r}, preset {chosen[group]} {value!r}")
    assert not differ, differ
    # each method preset extends its own schema and repeats only defaults (sleb_gpu: the original's calibration)
    for preset in presets("method"):
        text = yaml.safe_load((conf / "method" / f"{preset}.yaml").read_text())
        schema_name = next(d for d in text["defaults"] if isinstance(d, str) and d.endswith("_schema@_here_"))
        schema = C.METHOD_SCHEMAS[schema_name.removeprefix("/method_").removesuffix("_schema@_here_")]
        assert type(compose_run(f"method={preset}").method) is schema, preset
        for key, value in text.items():
            if key != "defaults" and preset != "sleb_gpu":
                assert getattr(schema(), key) == value, (preset, key)


def test_embedded_models_are_the_ones_the_loader_knows():
    from llm_streamline.config import EMBEDDED_MODELS
    from llm_streamline.models.loading import EMBEDDED

    assert set(EMBEDDED_MODELS) == set(EMBEDDED)
    with pytest.raises(ConfigError, match="the embedded models are"):
        validate(compose_run("model.name_or_path=gemma3-1b"))


def test_a_config_recorded_before_an_option_existed_reads_as_a_new_run_of_the_same_experiment():
    """The report groups replicates by their recorded .hydra/config.yaml: a run kept before model.infer_batch_size
    existed reads as a new run with it at its default (null), and a different value still tells runs apart."""
    import yaml
    from omegaconf import OmegaConf

    from llm_streamline.config import recorded_config

    def kept(*overrides):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return yaml.safe_load(OmegaConf.to_yaml(compose(config_name="config", overrides=list(overrides))))

    new, old = kept(), kept()
    del old["model"]["infer_batch_size"]
    assert recorded_config(old) == recorded_config(new) != recorded_config(kept("model.infer_batch_size=32"))
    # one method schema (every method's options) and train=lora as train.loss=lora, as runs recorded them before
    from llm_streamline.config import LEGACY_METHOD_KEY

    old = kept("method=shortgpt")
    old["method"] = {**LEGACY_METHOD_KEY, **old["method"]}
    assert recorded_config(old) == recorded_config(kept("method=shortgpt"))
    old = kept("replacement=none")
    old["method"] = {**LEGACY_METHOD_KEY, "heal": "lora"}
    old["train"].update(loss="lora", epochs=4, lr=2e-4, min_lr=2e-5, weight_decay=0.0)
    assert recorded_config(old) == recorded_config(kept("train=lora"))


def test_forward_only_stages_run_at_model_infer_batch_size(tmp_path, monkeypatch):
    """model.infer_batch_size, not train.batch_size, sizes the similarity profile's and SLEB's forward passes
    (smoke: 4 calibration blocks, train.batch_size=4); the results do not depend on it."""
    import torch

    from llm_streamline.recipes import baseline, common

    def run(*extra):
        monkeypatch.setenv("LLM_STREAMLINE_STAGES", str(tmp_path / f"stages{len(extra)}"))  # nothing reused
        ctx = common.start_run(compose_run("experiment=smoke", "method=sleb", *extra), tmp_path / f"run{len(extra)}")
        common.load_dense_model(ctx)
        common.load_data(ctx)
        layer_type, batches = type(ctx.stack.layers[0]), []

        def seen(module, args, output):  # every decoder layer call, the shared-weight copies' too
            if isinstance(module, layer_type):
                batches.append((output[0] if isinstance(output, tuple) else output).shape[0])
        hook = torch.nn.modules.module.register_module_forward_hook(seen)
        try:
            profile = common.similarity(ctx)
            in_profile = list(batches)
            c, _ = baseline.compress(ctx, profile, 2, 0)
        finally:
            hook.remove()
        return profile, c.removed, in_profile, batches[len(in_profile):]

    profile, removed, in_profile, in_sleb = run()
    assert max(in_profile) == max(in_sleb) == 4  # train.batch_size (null: as before the option existed)
    profile3, removed3, in_profile3, in_sleb3 = run("model.infer_batch_size=3")
    assert max(in_profile3) == max(in_sleb3) == 3 and 1 in in_profile3  # batches of 3 and 1
    assert removed3 == removed
    for n in profile.mean_cos:
        assert profile3.mean_cos[n] == pytest.approx(profile.mean_cos[n], abs=1e-5)
