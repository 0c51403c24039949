"""The fault suite's shared pieces: the tiny training command, a process driver, and one clean
reference run that every interrupted or corrupted run must reproduce bit for bit."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.pretrain.test_train import REPO, TINY_BASELINE, _env

STEPS = 30


def train_argv(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """`python -m pretrain` arguments of the suite's run: 30 steps, a checkpoint every 4, validation every 8."""
    return ["--stage", "baseline", "--config", "baseline-tiny", f"data.path={data_dir}", f"run_dir={run_dir}",
            f"max_steps={STEPS}", "save_every=4", "eval_every=8", "eval_batches=2", "log_every=1", "export=false",
            *TINY_BASELINE, *extra]


class Process:
    """A subprocess whose output (stdout and stderr together) is collected as it comes."""

    def __init__(self, cmd: list[str]):
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")))
        self._reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_text(self, text: str, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while not any(text in line for line in self.lines):
            if self.proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"no {text!r} in the output:\n{self.output[-3000:]}")
            time.sleep(0.001)

    def finish(self, timeout: float = 180) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout)
        self._reader.join()
        return code, self.output


def start(data_dir: Path, run_dir: Path, *extra: str) -> Process:
    return Process([sys.executable, "-m", "pretrain", *train_argv(data_dir, run_dir, *extra)])


def records(run_dir: Path, split: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def last_step(run_dir: Path) -> int:
    try:
        return max((r["step"] for r in records(run_dir)), default=0)
    except (FileNotFoundError, json.JSONDecodeError):  # not there yet, or a line being written
        return 0


def wait_for_step(process: Process, run_dir: Path, step: int, timeout: float = 120) -> None:
    """Until metrics.jsonl logs `step` (a step this process trained, when it is past all earlier ones)."""
    deadline = time.time() + timeout
    while last_step(run_dir) < step:
        if process.proc.poll() is not None or time.time() > deadline:
            raise AssertionError(f"the run ended or stalled before step {step}:\n{process.output[-3000:]}")
        time.sleep(0.01)


def same_run(got: Path, want: Path) -> None:
    """Every step logged once, with the losses, grad norms, lr and tokens of the uninterrupted run."""
    keys = ("step", "tokens_seen", "loss", "grad_norm", "lr")
    for split, fields in (("train", keys), ("validation", ("step", "loss", "ce"))):
        mine, theirs = ([tuple(r[k] for k in fields) for r in records(d, split)] for d in (got, want))
        assert mine == theirs, f"{split}: {mine} != {theirs}"


@pytest.fixture(scope="session")
def reference_run(tiny_data_dir, tmp_path_factory) -> Path:
    """A finished, never interrupted run (checkpoints at steps 28 and 30). Copy it before changing it."""
    run_dir = tmp_path_factory.mktemp("faults") / "reference"
    code, output = start(tiny_data_dir, run_dir).finish()
    assert code == 0, output[-3000:]
    return run_dir


def copy_run(reference: Path, to: Path) -> Path:
    shutil.copytree(reference, to)
    return to
