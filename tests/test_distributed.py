"""Data parallel under torchrun (two CPU processes, gloo): SLEB's search shared by the ranks chooses what one
process chooses; LM-loss, MSE (online teacher pairs) and LoRA training end with identical weights on every rank.
Sharded weights (FSDP2, `model.shard=fsdp`): the profile, SLEB and LoRA healing give one process's results; the MSE
and distillation train what replicated dense models train."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def _torchrun(port: int, args: list[str], stages: Path | None = None, nproc: int = 2,
              **env_extra) -> subprocess.CompletedProcess:
    pytest.importorskip("accelerate")
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", **env_extra)
    if stages is not None:  # its own stage cache: nothing another test computed is reused
        env["LLM_STREAMLINE_STAGES"] = str(stages)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


# gloo on this CPU; NCCL with a card per rank where two CUDA devices are (`pytest -m cuda`): the one-process
# reference then runs on cuda:0, whose kernels may sum in another order than the other card's
TWO_CARDS = [pytest.mark.cuda, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="fewer than two CUDA devices")]
DEVICES = [pytest.param("cpu", 1e-12, 29521, id="gloo"),
           pytest.param("cuda", 1e-5, 29525, id="nccl", marks=TWO_CARDS)]


@pytest.mark.parametrize("device,rel,port", DEVICES)
def test_sleb_search_profile_and_validation_shared_by_two_ranks_match_one_process(tmp_path, device, rel, port):
    """Each rank scores half of the calibration batches; the float64 sums over ranks give the one-process
    perplexities (to 1e-12 on the CPU) and the same layers. The same for the similarity profile and a training's
    validation loss."""
    res = _torchrun(port, [str(HERE / "dp_worker.py"), str(tmp_path)], DP_WORKER_DEVICE=device)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    sys.path.insert(0, str(HERE))
    import dp_worker

    from llm_streamline.models.layers import find_decoder_stack

    one = dp_worker.search(device=device)
    assert r0["removed"] == r1["removed"] == one["removed"]
    assert r0["scored"] == r1["scored"] == one["scored"] // 2 > 0  # the work was split, not repeated
    for s0, s1, s in zip(r0["steps"], r1["steps"], one["steps"]):
        assert s0 == s1  # the same reduced values on both ranks
        for layer, ppl in s["candidates_ppl"].items():
            assert s0["candidates_ppl"][layer] == pytest.approx(ppl, rel=rel)
    lm = dp_worker.lm_training(device=device)
    assert r0["lm"]["initial_val_loss"] == r1["lm"]["initial_val_loss"] == pytest.approx(lm["initial_val_loss"],
                                                                                        rel=rel)
    # each step: the two ranks' batches (mean loss logged), one update on both: the same weights, which moved
    assert r0["lm"] == r1["lm"] and len(r0["lm"]["train_loss"]) == 2
    initial = find_decoder_stack(dp_worker.problem()[0]).layers[2].state_dict()
    assert r0["lm"]["slot"] != {k: v.tolist() for k, v in initial.items()}
    p0, p1, p = r0["profile"], r1["profile"], json.loads(json.dumps(dp_worker.profile(device=device)))
    assert p0 == p1 and p0["tokens"] == p["tokens"] == 6 * 16
    for score in ("cosine", "angular", "angular_last"):
        for n, values in p[score].items():
            assert p0[score][n] == pytest.approx(values, rel=rel), (score, n)


# and FSDP's CUDA path (loading onto the card, NCCL, torch's own reset after a stopped forward) on one card
ONE_CARD = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
FSDP_DEVICES = [pytest.param("cpu", 2, 1e-12, 29527, id="gloo"),
                pytest.param("cuda", 2, 1e-5, 29529, id="nccl", marks=TWO_CARDS),
                pytest.param("cuda", 1, 1e-5, 29535, id="nccl-1card", marks=ONE_CARD)]


@pytest.mark.parametrize("device,nproc,rel,port", FSDP_DEVICES)
def test_sharded_model_profile_sleb_and_lora_match_one_process(tmp_path, device, nproc, rel, port):
    """model.shard=fsdp: a safetensors checkpoint loaded by two ranks, each reading only its rows (half the
    parameter bytes resident); the similarity profile and SLEB's search over 5 calibration windows (3 + 2: the
    second rank runs a filler forward, not counted) give one process's scores and choice; LoRA healing of the
    pruned sharded model (activation checkpointing, adapters replicated, merged into each rank's rows) gives one
    process's merged weights (same effective batch) and the same gathered weights on both ranks; the MSE with online
    teacher pairs from the sharded dense model, and distillation from it through the same sharded layers, train
    what a replicated dense model trains on the same ranks."""
    sys.path.insert(0, str(HERE))
    import fsdp_worker
    from safetensors.torch import load_file

    fsdp_worker.save_problem(tmp_path / "model")
    res = _torchrun(port, [str(HERE / "fsdp_worker.py"), str(tmp_path / "model"), str(tmp_path)], nproc=nproc,
                    DP_WORKER_DEVICE=device)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"fsdp_rank{r}.json").read_text()) for r in (0, nproc - 1))
    one, weights = fsdp_worker.one_process()
    one = json.loads(json.dumps(one))
    for r in (r0, r1):  # each rank holds its 1/nproc of every parameter (dims here are even), never the whole
        assert r["local_bytes"] == r["model_bytes"] // nproc
    assert r0["removed"] == r1["removed"] == one["removed"]
    assert r0["profile"] == r1["profile"] and r0["profile"]["tokens"] == one["profile"]["tokens"] == 5 * 16
    for score in ("cosine", "angular", "angular_last"):
        for n, values in one["profile"][score].items():
            assert r0["profile"][score][n] == pytest.approx(values, rel=rel), (score, n)
    for s0, s1, s in zip(r0["steps"], r1["steps"], one["steps"], strict=True):
        assert s0 == s1
        for layer, ppl in s["candidates_ppl"].items():
            assert s0["candidates_ppl"][layer] == pytest.approx(ppl, rel=rel)
    # LoRA: the same training on both ranks, one process's losses (float32 sums in another order: 1e-6)
    assert r0["sha256"] == r1["sha256"] and r0["lora"] == r1["lora"]
    lora = one["lora"]
    assert r0["lora"]["steps"] == lora["steps"] == 2 and r0["lora"]["tokens"] == lora["tokens"]
    assert r0["lora"]["best_val_loss"] < r0["lora"]["initial_val_loss"]  # the adapters learnt something
    for key in ("initial_val_loss", "best_val_loss"):  # on CUDA against the CPU's one process: its kernels' sums
        assert r0["lora"][key] == pytest.approx(lora[key], rel=1e-6 if device == "cpu" else 1e-4)
    merged = load_file(str(tmp_path / "fsdp_merged.safetensors"))
    assert sorted(merged) == sorted(weights)
    tol = 1e-5 if device == "cpu" else 1e-3
    for k, w in weights.items():  # Adam's normalised steps carry the gradients' rounding: 1e-5 of each tensor's size
        assert (merged[k] - w).abs().max() <= tol * w.abs().max(), k
    # MSE with online pairs from the sharded dense model (a replicated layer replacement read from the checkpoint;
    # 5 validation blocks: a filler): what the same two ranks train with a replicated dense model, which moved
    m0, m1 = r0["mse"], r1["mse"]
    assert m0["sha256"] == m1["sha256"] and m0["sharded"] == m1["sharded"]
    assert m0["sharded"]["steps"] == 2 and m0["moved"] > 1e-4
    assert m0["max_diff"] <= (1e-6 if device == "cpu" else 1e-3)
    for key in ("initial_val_loss", "best_val_loss"):
        assert m0["sharded"][key] == pytest.approx(m0["replicated"][key], rel=rel)
    # distillation: the teacher from the sharded dense model, the student through the same sharded layers with the
    # replicated slot (put in for its forwards only: the dense stack is whole afterwards), against a whole dense
    # model and a pruned one over its weights on each rank: the KL alone trains the same slot bit for bit on the
    # CPU; + the hidden-state MSE to 1e-6 (its gradient and the KL's add up in another order)
    assert r0["distill"]["layers"] == r1["distill"]["layers"] == 6
    for loss, exact in (("kl", 0.0), ("kl_mse", 1e-6)):
        d0, d1 = r0["distill"][loss], r1["distill"][loss]
        assert d0["sha256"] == d1["sha256"] and d0["sharded"] == d1["sharded"]
        assert d0["sharded"]["steps"] == 2 and d0["moved"] > 1e-4
        assert d0["max_diff"] <= (exact if device == "cpu" else 1e-3), loss
        for key in ("initial_val_loss", "best_val_loss"):  # a KL of ~3e-3 from near-equal log-probabilities
            assert d0["sharded"][key] == pytest.approx(d0["replicated"][key], abs=1e-7 if device == "cpu" else 1e-5)
        assert d0["sharded"]["best_val_loss"] < d0["sharded"]["initial_val_loss"]


MSE_ONLINE = ["-m", "llm_streamline", "experiment=smoke", "train.teacher=online", "train.batch_size=2",
              "train.max_steps=3", "data.train_samples=16"]


@pytest.fixture(scope="module")
def mse_online_run(tmp_path_factory) -> Path:
    """The run directory of the default method (a layer trained with the MSE, online pairs) by two ranks, each a
    whole replica (shared by two tests)."""
    out = tmp_path_factory.mktemp("mse_online") / "run"
    # its own stage cache: the session's may hold this profile from a one-process test (the same stage key), whose
    # float64 sums over the batches add in another order than two ranks' (1e-7 apart), and the sharded run below
    # is compared with this record to the bit
    res = _torchrun(29519, [*MSE_ONLINE, f"hydra.run.dir={out}"], stages=out.parent / "stages")
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_two_process_mse_training_with_online_pairs_keeps_ranks_identical(mse_online_run):
    """The MSE with online teacher pairs (train=smoke's loss; the LM loss is checked in the worker above): each rank
    computes the pairs of its share of every step's batches; the replacement is the same on both ranks."""
    out = mse_online_run
    r0, r1 = (json.loads((out / f"rank{r}_slot.json").read_text()) for r in (0, 1))
    assert (r0["start"], r0["n"]) == (r1["start"], r1["n"])
    assert r0["sha256"] == r1["sha256"] and r0["sha256"]  # the same trained weights, bit for bit
    assert r0["train"] == r1["train"] and r0["train"]["steps"] == 3
    assert r0["train"]["tokens"] == 3 * 2 * 2 * 32  # steps x batch x ranks x seq_len
    assert r0["train"]["teacher"]["mode"] == "online"
    assert (out / "results.json").exists()


def test_two_process_sleb_with_lora_healing_keeps_ranks_identical(tmp_path):
    """method=sleb method.heal=lora: the ranks share SLEB's search and the LoRA healing; both remove the same
    layers and end with the same adapters; the main rank evaluates and records."""
    out = tmp_path / "run"
    res = _torchrun(29523, ["-m", "llm_streamline", "experiment=smoke", "method=sleb", "method.heal=lora",
                            "train.batch_size=2", "train.max_steps=2", "data.train_samples=8",
                            f"hydra.run.dir={out}"], stages=tmp_path / "stages")
    assert res.returncode == 0, res.stderr[-3000:]
    c0, c1 = (json.loads((out / f"rank{r}_choice.json").read_text()) for r in (0, 1))
    assert c0 == c1 and len(c0["removed"]) == 2
    a0, a1 = (json.loads((out / f"rank{r}_adapters.json").read_text()) for r in (0, 1))
    a0["train"].pop("seconds"), a1["train"].pop("seconds")  # wall time: the one thing the ranks may differ in
    assert a0 == a1 and a0["train"]["steps"] == 2 and a0["train"]["processes"] == 2 and a0["sha256"]
    rec = json.loads((out / "results.json").read_text())
    assert rec["layers"]["removed_indices"] == sorted(c0["removed"]) and rec["host"]["processes"] == 2


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """experiment=smoke's tiny model (seed 0) saved as safetensors with its tokenizer: what a sharded load reads."""
    from llm_streamline.config import ModelConfig
    from llm_streamline.models.loading import tiny_preset

    directory = tmp_path_factory.mktemp("tiny_checkpoint")
    model, tok = tiny_preset(ModelConfig(name="tiny", source="tiny", family="llama"), seed=0)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def _sharded_run_matches(tmp_path: Path, port: int, args: list[str], checkpoint: Path, replicas: Path,
                         weights: str) -> None:
    """`args` run with model.shard=fsdp over `checkpoint` (two ranks, each loading its rows) give the record of the
    same run by two whole replicas (`replicas`): layers, profile, perplexities, task metrics, stability, the
    trained weights (`rank<r>_<weights>.json`) with the same sha256, and the same saved model."""
    out = tmp_path / "run"
    res = _torchrun(port, [*args, "model.source=local", f"model.name_or_path={checkpoint}", "model.shard=fsdp",
                           "eval.speed=false", f"hydra.run.dir={out}"], stages=tmp_path / "stages")
    assert res.returncode == 0, res.stderr[-3000:]
    rec, ref = (json.loads((d / "results.json").read_text()) for d in (out, replicas))
    assert rec["host"]["sharded"] is True and ref["host"]["sharded"] is False
    assert rec["layers"] == ref["layers"] and rec["similarity_profile"] == ref["similarity_profile"]
    assert rec["params"] == ref["params"]
    for side in ("dense", "pruned"):
        assert rec["perplexity"][side] == pytest.approx(ref["perplexity"][side], rel=1e-9)
    assert rec["eval"] == ref["eval"]
    for task, row in ref["stability"]["tasks"].items():
        assert rec["stability"]["tasks"][task] == pytest.approx(row)
    w0, w1, w = (json.loads((d / f"rank{r}_{weights}.json").read_text())
                 for d, r in ((out, 0), (out, 1), (replicas, 0)))
    assert w0["sha256"] == w1["sha256"] == w["sha256"]  # bit for bit what the replicas trained
    # saved: each tensor gathered in turn, written by rank 0: the replicas' saved model, tensor for tensor
    from safetensors.torch import load_file

    saved, ref_saved = ({k: v for f in sorted((d / "model").glob("*.safetensors")) for k, v in load_file(f).items()}
                        for d in (out, replicas))
    assert sorted(saved) == sorted(ref_saved) and all(torch.equal(saved[k], ref_saved[k]) for k in saved)
    assert (out / "model" / "config.json").exists() and (out / "model" / "tokenizer.json").exists()


def test_sharded_default_run_matches_the_replicas_run(tmp_path, mse_online_run, tiny_checkpoint):
    """The default method with model.shard=fsdp: the profile, a layer replacement trained with the MSE on online
    pairs from the sharded dense model (the slot replicated, read whole from the checkpoint, then put in place of
    the block of the dense model itself), the evaluations and perplexities on the sharded model (every rank scoring
    every evaluation item in lockstep). (SLEB + LoRA healing through the baseline recipe was checked the same way
    by hand: identical record and adapters; the library test above covers both.)"""
    _sharded_run_matches(tmp_path, 29533, MSE_ONLINE, tiny_checkpoint, mse_online_run, "slot")


def test_what_several_processes_cannot_share_is_refused_in_one_line():
    """Under torchrun, what the ranks cannot share is refused before the model loads; every run shares at least its
    evaluations (a training-free replacement, ShortGPT)."""
    from dataclasses import replace

    from llm_streamline.config import (
        ConfigError,
        EvalConfig,
        GromovConfig,
        LaCoConfig,
        MethodConfig,
        ModelConfig,
        ReplacementConfig,
        RunConfig,
        ShortGPTConfig,
        SLEBConfig,
        TrainConfig,
    )
    from llm_streamline.recipes.common import check_data_parallel

    base = RunConfig(model=ModelConfig(name="m"))
    refused = {"train.teacher=cached": replace(base, train=TrainConfig(loss="mse", teacher="cached")),
               "model.device_map=auto": replace(base, model=ModelConfig(name="m", device_map="auto"),
                                                train=TrainConfig(loss="lm")),
               "model.shard=fsdp": replace(base, model=ModelConfig(name="m", shard="fsdp"), method=LaCoConfig()),
               "replacement.init=linear": replace(base, model=ModelConfig(name="m", shard="fsdp"),
                                                  replacement=ReplacementConfig(type="ffn", init="linear"),
                                                  eval=EvalConfig(speed=False)),
               "eval.speed=true": replace(base, model=ModelConfig(name="m", shard="fsdp"), method=SLEBConfig()),
               "2 CUDA devices": replace(base, model=ModelConfig(name="m", device="cuda"),
                                         train=TrainConfig(loss="lm"))}
    if torch.cuda.device_count() >= 2:
        del refused["2 CUDA devices"]
    for key, cfg in refused.items():
        check_data_parallel(cfg, 1)  # one process: anything goes
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
            check_data_parallel(cfg, 2)
        assert "\n" not in str(e.value)
    for cfg in (replace(base, train=TrainConfig(loss="mse", teacher="auto")),
                replace(base, train=TrainConfig(teacher="cached"), method=MethodConfig(heal="lora"),  # train=lora
                        replacement=ReplacementConfig(type="none")),
                replace(base, method=SLEBConfig()),
                replace(base, model=ModelConfig(name="m", shard="fsdp"), method=GromovConfig(),
                        eval=EvalConfig(speed=False), save=False),
                replace(base, model=ModelConfig(name="m", shard="fsdp"), eval=EvalConfig(speed=False)),
                replace(base, model=ModelConfig(name="m", shard="fsdp"), train=TrainConfig(loss="lm"),
                        eval=EvalConfig(speed=False)),
                replace(base, model=ModelConfig(name="m", shard="fsdp"), train=TrainConfig(loss="distill"),
                        eval=EvalConfig(speed=False)),
                replace(base, method=ShortGPTConfig()),
                replace(base, replacement=ReplacementConfig(type="linear")),
                replace(base, method=GromovConfig())):
        check_data_parallel(cfg, 2)
