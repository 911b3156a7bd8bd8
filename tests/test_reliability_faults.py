"""Reliability under random input and random kills: any config file gives a valid config or one
LisaError line, never another exception; SIGKILL at random moments of `lisa train` (before the
first checkpoint included) leaves only checkpoints that load, and the loss log is one clean
sequence 1..N once the run is resumed to completion."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from factories import make_image_folder, make_pixel_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lisa_control.core.errors import LisaError
from lisa_control.training.config import (
    _FIELDS,
    _flag_type,
    field_choices,
    make_config,
    parse_args,
)

# ----------------------------------------------------------------------------- config files

FIELDS = sorted(_FIELDS)

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["latest", "lisa", "none", "lisa layersync", "fp16", "cosine", "0", "2.5",
                     "1e-4", "nan", "-1", "yes", "down_5", "", "."]),  # fmt: skip
)
VALUES = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=3),
    st.dictionaries(st.text(max_size=4), SCALARS, max_size=2),
)


def _plausible(key: str):
    """Values of the field's own type (so that some configs get past the type checks and into
    the range checks), mixed with anything at all."""
    kind = _flag_type(_FIELDS[key])
    own = {
        int: st.integers(min_value=-3, max_value=10**6),
        float: st.floats(min_value=-10, max_value=10),
        "bool": st.booleans(),
        "list_str": st.lists(st.text(max_size=8), min_size=1, max_size=2),
        "list_float": st.lists(st.floats(0, 1000), min_size=2, max_size=2),
    }.get(kind, st.one_of(st.text(max_size=12), st.sampled_from(field_choices(_FIELDS[key])
                                                                   or ("x",))))  # fmt: skip
    return st.integers(0, 4).flatmap(lambda k: VALUES if k == 0 else own)


ENTRY = st.sampled_from(FIELDS).flatmap(lambda k: st.tuples(st.just(k), _plausible(k)))
KNOWN = st.lists(ENTRY, max_size=6).map(dict)
UNKNOWN = st.dictionaries(st.one_of(st.text(max_size=10), st.integers(-3, 3)), VALUES,
                          min_size=1, max_size=1)  # fmt: skip
# One config in four carries an unknown key.
CONFIGS = st.tuples(KNOWN, st.integers(0, 3), UNKNOWN).map(
    lambda t: {**t[0], **(t[2] if t[1] == 0 else {})}
)

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _assert_valid_or_one_line(build):
    """``build()`` returns a config whose every value has its field's type, or raises a
    LisaError of one line; any other exception fails the test."""
    try:
        cfg = build()
    except LisaError as err:
        message = str(err)
        assert message and "\n" not in message, message
        return
    for name, f in _FIELDS.items():
        value, kind = getattr(cfg, name), _flag_type(f)
        if value is None:
            assert "None" in str(f.type), name
        elif kind is int:
            assert type(value) is int, (name, value)
        elif kind is float:
            assert type(value) is float, (name, value)
        elif kind == "bool":
            assert type(value) is bool, (name, value)
        elif kind == "list_str":
            # A field typed "str | list[str]" holds one name as a string, several as a list.
            one = "str |" in str(f.type) and isinstance(value, str)
            assert one or isinstance(value, list) and all(isinstance(v, str) for v in value), name
        elif kind == "list_float":
            assert len(value) == 2 and all(type(v) is float for v in value), (name, value)
        else:
            assert isinstance(value, str), (name, value)


@SETTINGS
@given(config=CONFIGS)
def test_any_config_mapping_is_a_valid_config_or_one_line_error(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths in the config are looked up here
    _assert_valid_or_one_line(lambda: make_config(config))


@SETTINGS
@given(config=CONFIGS, suffix=st.sampled_from([".yaml", ".json"]))
def test_any_config_file_is_a_valid_config_or_one_line_error(config, suffix, tmp_path,
                                                             monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    path = tmp_path / f"config{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(config))
    else:
        path.write_text(yaml.safe_dump(config))
    _assert_valid_or_one_line(lambda: parse_args(["--config", str(path)]))


# ----------------------------------------------------------------------------- SIGKILL

# `python -m lisa_control train` spends most of its start-up importing torch and diffusers
# (5 s on an idle 2-core machine, 20 s on a busy one). This server imports them once and forks
# one child per trial that runs the module exactly as `python -m lisa_control` does; the test
# SIGKILLs the child.
SERVER = r"""
import json, os, runpy, sys
import lisa_control.cli  # noqa: F401  (the imports every trial would repeat)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(log, 1)
            os.dup2(log, 2)
            sys.argv = ["lisa_control", *job["argv"]]
            runpy.run_module("lisa_control", run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            os._exit(code)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""

STEPS = 30
TRIALS = 8


class TrainServer:
    def __init__(self, log: Path):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip

    def start(self, argv: list[str]) -> int:
        self.proc.stdin.write(json.dumps({"argv": argv, "log": str(self.log)}) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def exit_code(self) -> int:
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _log_steps(path: Path) -> list[int]:
    """The steps of the loss log; a line the kill cut short may end it."""
    if not path.is_file():
        return []
    lines = path.read_text().split("\n")
    steps = []
    for k, line in enumerate(lines):
        if not line:
            continue
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:
            assert k == len(lines) - 1, f"a cut line inside the log: {lines}"
    return steps


def _load_everything(checkpoint: Path) -> None:
    from safetensors.torch import load_file

    from lisa_control.training.checkpoint import STATE_FILE, checkpoint_problem

    assert checkpoint_problem(checkpoint) is None, checkpoint
    state = json.loads((checkpoint / STATE_FILE).read_text())
    assert state["step"] == int(checkpoint.name.split("-")[1])
    for file in checkpoint.rglob("*.safetensors"):
        load_file(str(file))
    for file in checkpoint.glob("*.pt"):
        torch.load(file, weights_only=True)


def _wait(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return False


def test_sigkill_at_random_moments_leaves_loadable_checkpoints_and_one_clean_log(tmp_path):
    from lisa_control.training.checkpoint import list_checkpoints

    model = make_pixel_model(tmp_path / "model")
    data = make_image_folder(tmp_path / "data", n=8)
    out = tmp_path / "run"
    log = out / "loss_log.jsonl"
    argv = ["train", "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
            "--resolution", "16", "--train_batch_size", "2", "--max_train_steps", str(STEPS),
            "--checkpointing_steps", "3", "--validation_steps", "1000", "--report_to", "none",
            "--learning_rate", "1e-3", "--output_dir", str(out), "--no-progress",
            "--resume_from_checkpoint", "latest"]  # fmt: skip
    rng = random.Random(7)
    server = TrainServer(tmp_path / "trials.log")
    kills = before_first_checkpoint = 0
    history = []  # (exit code, steps logged, newest checkpoint) after each trial
    try:
        for trial in range(TRIALS):
            done_before = len(_log_steps(log))
            pid = server.start(argv)
            if trial < 2:
                # Right after a step is logged in a run with no checkpoint yet: the first
                # checkpoint comes at step 3.
                _wait(lambda n=done_before: len(_log_steps(log)) > n, 120)
            elif rng.random() < 0.3:
                time.sleep(rng.uniform(0.0, 2.0))  # anywhere, start-up included
            else:
                _wait(lambda n=done_before: len(_log_steps(log)) > n, 120)
                time.sleep(rng.uniform(0.0, 0.6))  # amid steps and checkpoint writes
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # it ended (and was reaped) first
            code = server.exit_code()
            assert code in (-signal.SIGKILL, 0), (tmp_path / "trials.log").read_text()[-3000:]
            kills += code == -signal.SIGKILL
            before_first_checkpoint += not list_checkpoints(out) and bool(_log_steps(log))
            for checkpoint in list_checkpoints(out):
                _load_everything(checkpoint)
            steps = _log_steps(log)
            assert steps == list(range(1, len(steps) + 1)), steps
            history.append((code, len(steps), [c.name for c in list_checkpoints(out)][-1:]))
        assert kills >= TRIALS - 2, history
        assert before_first_checkpoint >= 1, f"no kill before the first checkpoint: {history}"
        server.start(argv)
        assert server.exit_code() == 0, (tmp_path / "trials.log").read_text()[-3000:]
    finally:
        server.close()
    assert _log_steps(log) == list(range(1, STEPS + 1))
    assert log.read_text().endswith("\n")
    for checkpoint in list_checkpoints(out):
        _load_everything(checkpoint)
    assert list_checkpoints(out)[-1].name == f"checkpoint-{STEPS}"
    assert (out / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(out.glob(".tmp-*")) and not list(out.glob(".*.tmp"))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
