"""Fault suite, training processes: Ctrl-C (once and twice), kill -9, SIGTERM, a corrupt latest
checkpoint (one run interrupted all these ways in turn) and a dead rank, on real `python -m pretrain`
processes.

What is injected, the exit code, the one-line message (never a traceback) and that nothing was lost:
however often it is interrupted, a run ends with the losses of one that never was, bit for bit, and
its metrics.jsonl holds every step once.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest

from pretrain.distributed import free_port
from tests.faults.conftest import Process, records, same_run, start, train_argv, wait_for_step

pytestmark = pytest.mark.faults


def _stopped_at(output: str, name: str) -> int:
    line = next(ln for ln in output.splitlines() if f"{name}: saved checkpoint at step" in ln)
    return int(line.split("at step ")[1].split()[0])


def _latest(run_dir) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


@pytest.mark.slow
def test_ctrl_c_twice_kill_sigterm_and_a_corrupt_checkpoint_resume_exactly(tiny_data_dir, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    # Ctrl-C: the step in progress ends, a checkpoint is saved, exit 130 with one line.
    proc = start(tiny_data_dir, run_dir)
    wait_for_step(proc, run_dir, 5)
    proc.proc.send_signal(signal.SIGINT)
    code, output = proc.finish()
    assert code == 130 and "Traceback" not in output, output[-3000:]
    stopped = _stopped_at(output, "Ctrl-C (SIGINT)")
    assert _latest(run_dir) == f"step_{stopped:08d}" and "run the same command again to resume" in output

    # Ctrl-C twice, at once: exit 130 without waiting for a checkpoint.
    proc = start(tiny_data_dir, run_dir)
    wait_for_step(proc, run_dir, stopped + 3)
    proc.proc.send_signal(signal.SIGINT)
    proc.wait_for_text("Ctrl-C: saving a checkpoint after this step")  # Python runs a pending handler once
    proc.proc.send_signal(signal.SIGINT)
    code, output = proc.finish()
    assert code == 130 and "Traceback" not in output, output[-3000:]
    assert f"resuming from step {stopped} (checkpoint {run_dir / 'checkpoints' / f'step_{stopped:08d}'})" in output
    assert "second Ctrl-C: exiting now without a checkpoint" in output

    # kill -9: no chance to save; the steps after the last checkpoint are logged again on resume.
    beyond = max(r["step"] for r in records(run_dir)) + 2
    proc = start(tiny_data_dir, run_dir)
    wait_for_step(proc, run_dir, beyond)
    proc.proc.kill()
    assert proc.finish()[0] == -signal.SIGKILL

    # SIGTERM: like Ctrl-C, exit 143.
    beyond = max(r["step"] for r in records(run_dir)) + 2
    proc = start(tiny_data_dir, run_dir)
    wait_for_step(proc, run_dir, beyond)
    proc.proc.send_signal(signal.SIGTERM)
    code, output = proc.finish()
    assert code == 143 and "Traceback" not in output, output[-3000:]
    stopped = _stopped_at(output, "SIGTERM")

    # The audit's silently inexact resume: rank_00000.pt missing from the latest checkpoint. The run
    # falls back to the checkpoint before it, says so, and still ends as the uninterrupted one.
    (run_dir / "checkpoints" / f"step_{stopped:08d}" / "rank_00000.pt").unlink()
    previous = max(p.name for p in (run_dir / "checkpoints").glob("step_*") if p.name < f"step_{stopped:08d}")
    code, output = start(tiny_data_dir, run_dir).finish()
    assert code == 0, output[-3000:]
    assert (f"warning: checkpoint step_{stopped:08d} is unusable: rank_00000.pt: missing; resuming from "
            f"{previous}, the newest intact checkpoint") in output
    same_run(run_dir, reference_run)


def _workers(parent: int) -> list[int]:
    """The training processes a torchrun agent started (its children running `-m pretrain`)."""
    import psutil

    return [p.pid for p in psutil.Process(parent).children(recursive=True) if "pretrain" in " ".join(p.cmdline())]


@pytest.mark.slow
def test_a_dead_rank_ends_the_whole_job_at_once(tiny_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    proc = Process([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(free_port()), "-m", "pretrain", *train_argv(tiny_data_dir, run_dir, "max_steps=100000")])
    wait_for_step(proc, run_dir, 5)
    os.kill(_workers(proc.proc.pid)[-1], signal.SIGKILL)
    killed = time.time()
    code, output = proc.finish(timeout=120)
    assert code != 0 and time.time() - killed < 30, output[-3000:]
    assert "exitcode  : -9" in output  # torchrun's summary names the rank that died
    assert "error (rank 0): another rank is gone (" in output
    assert "[rank0]: Traceback" not in output
    assert json.loads((run_dir / "checkpoints" / _latest(run_dir) / "checkpoint.json").read_text())["world_size"] == 2
