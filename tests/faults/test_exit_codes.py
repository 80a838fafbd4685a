"""One line on stderr and a documented exit code for every failure class (see `errors`' docstring): Hydra's
own composition errors (2), interrupts (130 for SIGINT, 143 for SIGTERM, naming the stage), W&B online
without a key or a server (offline, warned, within seconds), and sweeps that go on past a failing job."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llm_streamline.config import WandbConfig
from llm_streamline.tracking import Tracker


def cli(*args: str, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "llm_streamline", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("override,line", [
    ("sparsity.layer=3", "unknown key sparsity.layer: did you mean sparsity.layers?"),
    ("train.lr=abc", "Error merging override train.lr=abc: Value 'abc' of type 'str' could not be converted to Float"),
    ("model=nope", "In 'config': Could not find 'model/nope'; available: gemma3-270m, hub, "),
    ("train.loss=kl", "Error merging override train.loss=kl: Invalid value 'kl', expected one of [mse, lm, distill]"),
    ("method.sleb_samples=3", "method.sleb_samples is an option of method=sleb, not of method=streamline (its "),
])
def test_hydra_errors_exit_2_with_one_line(override, line, tmp_path):
    res = cli("experiment=smoke", override, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    [only] = res.stderr.strip().splitlines()
    assert only.startswith(f"llm-streamline: error: {line}"), only


@pytest.mark.parametrize("signal_name,code", [("INT", 130), ("TERM", 143)])
def test_interrupt_exits_130_or_143_naming_the_stage_and_keeps_finished_stages(signal_name, code, smoke_cli,
                                                                                 tmp_path):
    stages = tmp_path / "stages"
    res = smoke_cli(tmp_path / "run", stages, kill_at="train:step:2",
                    env_extra={"LLM_STREAMLINE_KILL_SIGNAL": signal_name})
    assert res.returncode == code, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == \
        "llm-streamline: error: interrupted during stage train; finished stages are kept"
    assert "Traceback" not in res.stderr
    log = res.stdout + res.stderr  # the interrupted stage is never logged as done
    assert "== train done" not in log and "== train interrupted after" in log, log[-3000:]
    kept = {p.name.split("-")[0] for p in stages.iterdir()}
    assert {"profile", "eval_dense", "teacher"} <= kept and "train" not in kept
    assert not list(stages.glob("*.partial")) and not list(stages.glob(".tmp*"))


def test_a_sweep_runs_past_a_failing_job_and_exits_nonzero_listing_it(tmp_path):
    sweep = tmp_path / "sweep"
    res = cli("-m", "experiment=smoke", "sparsity.layers=9,2", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert lines[-1] == "llm-streamline: error: 1 sweep job(s) failed (listed above)"
    assert lines[-2].startswith(f"llm-streamline: failed job {sweep / '0-layer-n9'} (exit 2): sparsity.layers=9")
    assert "only 8 layers" in lines[-2]
    assert (sweep / "1-layer-n2" / "results.json").exists()  # the valid job ran after the failing one


@pytest.mark.parametrize("env", [{"WANDB_API_KEY": ""}, {"WANDB_API_KEY": "x" * 40,
                                                         "WANDB_BASE_URL": "http://127.0.0.1:9"}],
                         ids=["no key", "no server"])
def test_wandb_online_without_key_or_server_falls_back_to_offline_quickly(env, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc key
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    t0 = time.perf_counter()
    tracker = Tracker(WandbConfig(mode="online"), tmp_path, config={}, name="t", job_type="run")
    try:
        assert tracker.mode == "offline" and tracker.run is not None
    finally:
        tracker.finish()
    assert time.perf_counter() - t0 < 60
    assert any("W&B online is not possible" in r.getMessage() for r in caplog.records)


def test_a_stage_that_raises_is_logged_as_failed_or_interrupted_never_done(caplog):
    from llm_streamline.recipes.common import Timings

    timings = Timings()
    for stage, exc in (("eval_dense", KeyboardInterrupt()), ("perplexity_dense", RuntimeError("no network"))):
        with caplog.at_level("INFO", logger="llm_streamline"), pytest.raises(type(exc)):
            with timings.stage(stage):
                raise exc
    with caplog.at_level("INFO", logger="llm_streamline"), timings.stage("speed"):
        pass
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("== ")]
    assert [line.rsplit(" after ", 1)[0].rsplit(" in ", 1)[0] for line in lines] == [
        "== eval_dense", "== eval_dense interrupted", "== perplexity_dense", "== perplexity_dense failed",
        "== speed", "== speed done"], lines


# ------------------------------------------------------------------------- issue 26: more failure classes
def launch(run, tmp_path, env_extra=None, **kw) -> subprocess.Popen:
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", LLM_STREAMLINE_STAGES=str(tmp_path / "stages"),
               **(env_extra or {}))
    env.pop("HYDRA_FULL_ERROR", None)
    args = [sys.executable, "-m", "llm_streamline", "experiment=smoke"] + ([f"hydra.run.dir={run}"] if run else [])
    return subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kw)


def wait_for_claim(run, proc) -> None:
    """Until the run holds its directory (its signal handlers are installed before the claim)."""
    deadline = time.monotonic() + 300
    while not (run / ".llm-streamline-run").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.parametrize("signals,code,line", [
    (["HUP"], 129, "llm-streamline: error: interrupted"),
    (["INT", "INT"], 130, "llm-streamline: error: interrupt"),  # the 2nd may land in the cleanup: its own line
], ids=["SIGHUP", "Ctrl-C twice"])
def test_sighup_and_a_second_ctrl_c_end_with_one_line_and_their_code(signals, code, line, tmp_path):
    run = tmp_path / "run"
    proc = launch(run, tmp_path)
    wait_for_claim(run, proc)
    time.sleep(1.0)  # into the job (composition, the model)
    for name in signals:
        proc.send_signal(getattr(signal, f"SIG{name}"))
        time.sleep(0.02)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err + out and err.strip().splitlines()[-1].startswith(line), err[-2000:]


def test_output_piped_into_a_closed_reader_is_one_note_and_the_run_goes_on(tmp_path):
    run = tmp_path / "run"
    proc = launch(run, tmp_path)
    proc.stdout.close()  # as `| head -1` does once it has its line
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and (run / "results.json").exists(), err[-2000:]
    assert "Traceback" not in err and "Logging error" not in err, err[-3000:]
    assert err.count("llm-streamline: note: standard output was closed by its reader") <= 1


@pytest.mark.parametrize("case", ["a 300-character model name", "a 300-character run directory",
                                  "the run directory's disk full (Hydra's config write)"])
def test_path_and_disk_failures_before_the_job_are_one_line(case, tmp_path):
    long = "x" * 300
    extra, preexec, code = [], None, 2
    if case == "a 300-character model name":
        extra = [f"model.name={long}"]
    elif case == "a 300-character run directory":
        extra = [f"hydra.run.dir={tmp_path / long / 'run'}"]
    else:  # no file may grow past 1 KiB: the OS refuses Hydra's .hydra/config.yaml as a full disk would
        preexec, code = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))), 3
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    env.pop("HYDRA_FULL_ERROR", None)
    res = subprocess.run([sys.executable, "-m", "llm_streamline", "experiment=smoke", *extra], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600, preexec_fn=preexec)
    assert res.returncode == code, res.stderr[-2000:]
    [only] = res.stderr.strip().splitlines()
    assert only.startswith("llm-streamline: error: ") and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert ("longer than the filesystem allows" in only) if code == 2 else ("File too large" in only), only


def test_an_empty_wandb_mode_is_unset_and_an_unknown_one_is_one_line(tmp_path, monkeypatch):
    from llm_streamline.config import ConfigError

    monkeypatch.setenv("WANDB_MODE", "")  # `WANDB_MODE= llm-streamline ...`: wandb itself failed validating ""
    tracker = Tracker(WandbConfig(mode="offline"), tmp_path, config={}, name="t", job_type="run")
    try:
        assert tracker.mode == "offline" and tracker.run is not None
    finally:
        tracker.finish()
    monkeypatch.setenv("WANDB_MODE", "ofline")
    with pytest.raises(ConfigError, match="WANDB_MODE='ofline': one of online, offline, disabled"):
        Tracker(WandbConfig(mode="offline"), tmp_path, config={}, name="t", job_type="run")


def test_an_interrupt_inside_an_import_is_named_without_importing_again(tmp_path, monkeypatch):
    """A SIGHUP that lands while `import torch` runs leaves torch half-initialised: naming the interrupt must not
    import anything (seen: 'Only a single TORCH_LIBRARY can be used...' traceback and exit 1 instead of 129)."""
    from tqdm.auto import tqdm

    from llm_streamline import errors

    bar = tqdm(total=10, desc="a stage")  # open when the interrupt lands: closed before the line is printed
    for mod in ("llm_streamline.data", "llm_streamline.assets", "llm_streamline.faults", "tqdm.auto", "asyncio"):
        monkeypatch.setitem(sys.modules, mod, None)  # importing any of them now raises ImportError
    line, code = errors.job_failure(errors.HungUp(), None, tmp_path)
    assert code == 129 and line.startswith("interrupted"), line
    with pytest.raises(SystemExit) as e:  # seen: a Ctrl-C inside `import asyncio`, then tqdm.auto imported it
        errors.fail(line, code)
    assert e.value.code == 129 and bar.disable



INTERRUPT_INSIDE = """
import os, signal, sys
import llm_streamline.cli as cli

what, where = sys.argv[1:3]

def interrupted(*args):  # Ctrl-C lands in code run from a string, as in a dataclass's generated __init__
    try:
        exec("os.kill(os.getpid(), signal.SIGINT)\\nfor _ in range(10 ** 8): pass")
    finally:
        if what == "a cleanup that fails":  # a library's cleanup on its half-built state (omegaconf)
            None.invalidate_flags_cache()
    return wrapped(*args)

name = {"composing": "_app", "in the job": "to_run_config"}[where]
wrapped = getattr(cli, name)
setattr(cli, name, interrupted)
sys.argv = ["llm-streamline", *sys.argv[3:]]
cli.main()
"""


@pytest.mark.parametrize("where", ["composing", "in the job"])
@pytest.mark.parametrize("what", ["exec'd code", "a cleanup that fails"])
def test_an_interrupt_inside_code_run_from_a_string_or_a_failing_cleanup_exits_130(what, where, tmp_path):
    """The flaky `Ctrl-C twice` (1 in ~7 under load): under `python -m`, a KeyboardInterrupt that left code run
    from a string made CPython kill the process by SIGINT at exit (-2) after our line and SystemExit(130); an
    error raised by a cleanup as the interrupt unwound (omegaconf) was reported as an internal error (3)."""
    (tmp_path / "interrupt_inside.py").write_text(INTERRUPT_INSIDE)
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", LLM_STREAMLINE_STAGES=str(tmp_path / "st"))
    env.pop("HYDRA_FULL_ERROR", None)
    res = subprocess.run([sys.executable, "-m", "interrupt_inside", what, where, "experiment=smoke",
                          f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 130, res.stderr[-2000:]
    assert res.stderr.strip().splitlines() == ["llm-streamline: error: interrupted; finished stages are kept"]

# ------------------------------------------------------------------------------------- internal errors: exit 3
INJECT = """
import sys
import llm_streamline.recipes.common as common

def deep(*args, **kwargs):  # a bug in a helper deep inside the importance stage
    raise ValueError("injected bug: index 9 is out of range")

common.similarity_profile = deep
from llm_streamline.cli import main
sys.argv = ["llm-streamline", *sys.argv[1:]]
main()
"""


def test_an_internal_value_error_in_a_stage_exits_3_with_its_traceback_in_the_run_dir(tmp_path):
    """A ValueError from a bug is not bad input: exit 3, one line naming the stage and the traceback file, the
    full traceback in <run dir>/traceback.log (before: exit 2 and the bug's message as if the user had erred)."""
    run = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", LLM_STREAMLINE_STAGES=str(tmp_path / "st"))
    env.pop("HYDRA_FULL_ERROR", None)
    res = subprocess.run([sys.executable, "-c", INJECT, "experiment=smoke", f"hydra.run.dir={run}"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 3, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == (
        "llm-streamline: error: stage importance: internal error: ValueError: injected bug: index 9 is out of range "
        f"(traceback in {run / 'traceback.log'})")
    assert "Traceback" not in res.stderr + res.stdout
    text = (run / "traceback.log").read_text()
    assert text.startswith("Traceback (most recent call last):") and "in deep" in text, text[-2000:]
    assert text.rstrip().endswith("ValueError: injected bug: index 9 is out of range")
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]  # written atomically


def test_bad_input_is_exit_2_in_one_line_and_everything_else_exit_3_with_a_traceback_file(tmp_path):
    from llm_streamline import errors
    from llm_streamline.config import ConfigError

    assert errors.job_failure(ConfigError("train.lr=-1.0: must be > 0"), None, tmp_path) == (
        "train.lr=-1.0: must be > 0", errors.BAD_INPUT)
    from llm_streamline.linear_map import LinearMapError
    from llm_streamline.models.anatomy import AnatomyError
    from llm_streamline.rundir import RunDirError

    for refused in (RunDirError("output directory x holds a finished run"), AnatomyError("no MLP"),
                    LinearMapError("the block starts at layer 0")):  # the checks' own types are bad input too
        assert errors.job_failure(refused, None, tmp_path) == (str(refused), errors.BAD_INPUT)
    assert not (tmp_path / "traceback.log").exists()  # bad input: the line says it all
    try:
        {}["missing"]
    except KeyError as e:
        e.stage = "train"
        line, code = errors.job_failure(e, None, tmp_path)
    assert code == errors.FAULT and line == (f"stage train: internal error: KeyError: 'missing' "
                                             f"(traceback in {tmp_path / 'traceback.log'})")
    assert "{}[\"missing\"]" in (tmp_path / "traceback.log").read_text()
    # no run directory yet (composing), or one that cannot be written: a temporary file holds the traceback
    for out_dir in (None, tmp_path / "traceback.log" / "not-a-dir"):
        line, code = errors.job_failure(ValueError("a bug"), None, out_dir)
        where = Path(line.split("(traceback in ", 1)[1].rstrip(")"))
        assert code == errors.FAULT and line.startswith("internal error: ValueError: a bug (traceback in ")
        assert where.name.startswith("llm-streamline-traceback-") and "ValueError: a bug" in where.read_text()
        where.unlink()
