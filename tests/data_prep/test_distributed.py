"""`python -m data_prep.distributed`: tasks on datatrove's local executor, merge, skip-on-rerun after a
task's error or a hard kill, and input from a URL (the local HTTP server) with an fsspec output URL."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TINY_ARGS
from tests.http_server import StaticServer

REPO = Path(__file__).resolve().parents[2]
ARGS = [a for a in TINY_ARGS if a not in ("--workers", "1", "--no-progress")]


def _argv(output, tasks: int, parallel: int, args: list[str] = ARGS) -> list[str]:
    return [sys.executable, "-m", "data_prep.distributed", "--tasks", str(tasks), "--parallel", str(parallel),
            "--output", str(output), *args]


def _env(cache: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CALM_DATA_CACHE": str(cache), **extra}


def prep(output, tasks: int, cache: Path, parallel: int = 2, env: dict | None = None, args: list[str] = ARGS):
    return subprocess.run(_argv(output, tasks, parallel, args), cwd=REPO, env=_env(cache, **(env or {})),
                          capture_output=True, text=True, timeout=300)


def shard_bytes(data: Path) -> dict[str, bytes]:
    return {str(p.relative_to(data)): p.read_bytes() for p in sorted(data.glob("*/shard-*.tar"))}


def counts(manifest: dict) -> dict:
    return {name: (s["documents"], s["document_tokens"]) for name, s in manifest["splits"].items()}


def task_records(output: Path) -> dict[str, int]:
    """Finished tasks' records (written last by each task) and their modification times."""
    return {p.name: p.stat().st_mtime_ns for p in (output / ".parts").glob("task-*.json")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 4-task run: what every interrupted, resumed or remote-input run must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    proc = prep(tmp / "out", 4, tmp / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "out"


@pytest.mark.slow
@pytest.mark.faults
def test_tasks_give_the_same_documents_and_reruns_redo_only_failed_tasks(reference, tmp_path):
    one = prep(tmp_path / "one", 1, tmp_path / "cache")
    assert one.returncode == 0, one.stderr[-3000:]
    # Task 2 raises mid-way, after uploading its first chunk's shards.
    failed = prep(tmp_path / "four", 4, tmp_path / "cache", env={"CALM_PREP_FAIL_TASK": "2"})
    assert failed.returncode == 1 and "failed (logs:" in failed.stderr, failed.stderr[-3000:]
    assert not (tmp_path / "four" / "manifest.json").exists()
    before = task_records(tmp_path / "four")
    # (datatrove stops the pool at the failure: a task running beside it may be unfinished too)
    assert "task-00002.json" not in before and {"task-00000.json", "task-00001.json"} <= set(before)
    rerun = prep(tmp_path / "four", 4, tmp_path / "cache")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"Skipping {len(before)} already completed tasks" in rerun.stderr
    assert {k: v for k, v in task_records(tmp_path / "four").items() if k in before} == before

    m1, m4 = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "four"))
    assert counts(m1) == counts(m4)  # the same documents and token counts, whatever the task count
    assert m4["made_by"]["engine"] == "datatrove" and m4["made_by"]["tasks"] == 4
    assert shard_bytes(tmp_path / "four") == shard_bytes(reference)  # byte-identical for 4 tasks
    from pretrain.data import ShardLoader

    loader = ShardLoader(tmp_path / "four", "train", 4)
    assert loader.num_samples == m4["splits"]["train"]["samples"] and next(iter(loader)).shape == (4, 64)


@pytest.mark.slow
@pytest.mark.faults
def test_a_hard_killed_run_redoes_unfinished_tasks_and_skips_finished_ones(reference, tmp_path):
    out = tmp_path / "out"
    done_dir = out / ".parts" / "datatrove" / "tasks" / "completions"
    with open(tmp_path / "killed.log", "wb") as log:  # a file, not a pipe: nothing blocks on a full pipe
        # One task at a time, in the driver's process: SIGKILL to its process group stops it mid-task.
        proc = subprocess.Popen(_argv(out, 4, 1), cwd=REPO, env=_env(tmp_path / "cache", TMPDIR=str(tmp_path)),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 240
        while not (done_dir / "00000").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    done = sorted(p.name for p in done_dir.iterdir())
    assert 1 <= len(done) < 4 and not (out / "manifest.json").exists()
    finished = task_records(out)
    assert set(finished) >= {f"task-{int(n):05d}.json" for n in done}
    rerun = prep(out, 4, tmp_path / "cache")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"Skipping {len(done)} already completed tasks" in rerun.stderr
    records = task_records(out)
    assert all(records[f"task-{int(n):05d}.json"] == finished[f"task-{int(n):05d}.json"] for n in done)  # kept
    assert len(records) == 4 and shard_bytes(out) == shard_bytes(reference)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"] == json.loads((reference / "manifest.json").read_text())["splits"]


@pytest.mark.slow
def test_input_from_a_url_and_output_to_an_fsspec_url_give_the_same_shards(reference, tmp_path):
    from data_prep.builtin import BUILTIN_CORPORA

    (tmp_path / "www").mkdir()
    max_docs = int(ARGS[ARGS.index("--max-docs") + 1])
    with open(tmp_path / "www" / "wiki.jsonl", "w") as f:  # builtin:wiki's documents as a JSONL file
        for _title, text in itertools.islice(BUILTIN_CORPORA["builtin:wiki"].documents(), max_docs):
            f.write(json.dumps({"text": text}) + "\n")
    with StaticServer(tmp_path / "www") as url:
        args = [a.replace("builtin:wiki", f"{url}/wiki.jsonl") for a in ARGS]
        proc = prep(f"file://{tmp_path / 'out'}", 4, tmp_path / "cache", args=args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert shard_bytes(tmp_path / "out") == shard_bytes(reference)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["made_by"]["inputs"] == [f"{url}/wiki.jsonl"]
