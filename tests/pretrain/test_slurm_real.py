"""`LAUNCHER=slurm bash run.sh train` under a real SLURM (slurmctld + slurmd + munge on this machine).

The job is submitted with `sbatch --wait`; inside it run.sh starts torchrun through a real `srun`,
with the rendezvous host read by a real `scontrol`. Its losses must equal a plain torchrun launch of
the same run (`NPROC=2 bash run.sh train`). Skipped, with the reason, where SLURM cannot run.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
import subprocess

import pytest

from pretrain.distributed import free_port
from tests.slurm_cluster import LocalSlurm, SlurmUnavailable

REPO = Path(__file__).resolve().parents[2]
TINY = ["--stage", "baseline", "--config", "baseline-tiny", "model.hidden_size=32", "model.intermediate_size=64",
        "model.max_position_embeddings=64", "micro_batch_size=4", "wandb.mode=disabled", "optim.warmup_steps=1",
        "optim.lr=3e-3", "max_steps=4", "save_every=0", "eval_every=0", "log_every=1", "export=false"]


@pytest.fixture(scope="session")
def local_slurm(tmp_path_factory):
    """A running one-node SLURM cluster (tests.slurm_cluster), or a skip naming why there is none."""
    try:
        with LocalSlurm(tmp_path_factory.mktemp("slurm")) as slurm:
            yield slurm
    except SlurmUnavailable as exc:
        pytest.skip(f"no SLURM on this machine: {exc}")


def _losses(run_dir: Path) -> list[float]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in records if r["split"] == "train"]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_"))}
    return env | {"OMP_NUM_THREADS": "1"} | extra


@pytest.mark.slow
def test_sbatch_training_job_equals_torchrun_launch(local_slurm, tiny_data_dir, tmp_path):
    args = [*TINY, f"data.path={tiny_data_dir}"]
    torchrun = subprocess.run(["bash", "run.sh", "train", *args, f"run_dir={tmp_path / 'torchrun'}"], cwd=REPO,
                              env=_clean_env(NPROC="2", MASTER_PORT=str(free_port())), capture_output=True,
                              text=True, timeout=300)
    assert torchrun.returncode == 0, torchrun.stderr[-4000:]
    train = shlex.join([*args, f"run_dir={tmp_path / 'slurm'}"])
    script = (f"#!/usr/bin/env bash\nset -e\ncd {shlex.quote(str(REPO))}\n"
              f"LAUNCHER=slurm NPROC=2 MASTER_PORT={free_port()} bash run.sh train {train}\n")
    local_slurm.env.update({k: v for k, v in _clean_env().items() if k != "SLURM_CONF"})
    job = local_slurm.sbatch(script, tmp_path)
    out = (tmp_path / "slurm.out").read_text() if (tmp_path / "slurm.out").is_file() else ""
    assert job.returncode == 0, job.stdout + job.stderr + out[-6000:]
    assert "Submitted batch job" in job.stdout and "1 node(s) x 2 process(es)" in out
    assert _losses(tmp_path / "slurm") == _losses(tmp_path / "torchrun")
    assert len(_losses(tmp_path / "slurm")) == 4


@pytest.mark.slow
def test_data_prep_on_the_datatrove_slurm_executor(local_slurm, tmp_path):
    from tests.data_prep.test_distributed import ARGS, counts

    env = {**local_slurm.env, "OMP_NUM_THREADS": "1", "CALM_DATA_CACHE": str(tmp_path / "cache")}
    common = ["--output", str(tmp_path / "slurm"), "--executor", "slurm", "--tasks", "2", "--partition", "debug",
              "--time", "00:10:00", "--mem-per-cpu-gb", "1", "--wait", *ARGS]
    proc = subprocess.run([sys.executable, "-m", "data_prep.distributed", *common], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "submitted SLURM jobs" in proc.stderr
    local = subprocess.run([sys.executable, "-m", "data_prep.distributed", "--output", str(tmp_path / "local"),
                            "--tasks", "2", *ARGS], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-4000:]
    on_slurm, here = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("slurm", "local"))
    assert on_slurm["made_by"]["executor"] == "slurm" and counts(on_slurm) == counts(here)
    assert [s["sha256"] for s in on_slurm["splits"]["train"]["shards"]] == \
        [s["sha256"] for s in here["splits"]["train"]["shards"]]  # same task count: the same shards
