"""`python -m data_prep.distributed`: tasks on datatrove's local executor, merge, skip-on-rerun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_ARGS

REPO = Path(__file__).resolve().parents[2]
ARGS = [a for a in TINY_ARGS if a not in ("--workers", "1", "--no-progress")]


def prep(output: Path, tasks: int, cache: Path, parallel: int = 2, env: dict | None = None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CALM_DATA_CACHE": str(cache), **(env or {})}
    return subprocess.run([sys.executable, "-m", "data_prep.distributed", "--tasks", str(tasks), "--parallel",
                           str(parallel),
                           "--output", str(output), *ARGS], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def shard_bytes(data: Path) -> dict[str, bytes]:
    return {str(p.relative_to(data)): p.read_bytes() for p in sorted(data.glob("*/shard-*.tar"))}


def counts(manifest: dict) -> dict:
    return {name: (s["documents"], s["document_tokens"]) for name, s in manifest["splits"].items()}


@pytest.mark.slow
def test_tasks_give_the_same_documents_and_reruns_redo_only_killed_tasks(tmp_path):
    one = prep(tmp_path / "one", 1, tmp_path / "cache")
    assert one.returncode == 0, one.stderr[-3000:]
    # Task 2 dies mid-way, after uploading its first chunk's shards.
    killed = prep(tmp_path / "four", 4, tmp_path / "cache", env={"CALM_PREP_FAIL_TASK": "2"})
    assert killed.returncode == 1 and "failed (logs:" in killed.stderr, killed.stderr[-3000:]
    assert not (tmp_path / "four" / "manifest.json").exists()
    parts = tmp_path / "four" / ".parts"
    before = {p.name: p.stat().st_mtime_ns for p in parts.glob("task-*.json")}
    # (datatrove stops the pool at the failure: a task running beside it may be unfinished too)
    assert "task-00002.json" not in before and {"task-00000.json", "task-00001.json"} <= set(before)
    rerun = prep(tmp_path / "four", 4, tmp_path / "cache")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"Skipping {len(before)} already completed tasks" in rerun.stderr
    assert {p.name: p.stat().st_mtime_ns for p in parts.glob("task-*.json") if p.name in before} == before

    m1, m4 = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "four"))
    assert counts(m1) == counts(m4)  # the same documents and token counts, whatever the task count
    assert m4["made_by"]["engine"] == "datatrove" and m4["made_by"]["tasks"] == 4
    fresh = prep(tmp_path / "again", 4, tmp_path / "cache")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert shard_bytes(tmp_path / "again") == shard_bytes(tmp_path / "four")  # byte-identical for 4 tasks
    from pretrain.data import ShardLoader

    loader = ShardLoader(tmp_path / "four", "train", 4)
    assert loader.num_samples == m4["splits"]["train"]["samples"] and next(iter(loader)).shape == (4, 64)
