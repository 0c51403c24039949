"""Turn a static ds_configs/*.json template into the dict DeepSpeed gets, from the TrainConfig.

The TrainConfig is the single source of truth for batch sizes, clipping and precision. Template
fields set to "auto" are filled in; a template that hard-codes a different value is an error rather
than a silent override, and `train_batch_size = micro × accumulation × world` is checked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pretrain.config import ConfigError, TrainConfig


def _fill(ds: dict[str, Any], key: str, value: Any, source: str) -> None:
    current = ds.get(key, "auto")
    if current == "auto":
        ds[key] = value
    elif current != value:
        raise ConfigError(f"{source}: {key}={current!r} disagrees with the training config ({value!r}); "
                          f"set it to \"auto\" and use the training config's fields")


def build_ds_config(config: TrainConfig, world_size: int, precision: str, root: Path) -> dict[str, Any]:
    path = Path(config.ds_config)
    if not path.is_absolute():
        path = root / path
    if not path.is_file():
        raise ConfigError(f"ds_config={config.ds_config}: no such file ({path})")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    stage = ds.get("zero_optimization", {}).get("stage")
    if stage not in (1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 1, 2 or 3, got {stage!r}")
    _fill(ds, "train_micro_batch_size_per_gpu", config.micro_batch_size, str(path))
    _fill(ds, "gradient_accumulation_steps", config.grad_accum_steps, str(path))
    _fill(ds, "train_batch_size", config.micro_batch_size * config.grad_accum_steps * world_size, str(path))
    _fill(ds, "gradient_clipping", float(config.optim.grad_clip), str(path))
    bf16 = ds.setdefault("bf16", {})
    _fill(bf16, "enabled", precision == "bf16", f"{path} (bf16)")
    if precision == "bf16":
        # Without it ZeRO sums the micro-batches' gradients in bf16 (8 bits of mantissa): with 8 or 32
        # accumulation steps the small ones are rounded away. fp32 costs one fp32 gradient partition.
        _fill(ds.setdefault("data_types", {}), "grad_accum_dtype", "fp32", f"{path} (data_types)")
    if ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{path}: fp16 is not supported (use precision=bf16)")
    return ds


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    """True when the DeepSpeed config keeps the optimizer state on the CPU (ZeRO-Offload)."""
    offload = ds.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)
