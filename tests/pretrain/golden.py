"""Golden loss traces: the first 20 training losses of each tiny preset on the tests' tiny dataset.

A refactor that changes numerics (a different reduction order, a re-seeded sampler, a moved cast)
changes these numbers and fails `test_golden.py` loudly. When a change of numerics is intended,
regenerate the traces and commit them with the change that explains why:

    .venv/bin/python -m tests.pretrain.golden          # rewrites tests/pretrain/golden_traces.json

Each stage trains through `python -m pretrain` (DeepSpeed ZeRO-3, one process, fp32 on CPU, one
thread), with gradient accumulation 2 so the accumulation path is covered too; CALM trains on the
autoencoder exported by the first run.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
TRACES = Path(__file__).with_name("golden_traces.json")
STEPS = 20
PRESETS = {"autoencoder": "ae-tiny", "calm": "calm-tiny", "baseline": "baseline-tiny"}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), WANDB_MODE="disabled")
    return env


def train_losses(stage: str, data_dir: Path, work: Path) -> list[float]:
    """The per-step training losses of a 20-step run of the stage's tiny preset."""
    run_dir = work / stage
    extra = [f"ae_path={work / 'autoencoder' / 'export'}"] if stage == "calm" else []
    cmd = [sys.executable, "-m", "pretrain", "--stage", stage, "--config", PRESETS[stage],
           f"data.path={data_dir}", f"run_dir={run_dir}", f"max_steps={STEPS}", "log_every=1",
           "eval_every=0", "save_every=0", "micro_batch_size=4", "grad_accum_steps=2", "precision=fp32",
           "wandb.mode=disabled", f"export={'true' if stage == 'autoencoder' else 'false'}", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"{stage} run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"]


def all_traces(data_dir: Path, work: Path) -> dict[str, list[float]]:
    return {stage: train_losses(stage, data_dir, work) for stage in PRESETS}


def machine() -> dict[str, str]:
    """What the exact comparison depends on: the same kernels give bit-identical losses."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine()}


def main() -> int:
    from data_prep.__main__ import main as prep
    from tests.conftest import TINY_ARGS

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prep([*TINY_ARGS, "--output", str(data)])
        traces = all_traces(data, Path(tmp))
    TRACES.write_text(json.dumps({"machine": machine(), "steps": STEPS, "losses": traces}, indent=1) + "\n")
    print(f"wrote {TRACES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
