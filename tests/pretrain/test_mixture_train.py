"""Training end to end on remote shards (a local HTTP server) and on a weighted mixture of sources."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.http_server import StaticServer
from tests.pretrain.test_mixture import half_copy

REPO = Path(__file__).resolve().parents[2]
TINY = ["--stage", "baseline", "--config", "baseline-tiny", "model.hidden_size=32", "model.intermediate_size=64",
        "model.max_position_embeddings=64", "micro_batch_size=4", "wandb.mode=disabled", "optim.warmup_steps=1",
        "optim.lr=3e-3", "max_steps=6", "save_every=0", "eval_every=3", "eval_batches=2", "log_every=1",
        "export=false", "precision=fp32"]


def _train(run_dir: Path, cache: Path, *overrides: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", CALM_DATA_CACHE=str(cache))
    proc = subprocess.run([sys.executable, "-m", "pretrain", *TINY, f"run_dir={run_dir}", *overrides], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(records: list[dict]) -> list[tuple]:
    return [(r["split"], r["step"], r["loss"]) for r in records]


@pytest.mark.slow
def test_training_on_http_shards_equals_local_and_mixture_trains(tiny_data_dir, tmp_path):
    shutil.copytree(tiny_data_dir, tmp_path / "www" / "a")
    half_copy(tiny_data_dir, tmp_path / "www" / "b")
    with StaticServer(tmp_path / "www") as url:
        local = _train(tmp_path / "local", tmp_path / "cache", f"data.path={tiny_data_dir}")
        remote = _train(tmp_path / "remote", tmp_path / "cache", f"data.path={url}/a")
        assert _losses(remote) == _losses(local)  # train and validation losses, bit for bit in fp32
        assert sum(r["split"] == "validation" for r in local) == 2
        mixed = _train(tmp_path / "mix", tmp_path / "cache",
                       f"data.sources=[{{path: '{url}/a', weight: 0.75}}, {{path: '{tmp_path / 'www' / 'b'}', weight: 0.25}}]")
    train = [r for r in mixed if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 7))
    assert train[-1]["mix/a"] == pytest.approx(0.75, abs=0.1) and train[-1]["mix/a"] + train[-1]["mix/b"] == 1
    val = [r for r in mixed if r["split"] == "validation"][-1]
    assert {"loss", "a/loss", "b/loss"} <= set(val)  # overall and per source
    config = (tmp_path / "mix" / "config.yaml").read_text()
    assert "weight: 0.75" in config
