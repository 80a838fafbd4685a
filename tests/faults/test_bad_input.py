"""Bad input fails before the model loads, with one line naming the key (exit code 2 through the CLI).

CASES is the corpus: each row is the command-line overrides of a smoke run (added after `experiment=smoke`),
the text the one-line error must contain, and optionally environment variables and a `prepare(tmp_path)` that
makes a file the overrides name (`{tmp}` in an override is replaced by tmp_path). A newcomer adds a row.
Every row is checked in-process (compose, schema, `validate`, `preflight`: no model is loaded); the rows
marked `cli=True` also go through the real CLI for the exit code and the single line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from hydra import compose, initialize_config_dir

from llm_streamline import preflight
from llm_streamline.cli import CONF_DIR, to_run_config
from llm_streamline.config import ConfigError, validate
from llm_streamline.data import HubUnavailable
from llm_streamline.stages import NotWritableError


def config_only_dir(tmp: Path) -> None:
    """A local model directory holding config.json and no weights: what is checked from it needs none."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1000).save_pretrained(tmp / "model")


def a_file(tmp: Path) -> None:
    (tmp / "cachefile").write_text("not a directory")


def corrupt_config_dir(tmp: Path) -> None:
    (tmp / "model").mkdir()
    (tmp / "model" / "config.json").write_text('{"model_type": "llama", "hidden')  # truncated


@dataclass
class Case:
    overrides: list[str]
    needle: str
    env: dict[str, str] = field(default_factory=dict)
    prepare: Callable[[Path], None] | None = None
    cli: bool = False


CASES = [
    Case(["+sparsity.layer=3"], "unknown key sparsity.layer: did you mean sparsity.layers?", cli=True),
    Case(["+trian.lr=1"], "unknown key trian: did you mean train?"),
    Case(["train.grad_clip=-1"], "train.grad_clip=-1.0: must be > 0", cli=True),
    Case(["train.grad_clip=0"], "train.grad_clip=0.0"),
    Case(["train.weight_decay=-1"], "train.weight_decay=-1.0: must be >= 0"),
    Case(["train.warmup_ratio=5"], "train.warmup_ratio=5.0: must be in [0, 1)"),
    Case(["train.warmup_ratio=-0.1"], "train.warmup_ratio=-0.1"),
    Case(["train.max_steps=0"], "train.max_steps=0: null or >= 1"),
    Case(["replacement.hidden_size=0"], "replacement.hidden_size=0"),
    Case(["replacement.hidden_size=-5"], "replacement.hidden_size=-5"),
    Case(["eval.speed_tokens=0"], "eval.speed_tokens=0: must be >= 1"),
    Case(["eval.batch_size=0"], "eval.batch_size=0"),
    Case(["model=tiny-opt", "data.seq_len=1024"], "data.seq_len=1024: the model has 512 positions"),
    Case(["eval.speed=true", "eval.speed_tokens=500"],
         "eval.speed_tokens=500 + 32 decoded tokens: the model has 512 positions"),
    Case(["model.dtype=float16"], "model.dtype=float16 on model.device=cpu"),
    Case(["model.device=cuda"], "model.device=cuda: CUDA is not available", cli=True),
    Case(["model=hub", "model.name_or_path=nobody/no-such-model"], "model.name_or_path=nobody/no-such-model: cannot",
         env={"HF_HUB_OFFLINE": "1"}),
    Case(["model=hub", "model.source=local", "model.name_or_path={tmp}/model"], "config.json",
         prepare=corrupt_config_dir),
    Case(["model=hub", "model.source=local", "model.name_or_path={tmp}/missing"], "/missing: no such directory"),
    # issue 26: every input honoured or refused, and what the config and config.json decide, before any weight
    Case(["checkpoint={tmp}"], "llm-streamline compresses model=tiny-llama and reads no checkpoint", cli=True),
    Case(["model.name_or_path=/nonexistent/path"], "model=tiny-llama is a random model built from its config"),
    Case(["model=hub", "model.name_or_path=/nonexistent"], "/nonexistent: no such directory (a hub id is"),
    Case(["method=shortgpt", "replacement=ffn"], "replacement=ffn with method=shortgpt: a baseline puts no network"),
    Case(["replacement=layer", "method=sleb"], "replacement=layer with method=sleb"),
    Case(["method=gromov", "sparsity.start=2"], "sparsity.start=2 with method=gromov: the baseline chooses"),
    Case(["sparsity.layers=null", "sparsity.target=0.001"], "sparsity.target=0.001: the closest block, 1 layer(s) "
         "replaced by replacement=layer (36,992 parameters), removes 0 parameters net"),
    Case(["replacement=layers", "replacement.num_layers=2"], "sparsity.layers=2: 2 layer(s) replaced by "
         "replacement=layers (73,984 parameters) remove 0 parameters net"),
    Case(["sparsity.start=7"], "sparsity.start=7: a block of 2 layers must start in [0, 6]"),
    # the block's size (preflight.resolve_block_size): refused as bad input (exit 2), not as an internal error
    Case(["replacement=layers", "replacement.num_layers=3"], "sparsity.layers=2 is less than replacement.num_layers=3",
         cli=True),
    Case(["sparsity.layers=7", "sparsity.count=net"], "sparsity.layers=7 (8 removed): the model has only 8 layers"),
    Case(["sparsity.start=-1"], "sparsity.start=-1: must be >= 0"),
    Case(["model=hub", "model.source=local", "model.name_or_path={tmp}/model", "sparsity=layers4",
          "sparsity.start=6"], "sparsity.start=6: a block of 4 layers must start in [0, 4]", prepare=config_only_dir),
    Case(["eval.perplexity_text=wikitext2"], "eval.perplexity_text=wikitext2 needs network access to the Hugging "
         "Face hub; use eval.perplexity_text=heldout", env={"HF_HUB_OFFLINE": "1"}),
    Case([], "LLM_STREAMLINE_CACHE={tmp}/cachefile is a file, not a directory",
         env={"LLM_STREAMLINE_CACHE": "{tmp}/cachefile"}, prepare=a_file, cli=True),
]


def _ids(case: Case) -> str:
    return " ".join(case.overrides) or " ".join(f"{k}=" for k in case.env)


def _resolve(case: Case, tmp_path: Path) -> list[str]:
    if case.prepare:
        case.prepare(tmp_path)
    return ["experiment=smoke", *(o.replace("{tmp}", str(tmp_path)) for o in case.overrides)]


def _env(case: Case, tmp_path: Path) -> dict[str, str]:
    return {k: v.replace("{tmp}", str(tmp_path)) for k, v in case.env.items()}


def _skip_if_cuda(case: Case) -> None:
    if "cuda" in case.needle.lower() and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_bad_input_is_refused_before_the_model_loads(case, tmp_path, monkeypatch):
    _skip_if_cuda(case)
    for k, v in _env(case, tmp_path).items():
        monkeypatch.setenv(k, v)
    if case.env.get("HF_HUB_OFFLINE"):  # read once at import: set where the hub client looks now
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    overrides = _resolve(case, tmp_path)
    with pytest.raises((ConfigError, NotWritableError, HubUnavailable)) as err:  # errors.job_failure: exit 2
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = to_run_config(compose(config_name="config", overrides=overrides))
        validate(cfg)
        preflight.check_run(cfg)
    needle = case.needle.replace("{tmp}", str(tmp_path))
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("case", [c for c in CASES if c.cli], ids=_ids)
def test_bad_input_through_the_cli_exits_2_with_one_line(case, tmp_path):
    _skip_if_cuda(case)
    env = dict(os.environ, WANDB_MODE="disabled", HYDRA_FULL_ERROR="0", OMP_NUM_THREADS="1", **_env(case, tmp_path))
    res = subprocess.run([sys.executable, "-m", "llm_streamline", *_resolve(case, tmp_path),
                          f"hydra.run.dir={tmp_path / 'run'}"], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("llm-streamline: error:") and case.needle.replace("{tmp}", str(tmp_path)) in last, \
        res.stderr[-2000:]
    assert "Traceback" not in res.stderr + res.stdout


# Hydra's own errors, read in-process (the CLI prints this line with exit 2: test_exit_codes.py)
@pytest.mark.parametrize("override,line", [
    ("eval.task_limits={piqa:2}", "++eval.task_limits={piqa:2} replaces the mapping eval.task_limits"),
    ("eval.task_limits.piqa=2", "+eval.task_limits.piqa=2 adds an entry to the mapping eval.task_limits"),
])
def test_a_mapping_override_names_the_form_that_works(override, line):
    from llm_streamline.errors import hydra_error_line

    with pytest.raises(Exception) as err:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            compose(config_name="config", overrides=["experiment=smoke", override])
    assert hydra_error_line(err.value).startswith(line), hydra_error_line(err.value)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):  # and that form is honoured
        cfg = to_run_config(compose(config_name="config", overrides=["experiment=smoke",
                                                                     line.split(" ", 1)[0]]))
    assert cfg.eval.task_limits == {"piqa": 2}


@pytest.mark.parametrize("overrides,needle", [
    (["replacement=ffn"], "replacement=ffn: llm-streamline-eval evaluates a model as it is and reads no replacement"),
    (["sparsity.layers=4"], "reads no sparsity settings"),
    (["train.lr=1e-3"], "reads no train settings"),
    (["method=shortgpt"], "reads no method settings"),
    (["save=false"], "reads no save settings"),
])
def test_an_evaluation_refuses_the_compression_keys_it_would_not_read(overrides, needle, tmp_path):
    from llm_streamline.config import check_overrides

    given = ["experiment=smoke", "mode=eval", f"checkpoint={tmp_path}", *overrides]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = to_run_config(compose(config_name="config", overrides=given))
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        check_overrides(cfg, given)
    check_overrides(cfg, given[:3])  # what an evaluation reads: no error
