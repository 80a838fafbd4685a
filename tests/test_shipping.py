"""Using a saved model the way its ecosystem does: evaluating a checkpoint in the dtype and placement the
model preset asks for."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from llm_streamline import recipes
from llm_streamline.cli import CONF_DIR, to_run_config
from llm_streamline.config import ModelConfig, ReplacementConfig
from llm_streamline.models.anatomy import anatomy_of
from llm_streamline.models.checkpoints import save_checkpoint
from llm_streamline.models.layers import find_decoder_stack, remove_block
from llm_streamline.models.loading import load_model
from llm_streamline.recipes import eval_checkpoint
from llm_streamline.replace import build_replacement, slot_checkpoint

START, N = 2, 3


def compose_run(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_run_config(compose(config_name="config", overrides=list(overrides)))


def save_tiny(dest: Path, rtype: str, dtype: torch.dtype = torch.float32, terms_from: Path | None = None) -> Path:
    """The tiny Llama with layers [2, 5) replaced by an untrained `rtype` slot, saved as a run saves it (in `dtype`,
    with the terms files of `terms_from`)."""
    model, tok = load_model(ModelConfig(name="tiny-llama", source="tiny", family="llama"), seed=0)
    model.to(dtype)
    stack = find_decoder_stack(model)
    rcfg = ReplacementConfig(type=rtype)
    slot = build_replacement(rcfg, list(stack.layers[START:START + N]), stack.config, anatomy=anatomy_of(model, START))
    remove_block(model, START, N, slot)
    record = {"method": "streamline", "replacement": rtype, "block": {"start": START, "end": START + N}}
    save_checkpoint(model, tok, dest, record, *slot_checkpoint(rcfg, model, START), terms_from=terms_from)
    return dest


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("saved")
    return {r: save_tiny(base / r, r) for r in ("none", "ffn")}


@pytest.mark.parametrize("rtype", ["none", "ffn"])  # a stock checkpoint and one only this package loads
def test_eval_of_a_checkpoint_uses_the_presets_dtype_and_batch_size(rtype, saved, tmp_path, monkeypatch):
    seen = {}
    real = eval_checkpoint.run_lm_eval

    def spy(model, tok, tasks, limit, batch_size, **kw):
        seen.update(dtypes={p.dtype for p in model.parameters()}, batch_size=batch_size)
        return real(model, tok, tasks, limit, batch_size, **kw)

    monkeypatch.setattr(eval_checkpoint, "run_lm_eval", spy)
    cfg = compose_run("experiment=smoke", "mode=eval", f"checkpoint={saved[rtype]}", "model.dtype=bfloat16",
                      "eval.batch_size=3", "eval.limit=2")
    res = eval_checkpoint.run(cfg, tmp_path)
    assert seen == {"dtypes": {torch.bfloat16}, "batch_size": 3}
    assert res["model"]["dtype"] == "bfloat16" and res["eval_settings"]["batch_size"] == 3
    assert all(0 <= m["model"]["acc"] <= 1 for m in res["eval"].values())
    (lm_eval_results,) = (tmp_path / "lm_eval" / rtype).glob("results_*.json")  # lm-eval's own files too
    assert {p.name.split("_2")[0] for p in (tmp_path / "lm_eval" / rtype).glob("samples_*.jsonl")} == {
        "samples_synthetic_cloze"}


@pytest.mark.parametrize("rtype", ["none", "ffn"])
def test_a_checkpoint_loads_spread_by_a_device_map(rtype, saved):
    """The path mode=eval takes with model.device_map (the config check asks for CUDA there; on this CPU
    machine accelerate's planner puts every module on the CPU, and the hooks must leave the logits equal)."""
    from llm_streamline import load_pruned

    plain = load_pruned(saved[rtype])
    spread = load_pruned(saved[rtype], device_map="auto")
    if rtype == "ffn":  # placed by accelerate's planner (transformers itself places stock checkpoints)
        assert getattr(spread, "hf_device_map", None) == {"": "cpu"}
    x = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(spread(x).logits, plain(x).logits)


# ------------------------------------------------------------------------------------------------ W&B
def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def wandb_log_bytes(offline_run: Path) -> bytes:
    """The offline run's record file (protobuf records): the strings of the run record appear verbatim."""
    return b"".join(p.read_bytes() for p in offline_run.glob("*.wandb"))


def test_wandb_run_resumes_with_an_id_from_the_run_directory(tmp_path, monkeypatch):
    from llm_streamline.tracking import Tracker, run_id, run_tags

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_run("experiment=smoke", "replacement=swiglu", "sparsity=target25", "seed=3")
    ids = []
    for attempt in range(2):  # a job and its requeue write into the same run directory
        tracker = Tracker(cfg.wandb, tmp_path, config={}, name="job", job_type="run", tags=run_tags(cfg))
        assert tracker.run.job_type == "run"
        assert set(tracker.run.tags) == {"method=streamline", "replacement=swiglu", "target=0.25", "seed=3"}
        ids.append(tracker.run.id)
        tracker.log({"train/loss": 1.0 / (attempt + 1)})
        tracker.finish()
    assert ids[0] == ids[1] == run_id(tmp_path) != run_id(tmp_path / "other")
    runs = offline_runs(tmp_path)
    # wandb names offline dirs offline-run-<second>-<id>; two attempts in the same second get a "-1" suffix
    assert runs and all(re.search(rf"-{ids[0]}(-\d+)?$", r.name) for r in runs)
    assert b"replacement=swiglu" in wandb_log_bytes(runs[-1])


def test_wandb_job_type_is_checked():
    from llm_streamline.config import WandbConfig
    from llm_streamline.tracking import Tracker

    with pytest.raises(ValueError, match="job_type"):
        Tracker(WandbConfig(mode="disabled"), Path("."), config={}, name="x", job_type="pipeline")


def test_eval_mode_is_logged_to_wandb(saved, tmp_path, monkeypatch):
    from llm_streamline.tracking import run_id

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_run("experiment=smoke", "mode=eval", f"checkpoint={saved['ffn']}", "eval.limit=2",
                      "objective=avg_acc")
    eval_checkpoint.run(cfg, tmp_path)
    runs = offline_runs(tmp_path)
    assert len(runs) == 1 and runs[0].name.endswith(f"-{run_id(tmp_path)}")
    record = wandb_log_bytes(runs[0])
    assert b"checkpoint=ffn" in record and b"eval/per_task" in record and b"objective/avg_acc" in record


RESULTS = {"eval": {"piqa": {"dense": {"acc": 0.7}, "pruned": {"acc": 0.6}},
                    "arc_easy": {"dense": {"acc": 0.5}, "pruned": {"acc": 0.4}}},
           "perplexity": {"dense": {"ppl": 10.0}, "pruned": {"ppl": 12.5}},
           "stability": {"average": {"stability": 0.8}}}


@pytest.mark.parametrize("objective,expected", [("ppl", 12.5), ("avg_acc", 0.5), ("stability", 0.8)])
def test_sweep_objective_is_the_configured_metric(objective, expected):
    from llm_streamline.config import validate
    from llm_streamline.tracking import sweep_objective

    validate(compose_run(f"objective={objective}"))
    assert sweep_objective(RESULTS, objective) == pytest.approx(expected)
    # an older mode=eval record (flat table), migrated on read
    assert sweep_objective({"method": "eval", "eval": {"piqa": {"acc": 0.25}}}, "avg_acc") == 0.25


def test_an_unknown_objective_fails_at_composition():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="objective=loss") as err:  # an Enum in the schema
        compose_run("objective=loss")
    assert "expected one of [ppl, avg_acc, stability]" in str(err.value.__cause__)


# ------------------------------------------------------------------------------------------------ export
SWIGLU_OVERRIDES = ("experiment=smoke", "replacement=swiglu", "sparsity.start=2", "train.max_steps=4")


@pytest.fixture(scope="module")
def swiglu_run(tmp_path_factory) -> Path:
    """A whole smoke run with a SwiGLU slot, saved as the CLI saves it (with Hydra's overrides record)."""
    run_dir = tmp_path_factory.mktemp("swiglu-run")
    recipes.run(compose_run(*SWIGLU_OVERRIDES), run_dir)
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in SWIGLU_OVERRIDES))
    return run_dir


def test_a_run_keeps_lm_evals_own_files_beside_ours(swiglu_run):
    """lm-eval's results and samples files of both evaluations, readable by lm-eval's tools."""
    import json

    for which in ("dense", "pruned"):
        (results_file,) = (swiglu_run / "lm_eval" / which).glob("results_*.json")
        written = json.loads(results_file.read_text())
        ours = json.loads((swiglu_run / "results.json").read_text())["eval"]
        assert written["results"]["synthetic_cloze"]["acc,none"] == ours["synthetic_cloze"][which]["acc"]
        assert len(list((swiglu_run / "lm_eval" / which).glob("samples_*.jsonl"))) == len(ours)


def tiny_ids() -> torch.Tensor:
    return torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def test_export_turns_a_swiglu_slot_into_a_stock_checkpoint_with_a_model_card(swiglu_run, tmp_path):

    from transformers import AutoModelForCausalLM

    from llm_streamline import load_pruned
    from llm_streamline.export import export, parse_args

    out = export(parse_args([f"run={swiglu_run}", f"out={tmp_path / 'exp'}"]), command="llm-streamline-export x")
    assert not (out / "streamline_config.json").exists()
    stock = AutoModelForCausalLM.from_pretrained(out).eval()  # stock transformers, no project code
    pruned = load_pruned(swiglu_run / "model")
    with torch.no_grad():
        torch.testing.assert_close(stock(tiny_ids()).logits, pruned(tiny_ids()).logits, atol=1e-5, rtol=0)
    from llm_streamline import record

    card = (out / "README.md").read_text()
    rec = record.read(swiglu_run)
    assert "method: `streamline`, replacement: `swiglu`" in card and "layers [2, 4) of 8" in card
    d, p = rec.score("synthetic_cloze", "dense"), rec.score("synthetic_cloze", "pruned")
    assert f"| synthetic_cloze | acc | {rec.items('synthetic_cloze')} | {d.text()} | {p.text()} |" in card  # intervals
    assert "llm-streamline experiment=smoke replacement=swiglu sparsity.start=2" in card
    assert "AutoModelForCausalLM.from_pretrained" in card


def test_outputs_are_readable_by_others(swiglu_run, tmp_path):
    from llm_streamline.export import export, parse_args

    umask = os.umask(0o022)
    os.umask(umask)
    if umask & 0o044:
        pytest.skip(f"umask {umask:o} hides files from others by choice")
    out = export(parse_args([f"run={swiglu_run}", f"out={tmp_path / 'exp'}"]))
    written = [swiglu_run / "results.json", swiglu_run / "samples_pruned.jsonl", *(swiglu_run / "model").iterdir(),
               *out.iterdir()]
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {oct(0o644)}
    assert oct((swiglu_run / "model").stat().st_mode & 0o777) == oct(0o755) == oct(out.stat().st_mode & 0o777)


def test_push_to_hub_uploads_the_export(swiglu_run, tmp_path, monkeypatch):
    import huggingface_hub

    from llm_streamline.export import export, parse_args

    calls = []

    class LocalHub:  # stands in for HfApi: the "hub" is a local directory
        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id, private))

        def upload_folder(self, folder_path, repo_id, commit_message):
            shutil.copytree(folder_path, tmp_path / "hub" / repo_id)

    monkeypatch.setattr(huggingface_hub, "HfApi", LocalHub)
    export(parse_args([f"run={swiglu_run}", f"out={tmp_path / 'exp'}"]))
    assert calls == [] and not (tmp_path / "hub").exists()  # off by default
    export(parse_args([f"run={swiglu_run}", f"out={tmp_path / 'exp2'}", "push_to_hub=me/tiny-pruned"]))
    assert calls == [("create", "me/tiny-pruned", True)]
    assert {p.name for p in (tmp_path / "hub" / "me/tiny-pruned").iterdir()} >= {"README.md", "config.json",
                                                                                  "model.safetensors"}


def test_export_is_a_wandb_artifact_of_the_run(swiglu_run, tmp_path, monkeypatch):
    from llm_streamline.export import export, parse_args
    from llm_streamline.tracking import run_id

    monkeypatch.setenv("WANDB_MODE", "offline")
    export(parse_args([f"run={swiglu_run}", f"out={tmp_path / 'exp'}"]))
    # its own run (not the training run reopened), its files beside the source run's, linked by the source's id
    runs = [r for r in offline_runs(swiglu_run) if r.name.endswith(f"-{run_id(tmp_path / 'exp')}")]
    assert runs and run_id(tmp_path / "exp") != run_id(swiglu_run)
    name = f"model-{swiglu_run.name}".encode()
    deadline = time.monotonic() + 30  # wandb-core may still be appending the artifact record after finish()
    while name not in wandb_log_bytes(runs[-1]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert name in wandb_log_bytes(runs[-1]) and run_id(swiglu_run).encode() in wandb_log_bytes(runs[-1])


def test_an_ffn_slot_exports_in_this_packages_format_and_refuses_gguf(saved, tmp_path):
    from llm_streamline.export import ExportError, export, parse_args

    out = export(parse_args([f"run={saved['ffn']}", f"out={tmp_path / 'exp'}"]))
    assert (out / "streamline_config.json").exists() and "llm_streamline.load_pruned" in (out / "README.md").read_text()
    with pytest.raises(ExportError, match="stock layout"):
        export(parse_args([f"run={saved['ffn']}", f"out={tmp_path / 'gguf'}", "format=gguf"]))
    assert not (tmp_path / "gguf").exists()


@pytest.mark.parametrize("args,message", [(["run=/no/such/run"], "no model saved"),
                                          (["run=.", "format=onnx"], "format='onnx'"),
                                          (["run=.", "format=gguf", "dtype=bfloat16"], "dtype='bfloat16'"),
                                          (["run=.", "colour=red"], "colour")])
def test_export_bad_input_is_one_line(args, message, capsys):
    from llm_streamline.export import main

    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and message in err


# ------------------------------------------------------------------------------------------------ GGUF
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gguf_export_loads_back_in_transformers_with_the_same_logits(dtype, swiglu_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_streamline.export import SavedRun, export, parse_args, to_stock

    out = export(parse_args([f"run={swiglu_run}", f"out={tmp_path / 'gguf'}", "format=gguf", f"dtype={dtype}"]))
    gguf_file = f"{swiglu_run.name}-{dtype}.gguf"
    assert f'gguf_file="{gguf_file}"' in (out / "README.md").read_text()
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf_file, dtype=torch.float32).eval()
    # the reference: the stock export at the same precision, computed in fp32 as the GGUF reader loads it
    reference = to_stock(SavedRun.find(swiglu_run), getattr(torch, dtype))[0].float().eval()
    assert loaded.config.num_hidden_layers == reference.config.num_hidden_layers == 7
    with torch.no_grad():
        torch.testing.assert_close(loaded(tiny_ids()).logits, reference(tiny_ids()).logits, atol=1e-3, rtol=0)
    text = "Pruned models, shared: llama.cpp reads this."
    tok = AutoTokenizer.from_pretrained(out, gguf_file=gguf_file)
    assert tok(text).input_ids == AutoTokenizer.from_pretrained(swiglu_run / "model")(text).input_ids


def test_gguf_refuses_an_unsupported_architecture(tmp_path):
    from llm_streamline.gguf_export import GGUFExportError, write_gguf
    from llm_streamline.models.loading import tiny_model

    with pytest.raises(GGUFExportError, match="model_type 'opt'"):
        write_gguf(tiny_model("opt", 512), tmp_path, tmp_path / "x.gguf")


# ------------------------------------------------------------------------------------------------ defaults
def test_speed_measurement_uses_no_deprecated_transformers_api():
    import warnings

    from llm_streamline.evaluate.speed import measure_throughput
    from llm_streamline.models.loading import tiny_model

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers' "`past_key_values` ... removed in 5.40"
        res = measure_throughput(tiny_model("llama", 512), batch_size=1, prompt_len=8, decode_tokens=3, repeats=1)
    assert res["decode_tokens_per_s"] > 0


def test_a_missing_or_broken_tokenizer_is_named_with_its_directory(tmp_path):
    from llm_streamline.models.checkpoints import load_tokenizer

    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no tokenizer in the checkpoint directory"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    with pytest.raises(ValueError, match=f"{tmp_path}: the tokenizer cannot be loaded"):
        load_tokenizer(tmp_path)


def test_an_error_is_printed_once_and_kept_in_the_run_log(tmp_path):
    """The console gets the one `llm-streamline: error:` line (Hydra's console handler used to repeat it as a log
    line); the run's log file keeps it with its exception type."""
    import subprocess
    import sys

    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0",
           "LLM_STREAMLINE_STAGES": str(tmp_path / "stages")}
    run_dir = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "llm_streamline", "experiment=smoke", "eval.tasks=[no_such_task]",
                          f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2
    printed = [line for line in (res.stdout + res.stderr).splitlines() if "no_such_task" in line]
    assert len(printed) == 1 and printed[0].startswith("llm-streamline: error: task 'no_such_task'"), printed
    logged = "".join(p.read_text() for p in run_dir.glob("*.log"))
    assert "ConfigError: task 'no_such_task'" in logged  # bad input (exit 2), with its type


MODEL_PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "model").glob("*.yaml"))


@pytest.mark.parametrize("preset", MODEL_PRESETS)
def test_every_model_preset_is_valid_with_the_defaults(preset):
    """`model=<preset>` and nothing else composes and validates; where the model's config is at hand without
    network (tiny and embedded models), the default sparsity leaves it layers. No weights are loaded."""
    from llm_streamline import preflight
    from llm_streamline.config import validate

    extra = ["model.name_or_path=some-org/some-model"] if preset == "hub" else []  # hub names no model itself
    cfg = compose_run(f"model={preset}", *extra)
    validate(cfg)
    if cfg.model.source == "tiny" or (cfg.model.source == "embedded" and preflight.model_config(cfg.model)):
        config = preflight.model_config(cfg.model)
        preflight.check_layers(cfg, config)
        assert 1 <= cfg.sparsity.layers < config.num_hidden_layers


def test_the_default_run_is_unchanged_and_a_tiny_preset_takes_a_quarter_of_its_layers():
    from dataclasses import asdict

    from llm_streamline.config import SparsityConfig

    default = compose_run()
    assert default.model.name == "smollm2-135m" and asdict(default.sparsity) == asdict(SparsityConfig())
    assert default.sparsity.layers == 8  # 8 of 30: the block [11, 19) of the measured runs
    assert compose_run("model=tiny-llama").sparsity.layers == 2
    assert compose_run("model=tiny-llama", "sparsity=layers4").sparsity.layers == 4  # the command line wins
    assert compose_run("model=tiny-llama", "sparsity.layers=3").sparsity.layers == 3


def test_too_many_layers_fail_before_the_model_loads():
    from llm_streamline import preflight
    from llm_streamline.config import ConfigError

    cfg = compose_run("model=tiny-llama", "sparsity.layers=8")
    with pytest.raises(ConfigError, match="sparsity.layers=8: model tiny-llama has only 8 layers"):
        preflight.check_run(cfg)


# ------------------------------------------------------------------------------------------------ terms, dtype
GEMMA_NOTICE = "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms\n"


def test_export_passes_on_the_source_checkpoints_notice(tmp_path):
    """Gemma's terms require its NOTICE with every copy of a derived model: a run saves the source checkpoint's
    terms files beside the pruned model, and the export passes them on (for a model saved before runs kept them,
    from the source checkpoint the record names)."""
    import json

    from llm_streamline.export import export, parse_args

    source = tmp_path / "source"
    source.mkdir()
    (source / "NOTICE").write_text(GEMMA_NOTICE)
    (source / "GEMMA_TERMS.html").write_text("<html>terms</html>")
    run = save_tiny(tmp_path / "run" / "model", "none", terms_from=source).parent
    assert (run / "model" / "NOTICE").read_text() == GEMMA_NOTICE
    out = export(parse_args([f"run={run}", f"out={tmp_path / 'exp'}"]))
    assert (out / "NOTICE").read_text() == GEMMA_NOTICE and (out / "GEMMA_TERMS.html").exists()
    # saved without them: from the local source checkpoint of the run's record
    older = save_tiny(tmp_path / "older" / "model", "ffn").parent
    (older / "results.json").write_text(json.dumps({"model": {"source": "local", "path": str(source)}}))
    out = export(parse_args([f"run={older}", f"out={tmp_path / 'exp-older'}"]))
    assert (out / "NOTICE").read_text() == GEMMA_NOTICE


def test_export_keeps_the_saved_dtype_unless_told(tmp_path):
    """A model saved in bfloat16 is exported in bfloat16 (the default was float32: twice the size); dtype= still
    casts; GGUF, which holds float32 or float16, gets float32 (exact)."""
    from safetensors import safe_open

    from llm_streamline.export import export, parse_args

    def dtypes(out: Path) -> set[str]:
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            return {str(f.get_slice(k).get_dtype()) for k in f.keys()}

    run = save_tiny(tmp_path / "run" / "model", "none", dtype=torch.bfloat16).parent
    assert dtypes(export(parse_args([f"run={run}", f"out={tmp_path / 'as-saved'}"]))) == {"BF16"}
    assert dtypes(export(parse_args([f"run={run}", f"out={tmp_path / 'f32'}", "dtype=float32"]))) == {"F32"}
    out = export(parse_args([f"run={run}", f"out={tmp_path / 'gguf'}", "format=gguf"]))
    assert [p.name for p in out.glob("*.gguf")] == ["run-float32.gguf"]
