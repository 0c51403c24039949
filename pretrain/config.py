"""The one typed config system: dataclasses with documented fields, YAML presets, key=value overrides.

A preset is a YAML file in `configs/` (or any path) whose top-level keys mirror `TrainConfig`.
`load_config("calm-tiny", ["optim.lr=1e-3", "model.num_hidden_layers=2"])` reads the preset,
applies dotted overrides (values parsed as YAML scalars), rejects unknown keys anywhere, and
validates the model section against the stage's Hugging Face config class. The resolved config is
saved as `config.yaml` beside every checkpoint and sent to W&B.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
PRESET_DIR = REPO_ROOT / "configs"


class ConfigError(ValueError):
    """A config value or key is wrong; the message names it."""


@dataclass
class DataConfig:
    """Where the token shards come from (the output directory of `python -m data_prep`)."""

    path: str = "data/quickstart"
    """Directory holding manifest.json, the tokenizer and the train/validation shards."""
    train_split: str = "train"
    """Split name used for training."""
    val_split: str = "validation"
    """Split name used for periodic validation."""


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (paper: 0.9/0.95, wd 0.1, clip 1.0, lr 3e-4)."""

    lr: float = 3e-4
    """Peak learning rate."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    """Applied to matrices only; biases, norms and embeddings' gains are not decayed."""
    warmup_steps: int = 1000
    """Linear warmup from 0 to `lr` over this many optimizer steps."""
    schedule: str = "constant"
    """'constant' (paper) or 'cosine' (decays to `min_lr_ratio * lr` at `max_steps`)."""
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""


@dataclass
class WandbConfig:
    """Weights & Biases. Mode 'auto' is online with an API key, offline without one."""

    project: str = "calm"
    entity: str | None = None
    name: str | None = None
    """Run name; defaults to the run directory's name."""
    mode: str = "auto"
    """'auto', 'online', 'offline' or 'disabled'."""
    tags: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    """Everything one training run needs. Batch sizes here are the single source of truth:
    DeepSpeed's JSON gets them filled in and `train_batch_size = micro × accumulation × world` is checked."""

    stage: str = "baseline"
    """'autoencoder', 'calm' or 'baseline'."""
    model: dict[str, Any] = field(default_factory=dict)
    """Fields of the stage's HF config class (AutoencoderConfig, CALMConfig or LlamaConfig)."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    ae_path: str | None = None
    """CALM stage only: directory of the exported (HF) autoencoder to freeze inside the model."""
    micro_batch_size: int = 8
    """Sequences per rank per forward pass."""
    grad_accum_steps: int = 1
    max_steps: int = 1000
    """Optimizer steps to train for."""
    seed: int = 1234
    precision: str = "auto"
    """'fp32', 'bf16', or 'auto' (bf16 on CUDA, fp32 on CPU)."""
    ds_config: str = "ds_configs/zero3.json"
    """DeepSpeed JSON template (relative to the repo root or absolute); batch sizes are filled in."""
    run_dir: str = "runs/default"
    """Checkpoints, metrics.jsonl, exports and W&B files go here."""
    save_every: int = 500
    """Checkpoint every N optimizer steps (and always at the end); 0 saves only at the end."""
    keep_last: int = 2
    """Checkpoints to keep on disk; older ones are deleted after a successful save."""
    eval_every: int = 500
    """Validate every N steps (and at the end); 0 disables periodic validation."""
    eval_batches: int = 8
    """Validation batches per rank."""
    log_every: int = 10
    nan_policy: str = "stop"
    """On a NaN/Inf loss: 'stop' (checkpoint the last good step, exit non-zero) or 'skip' the step."""
    export: bool = True
    """Write a consolidated HF directory (`run_dir/export`) at the end of training."""

    def __post_init__(self) -> None:
        from pretrain.stages import STAGE_NAMES

        if self.stage not in STAGE_NAMES:
            raise ConfigError(f"stage must be one of {STAGE_NAMES}, got {self.stage!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.nan_policy not in ("stop", "skip"):
            raise ConfigError(f"nan_policy must be stop or skip, got {self.nan_policy!r}")
        if self.optim.schedule not in ("constant", "cosine"):
            raise ConfigError(f"optim.schedule must be constant or cosine, got {self.optim.schedule!r}")
        if self.wandb.mode not in ("auto", "online", "offline", "disabled"):
            raise ConfigError(f"wandb.mode must be auto, online, offline or disabled, got {self.wandb.mode!r}")
        for name in ("micro_batch_size", "grad_accum_steps", "max_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _resolve_preset(preset: str | os.PathLike) -> Path:
    path = Path(preset)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = PRESET_DIR / f"{preset}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    raise ConfigError(f"no preset {str(preset)!r}: not a YAML file and not one of {known}")


def _parse_value(text: str) -> Any:
    # YAML scalars: "1e-3" -> float, "true" -> bool, "null" -> None, "[1,2]" -> list.
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides to a nested dict (in place) and return it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node[parts[-1]] = _parse_value(text)
    return raw


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where or 'config'}; known: {sorted(known)}")
    kwargs = {}
    for name, value in raw.items():
        f = known[name]
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(sub):
            kwargs[name] = _build(sub, value or {}, f"{where}.{name}".lstrip("."))
        else:
            kwargs[name] = value
    return cls(**kwargs)


def validate_model_section(stage: str, model: dict[str, Any]) -> None:
    """Reject model keys that the stage's HF config class does not define."""
    from pretrain.stages import get_stage

    config_cls = get_stage(stage).config_class
    allowed = set(config_cls().to_dict())
    unknown = sorted(set(model) - allowed)
    if unknown:
        raise ConfigError(f"unknown model key(s) {unknown} for stage {stage!r} ({config_cls.__name__})")
    if "ae_path" in model:
        # One run, one autoencoder: the top-level field is what training, export and the dry run read.
        raise ConfigError("model.ae_path: name the autoencoder with the top-level ae_path=DIR, not inside model:")


def load_config(preset: str | os.PathLike, overrides: list[str] | None = None) -> TrainConfig:
    """Read a preset (name in configs/ or a YAML path), apply overrides, validate everything."""
    path = _resolve_preset(preset)
    with open(path) as fh:
        raw = yaml.safe_load(fh) or {}
    raw = apply_overrides(raw, list(overrides or []))
    config = _build(TrainConfig, raw, "")
    validate_model_section(config.stage, config.model)
    return config


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        yaml.safe_dump(config.to_dict(), fh, sort_keys=False)
