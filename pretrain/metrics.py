"""Training metrics: one JSON line per record in run_dir/metrics.jsonl, mirrored to W&B, rank 0 only.

metrics.jsonl is always written so a run can be plotted without W&B; one JSON object per line,
non-finite numbers written as null:

    {"split": "train", "step", "tokens_seen", "loss" (mean over the logging window and the ranks),
     ["ce", "kl", "accuracy" (autoencoder; accuracy: the logged step's only)], ["fidelity" 2E||x-y||,
     "diversity" E||x-x'|| (CALM: the energy loss is their difference)], "lr", "grad_norm"
     (before clipping), "skipped_steps",
     "tokens_per_s", "step_time_s", "train_flops" (cumulative, pretrain.models.flops), "tflops" (achieved),
     ["mfu" (known GPUs only)], "mem_allocated_gib" and "mem_reserved_gib" (GPU) or "mem_rss_gib" (CPU)}
    {"split": "validation", "step", "tokens_seen", "loss", and per stage: "ce",
     "reconstruction_accuracy" (latents sampled), "accuracy_mean_latent" (autoencoder);
     "energy_loss" (CALM); "ce" (baseline)}

A resumed run (`resume_step`) first drops the records of the steps after its checkpoint, which it
is about to log again, so the file holds every step once after any number of resumes; it continues
the same W&B run and sends it only the steps W&B has not had yet (W&B keeps the first value of a
step; a resume is exact, so the losses it re-logs are the same).

W&B runs online when an API key is configured, offline otherwise (mode 'auto'), and keep all of
their files inside the run directory. MFU needs a peak FLOP/s figure, which only exists for known
accelerators (the table below); on CPU it is omitted.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

# Dense bf16 peak TFLOP/s (without sparsity), matched against torch.cuda.get_device_name() as whole
# words, most specific first ("H100 PCIe" before "H100"; "L4" does not match "L40" or "L40S").
PEAK_BF16_TFLOPS = (
    ("GH200", 989.0), ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0),
    ("H800 PCIe", 756.0), ("H800", 989.0), ("B200", 2250.0), ("B100", 1750.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0),
    ("RTX 4090", 165.0), ("RTX 3090", 71.0),
)


def peak_tflops_of(name: str) -> float | None:
    """Peak dense bf16 TFLOP/s of a GPU by its CUDA name, or None when it is not in the table."""
    for key, value in PEAK_BF16_TFLOPS:
        if re.search(rf"(?<![\w-]){re.escape(key)}(?![\w])", name):
            return value
    return None


def peak_tflops(device: torch.device) -> float | None:
    """Peak dense bf16 TFLOP/s of `device`, or None when unknown (CPU, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    return peak_tflops_of(torch.cuda.get_device_name(device))


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak accelerator memory (GiB) on GPU; resident set size of this process on CPU."""
    if device.type == "cuda":
        return {
            "mem_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "mem_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    with open("/proc/self/statm") as fh:
        rss_pages = int(fh.read().split()[1])
    return {"mem_rss_gib": rss_pages * os.sysconf("SC_PAGE_SIZE") / 2**30}


def wandb_mode(configured: str) -> str:
    if configured != "auto":
        return configured
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def truncate_after(path: Path, step: int) -> int:
    """Drop the records of steps after `step` from a metrics file (and a line cut short by a kill);
    returns the last step it held before."""
    if not path.exists():
        return 0
    kept, last = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        last = max(last, record.get("step", 0))
        if record.get("step", 0) <= step:
            kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
    return last


class MetricsLogger:
    """Writes records on rank 0; every other rank gets a logger that does nothing."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool, wandb_config: Any = None,
                 config_dict: dict | None = None, run_id: str | None = None, resume_step: int = 0):
        self.enabled = enabled
        self.run = None
        self.run_id = run_id
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        logged_through = truncate_after(run_dir / "metrics.jsonl", resume_step)
        # Steps up to here reached the W&B run being resumed (a new run has none).
        self._wandb_done = logged_through if run_id else 0
        self._file = open(run_dir / "metrics.jsonl", "a")
        mode = wandb_mode(wandb_config.mode) if wandb_config is not None else "disabled"
        if mode != "disabled" and importlib.util.find_spec("wandb") is None:
            # A machine's own Python (CALM_PYTHON, e.g. a GPU node without an index) may lack wandb.
            if wandb_config.mode != "auto":
                raise RuntimeError(f"wandb.mode={wandb_config.mode} but wandb is not installed "
                                   "(pip install wandb, or wandb.mode=disabled)")
            print("wandb is not installed: metrics go to metrics.jsonl only", file=sys.stderr, flush=True)
            mode = "disabled"
        if mode == "disabled":
            return
        wandb_dir = run_dir / "wandb"
        for name, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", ".cache"),
                          ("WANDB_CONFIG_DIR", ".config"), ("WANDB_DATA_DIR", ".data")):
            path = wandb_dir / sub
            path.mkdir(parents=True, exist_ok=True)
            os.environ.setdefault(name, str(path))
        import wandb

        self.run = wandb.init(
            project=wandb_config.project, entity=wandb_config.entity,
            name=wandb_config.name or run_dir.name, tags=list(wandb_config.tags), mode=mode,
            dir=str(wandb_dir), config=config_dict, id=run_id, resume="allow",
        )
        self.run_id = self.run.id

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self.run is not None and record["step"] > self._wandb_done:
            prefix = "val/" if record.get("split") == "validation" else "train/"
            self.run.log({prefix + k: v for k, v in record.items()
                          if k not in ("split", "step") and isinstance(v, (int, float))},
                         step=record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self.run is not None:
            self.run.finish()


def run_train_flops(run_dir: str | os.PathLike, with_autoencoder: bool = False) -> float:
    """The training FLOPs a finished run spent (the last train record's train_flops in its metrics.jsonl);
    with `with_autoencoder`, a CALM run's plus those of the autoencoder run it was trained on. A
    ConfigError naming what is missing otherwise."""
    from pretrain.config import ConfigError

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"--match-flops {run_dir}: no metrics.jsonl there (a training run directory is expected)")
    flops = None
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("split") == "train" and record.get("train_flops"):
            flops = float(record["train_flops"])
    if not flops:
        raise ConfigError(f"--match-flops {run_dir}: its metrics.jsonl has no train_flops yet")
    if with_autoencoder:
        ae_run = autoencoder_run(run_dir)
        if ae_run is None:
            raise ConfigError(f"{run_dir}: no autoencoder run found for its ae_path (a CALM run whose ae_path is "
                              "AE_RUN/export, with AE_RUN/metrics.jsonl, is expected)")
        flops += run_train_flops(ae_run)
    return flops


def autoencoder_run(calm_run_dir: str | os.PathLike) -> Path | None:
    """The training run of the autoencoder a CALM run was trained on: the directory above its ae_path
    (`AE_RUN/export`) when that holds a metrics.jsonl; None when it cannot be found."""
    import yaml

    config = Path(calm_run_dir) / "config.yaml"
    if not config.is_file():
        return None
    ae_path = (yaml.safe_load(config.read_text()) or {}).get("ae_path")
    if not ae_path:
        return None
    for candidate in (Path(ae_path).parent, Path(ae_path)):
        if (candidate / "metrics.jsonl").is_file():
            return candidate
    return None
