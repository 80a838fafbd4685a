"""Faults a long sweep on a shared cluster meets, each with the promise it checks (README, "Guarantees"):

- a full disk mid-run (a real write failure: the file-size rlimit makes the OS refuse the write) ends with
  one line naming the stage; no partial artefact is left where a later run would trust it; the rerun
  resumes and ends with the uninterrupted run's results;
- an output directory or stage cache that cannot be written fails in one line before any heavy work;
- NaN/inf in training, evaluation or perplexity stops the run with the stage, the step or item, the cause;
- security: no trust_remote_code unless set, pickled weights refused unread, W&B keys never written.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from llm_streamline import faults, stages
from llm_streamline.evaluate.perplexity import perplexity
from llm_streamline.models.loading import load_model, tiny_model
from llm_streamline.recipes import common

COMPARED = ("layers", "params", "eval", "stability", "perplexity", "train")


def last_line(res: subprocess.CompletedProcess) -> str:
    return res.stderr.strip().splitlines()[-1]


# --------------------------------------------------------------------------------------------- full disk
# In the smoke run the files before the teacher pairs are < 55 kB (the similarity plot is the largest), a
# teacher shard is 66 kB, the saved model 26 MB: the two limits make the disk "fill up" in those stages.
@pytest.mark.parametrize("fsize,stage", [(62_000, "teacher_pairs"), (1_000_000, "save")])
def test_full_disk_fails_in_one_line_keeps_nothing_partial_and_resumes(smoke_cli, fsize, stage, uninterrupted,
                                                                       tmp_path):
    stage_root = tmp_path / "stages"
    full = smoke_cli(tmp_path / "full", stage_root, fsize=fsize)
    assert full.returncode == 3, full.stderr[-2000:]
    line = last_line(full)
    assert line.startswith(f"llm-streamline: error: stage {stage}: cannot write") and "File too large" in line, line
    assert not (tmp_path / "full" / "results.json").exists()
    assert not (tmp_path / "full" / "model").exists()
    leftovers = [p.name for p in stage_root.rglob("*") if ".locks" not in p.parts and p.name != ".llm-streamline"
                 and (p.name.startswith(".") or p.name.endswith(".partial"))]
    assert leftovers == []
    kept = {p.name.split("-")[0] for p in stage_root.iterdir()}
    assert {"profile", "eval_dense", "ppl_dense"} <= kept
    complete_teacher = list(stage_root.glob("teacher-*/train/index.json"))
    if stage == "teacher_pairs":
        assert complete_teacher == [] and "train" not in kept  # never half-written: the next run recomputes it
    else:
        assert complete_teacher and {"train", "eval_pruned"} <= kept
    resumed = smoke_cli(tmp_path / "resumed", stage_root)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    again = json.loads((tmp_path / "resumed" / "results.json").read_text())
    if stage == "save":
        assert "train" not in again["timings"]  # the trained replacement was kept and reused
    for key in COMPARED:
        assert again[key] == uninterrupted[key], key


def test_blocked_output_dir_fails_before_any_work(smoke_cli, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    res = smoke_cli(blocker / "out", tmp_path / "stages")
    assert res.returncode == 2 and "load_model" not in res.stderr
    assert last_line(res) == (f"llm-streamline: error: output directory {blocker / 'out'}: {blocker} is a file, "
                              "not a directory")


def test_unwritable_stage_cache_fails_before_any_work(smoke_cli, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    res = smoke_cli(tmp_path / "out", blocker / "stages")
    assert res.returncode == 2 and "== load_model" not in res.stderr
    line = last_line(res)
    assert line.startswith(f"llm-streamline: error: the stage cache {blocker / 'stages'} is not writable"), line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_read_only_output_dir_fails_before_any_work(smoke_cli, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        res = smoke_cli(ro / "out", tmp_path / "stages")
    finally:
        ro.chmod(0o755)
    assert res.returncode == 2 and last_line(res).endswith(f"{ro} is not writable")


def test_check_writable_reports_a_full_disk(tmp_path, monkeypatch):
    import errno

    def no_space(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", no_space)
    with pytest.raises(stages.NotWritableError, match="No space left on device"):
        stages.check_writable(tmp_path / "out", "the output directory")
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "out").iterdir()] == []  # the probe file is gone


# ------------------------------------------------------------------------------------------ NaN and inf
@pytest.fixture()
def tiny(tok):
    return tiny_model("llama", len(tok), special_ids={"pad_token_id": tok.pad_token_id or 0})


def _blocks(tok, n=2, t=16):
    return torch.randint(0, len(tok), (n, t), generator=torch.Generator().manual_seed(0))


def test_nan_weights_in_evaluation_stop_with_stage_item_and_cause(tiny, tok, tmp_path):
    from llm_streamline.config import EvalConfig, RunConfig

    with torch.no_grad():
        tiny.model.layers[3].mlp.down_proj.weight[0, 0] = float("nan")
    cfg = RunConfig(eval=EvalConfig(name="t", tasks=["piqa"], limit=2, batch_size=4, offline=True,
                                    perplexity=False, speed=False))
    key = stages.stage_key("eval_pruned", test="nan")
    with pytest.raises(faults.NumericalFault) as err:
        stages.cached_json(key, lambda: common.evaluate_suite(tiny, tok, cfg, "eval_pruned", _blocks(tok)[:1]))
    msg = str(err.value)
    assert msg.startswith("eval_pruned: log-likelihoods [nan")
    assert "at task piqa doc 0" in msg and "non-finite weights in model.layers.3.mlp.down_proj.weight" in msg
    assert not stages.stage_dir(key).with_suffix(".json").exists()  # a NaN result is never cached


def test_overflow_in_evaluation_names_the_first_module(tiny, tok):
    with torch.no_grad():
        tiny.model.layers[5].self_attn.o_proj.weight.fill_(3e38)  # finite weights, infinite activations
    rows = [{"task": "piqa", "doc_id": 7, "loglikelihoods": [float("-inf"), -3.0]}]
    with pytest.raises(faults.NumericalFault) as err:
        faults.check_loglikelihoods(rows, "eval_pruned", tiny, _blocks(tok)[:1])
    assert "at task piqa doc 7" in str(err.value)
    assert "first non-finite output at model.layers.5.self_attn.o_proj (Linear)" in str(err.value)


def test_nan_in_perplexity_names_the_batch(tiny, tok):
    calls = {"n": 0}

    def poison_second_batch(module, args, kwargs):  # batch 0 is fine; the weights go bad before batch 1
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                tiny.model.layers[1].input_layernorm.weight.fill_(float("inf"))

    tiny.register_forward_pre_hook(poison_second_batch, with_kwargs=True)
    with pytest.raises(faults.NumericalFault, match=r"^perplexity_pruned: negative log-likelihood (nan|inf) at "
                                                    r"batch 1 \(blocks 2..3\); cause: non-finite weights in "
                                                    r"model.layers.1.input_layernorm.weight$"):
        perplexity(tiny, _blocks(tok, n=4), batch_size=2, desc="perplexity_pruned")


def test_diverging_training_stops_with_stage_step_and_cause(smoke_cli, tmp_path):
    res = smoke_cli(tmp_path / "run", tmp_path / "stages", "train.lr=1e30", "train.grad_clip=1e30")
    assert res.returncode == 3, res.stderr[-2000:]
    line = last_line(res)
    assert line.startswith("llm-streamline: error: numerical fault: ") and "at step" in line, line
    assert "cause:" in line and ("train (mse)" in line or "validation (mse)" in line), line
    assert not (tmp_path / "run" / "results.json").exists()
    assert not list((tmp_path / "run").glob("*similarity_profile*"))  # plotted before training: moved in on success
    assert not [p for p in (tmp_path / "stages").iterdir() if p.name.startswith("train-")]


# ---------------------------------------------------------------------------------------------- security
def test_no_preset_enables_trust_remote_code():
    from hydra import compose, initialize_config_dir

    from llm_streamline.cli import CONF_DIR, to_run_config

    for preset in sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml")):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = to_run_config(compose(config_name="config", overrides=[f"model={preset}",
                                                                         "model.name_or_path=x/y"]))
        assert cfg.model.trust_remote_code is False, preset


def test_loader_passes_trust_remote_code_false_and_safetensors_only(monkeypatch, tokenizer_dir, tok):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_streamline.config import ModelConfig

    seen = {}

    def fake_model(path, **kw):
        seen["model"] = kw
        return tiny_model("llama", len(tok))

    def fake_tok(path, **kw):
        seen["tok"] = kw
        return tok

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fake_tok)
    load_model(ModelConfig(name="x", source="hub", name_or_path="some-org/some-model"))
    assert seen["model"]["trust_remote_code"] is False and seen["model"]["use_safetensors"] is True
    assert seen["tok"]["trust_remote_code"] is False


class _Exploit:
    """Unpickling this object runs code: it creates the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("entry", ["model", "checkpoint"])
def test_pickled_weights_are_refused_unread(smoke_cli, entry, tmp_path, tok):
    import pickle

    ckpt = tmp_path / "ckpt"
    tiny_model("llama", len(tok)).config.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    marker = tmp_path / "exploited"
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(_Exploit(marker)))
    args = ["model=hub", f"model.name_or_path={ckpt}"] if entry == "model" else ["mode=eval", f"checkpoint={ckpt}"]
    res = smoke_cli(tmp_path / "out", tmp_path / "stages", *args)
    assert res.returncode == 2, res.stderr[-2000:]
    assert last_line(res) == (f"llm-streamline: error: {ckpt}: no *.safetensors weights (found pytorch_model.bin); "
                              "llm-streamline loads safetensors only (convert with transformers: "
                              "from_pretrained(...).save_pretrained(dir))")
    assert not marker.exists()


def test_framework_writes_weights_as_safetensors_only(uninterrupted):
    run_dir = Path(uninterrupted["checkpoint"]).parent
    stage_root = run_dir.parent / "stages"
    assert list(stage_root.glob("teacher-*/train/*.safetensors")) and list(stage_root.glob("train-*/slot.safetensors"))
    pickles = [p for root in (run_dir, stage_root) for p in root.rglob("*")
               if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert pickles == []
    assert (Path(uninterrupted["checkpoint"]) / "model.safetensors").exists()


def test_wandb_key_is_never_written(smoke_cli, tmp_path):
    secret = "0123456789abcdef0123456789abcdef" + "feedbeef"  # 40 hex characters, like a real key
    res = smoke_cli(tmp_path / "run", tmp_path / "stages", "wandb.mode=offline",
                  env_extra={"WANDB_API_KEY": secret, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "run")})
    assert res.returncode == 0, res.stderr[-2000:]
    assert list((tmp_path / "run").rglob("*.wandb")), "no offline W&B run was written"
    assert secret not in res.stdout + res.stderr
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert secret.encode() not in p.read_bytes(), p
