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
import types
import typing
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
    sources: list[dict[str, Any]] = field(default_factory=list)
    """A weighted mixture instead of `path`: [{path: DIR_OR_URL, weight: 0.7}, ...] (`pretrain.mixture`);
    the sources must share tokenizer and block length. Empty: `path` alone."""

    def __post_init__(self) -> None:
        if self.sources:
            from pretrain.mixture import parse_sources

            try:
                parse_sources(self.sources)
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc


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

    def check(self) -> None:
        """Values torch's AdamW would refuse mid-start (or silently misuse), refused here by name."""
        rules = (("lr", self.lr > 0, "> 0"), ("eps", self.eps > 0, "> 0"),
                 ("beta1", 0 <= self.beta1 < 1, "in [0, 1)"), ("beta2", 0 <= self.beta2 < 1, "in [0, 1)"),
                 ("weight_decay", self.weight_decay >= 0, ">= 0"), ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
                 ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"), ("grad_clip", self.grad_clip >= 0, ">= 0"))
        for name, ok, want in rules:
            if not ok:
                raise ConfigError(f"optim.{name} must be {want}, got {getattr(self, name)}")


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
    init_from: str | None = None
    """Start from these weights instead of random ones (`pretrain.init_from`): an export of this stage, the
    authors' released CALM or autoencoder, or a Hugging Face Llama directory (baseline). The model fields
    the run leaves out are taken from it; those it sets must agree. Optimizer, schedule and data start at
    step 0; a checkpoint in run_dir (resume) wins over it."""
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
    max_train_flops: float = 0.0
    """A training-compute budget (FLOPs, counted as metrics.jsonl's train_flops): when > 0 the run takes
    the fewest steps that reach it, ceil(budget / FLOPs per step), in place of max_steps (the schedule
    follows). `python -m pretrain --match-flops RUN_DIR` sets it to another run's training FLOPs."""
    save_every: int = 500
    """Checkpoint every N optimizer steps (and always at the end); 0 saves only at the end."""
    keep_last: int = 2
    """Checkpoints to keep on disk; older ones are deleted after a successful save."""
    eval_every: int = 500
    """Validate every N steps (and at the end); 0 disables periodic validation."""
    eval_batches: int = 8
    """Validation batches per rank."""
    eval_brier_blocks: int = 2
    """CALM and baseline: validation blocks per rank also scored with BrierLM at each validation, each
    cut to 128 tokens (a few hundred positions; logged as brierlm, brier_1..4); 0 turns it off."""
    log_every: int = 10
    nan_policy: str = "stop"
    """On a NaN/Inf loss: 'stop' (checkpoint the last good step, exit non-zero) or 'skip' the step."""
    nan_skip_limit: int = 10
    """With nan_policy=skip: this many skipped steps in a row stop the run (checkpoint, exit code 3)."""
    export: bool = True
    """Write a consolidated HF directory (`run_dir/export`) at the end of training."""
    ce_chunk_rows: int | str = "auto"
    """Output layer (autoencoder decoder, baseline LM head): rows of the cross-entropy formed at once, so the
    (tokens x vocabulary) logits are never whole (`pretrain.models.losses`); 0 forms them whole; 'auto'
    chunks only logits above 2^26 elements (256 MiB in fp32), in chunks of ~2^25 (CPU) or 2^28 (GPU) logits."""
    activation_checkpointing: bool = False
    """Recompute the Llama layers in backward instead of keeping their activations (calm, baseline)."""

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
        self._check_memory_options()
        for name in ("micro_batch_size", "grad_accum_steps", "max_steps", "eval_batches", "log_every",
                     "nan_skip_limit"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_train_flops < 0:
            raise ConfigError(f"max_train_flops must be >= 0, got {self.max_train_flops}")
        for name in ("save_every", "keep_last", "eval_every", "eval_brier_blocks"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        self.optim.check()

    def _check_memory_options(self) -> None:
        chunk = self.ce_chunk_rows
        if chunk != "auto" and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0):
            raise ConfigError(f"ce_chunk_rows must be auto or an int >= 0, got {chunk!r}")
        if self.activation_checkpointing and self.stage == "autoencoder":
            raise ConfigError("activation_checkpointing is for the calm and baseline stages, not the autoencoder")

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
    hints = typing.get_type_hints(cls)
    for name, value in raw.items():
        f = known[name]
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(sub):
            kwargs[name] = _build(sub, value or {}, f"{where}.{name}".lstrip("."))
        else:
            kwargs[name] = _typed(value, hints[name], f"{where}.{name}".lstrip("."))
    return cls(**kwargs)


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _typed(value: Any, hint: Any, where: str) -> Any:
    """`value` as field `where` declares it (an integral float for an int, an int for a float);
    a ConfigError naming the field and the value otherwise."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in (o for o in options if o is not type(None)):
            try:
                return _typed(value, option, where)
            except ConfigError:
                pass
        kinds = [_KINDS.get(o, getattr(o, "__name__", str(o))) for o in options if o is not type(None)]
        raise ConfigError(f"{where} must be {' or '.join(kinds)}, got {value!r}")
    origin = typing.get_origin(hint) or hint
    if origin in (dict, list):
        if not isinstance(value, origin):
            raise ConfigError(f"{where} must be a {'mapping' if origin is dict else 'list'}, got {value!r}")
        return value
    if origin not in _KINDS:
        return value
    if origin in (int, float) and isinstance(value, str):
        value = _parse_value(value)  # "3e-4" in a YAML file is a string to PyYAML
    if origin is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if origin is str and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # run_dir=2024 is a name, not a number
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {bool: isinstance(value, bool), int: numeric and isinstance(value, int), float: numeric,
          str: isinstance(value, str)}[origin]
    if not ok:
        raise ConfigError(f"{where} must be {_KINDS[origin]}, got {value!r}")
    return float(value) if origin is float else value


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


def load_config(preset: str | os.PathLike, overrides: list[str] | None = None, stage: str | None = None) -> TrainConfig:
    """Read a preset (name in configs/ or a YAML path), apply overrides, validate everything. `stage`
    fills in a preset that names none (one fine-tuning recipe serves every stage)."""
    path = _resolve_preset(preset)
    with open(path) as fh:
        raw = yaml.safe_load(fh) or {}
    if stage is not None and isinstance(raw, dict):
        raw.setdefault("stage", stage)
    raw = apply_overrides(raw, list(overrides or []))
    config = _build(TrainConfig, raw, "")
    validate_model_section(config.stage, config.model)
    return config


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        yaml.safe_dump(config.to_dict(), fh, sort_keys=False)
