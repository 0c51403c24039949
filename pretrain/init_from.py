"""Starting a run from existing weights: `init_from=DIR` (continued pretraining, fine-tuning).

DIR is one of
    * an export of ours (`RUN_DIR/export`, `python -m pretrain.export`) of the run's stage;
    * the authors' released layout (`.bin` state dict, CALM's head repeated as `generative_head.*`, an
      absolute `ae_path` in its config): a CALM (with the run's `ae_path`) or an autoencoder;
    * any Hugging Face Llama directory (safetensors or `.bin`, sharded or not) for the baseline.

Only the weights come from DIR: the optimizer, the schedule and the data start fresh at step 0, and
`resume` wins when the run directory already holds a checkpoint. The checkpoint's config supplies
every model field the run does not set; a field the run sets must equal the checkpoint's. Everything
is checked on every rank before a single weight is copied: the kind of model, the tensor names and
shapes (a missing or unexpected tensor is an error, never a load report followed by training), the
tokenizer against the data's, and for CALM that the autoencoder inside the checkpoint is the one at
`ae_path`. Under ZeRO-3 the model is partitioned as it is built; each tensor is then gathered alone,
filled by rank 0 from the file (read lazily, one tensor at a time) and partitioned again, so no rank
ever holds the whole model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pretrain.config import ConfigError

BOOKKEEPING = {"model_type", "architectures", "auto_map", "transformers_version", "dtype", "torch_dtype",
               "_name_or_path", "ae_path", "ae_config", "use_cache"}
"""Config entries that describe a saved file, not the model: never compared, never copied."""


@dataclass
class InitSource:
    """A checked `init_from` directory: its stage, config and weights (read lazily)."""

    path: Path
    stage: str
    config: Any
    store: "TensorStore"


class TensorStore:
    """The tensors of a model directory by name, read one at a time: safetensors (memory-mapped) or
    PyTorch `.bin` files (`weights_only`, memory-mapped), single or sharded with an index."""

    def __init__(self, directory: Path):
        self._open: dict[Path, Any] = {}
        self.files: dict[str, Path] = {}
        for pattern, index in (("*.safetensors", "model.safetensors.index.json"),
                               ("*.bin", "pytorch_model.bin.index.json")):
            if (directory / index).is_file():
                weight_map = json.loads((directory / index).read_text())["weight_map"]
                self.files = {name: directory / file for name, file in weight_map.items()}
            elif files := sorted(directory.glob(pattern)):
                for file in files:
                    self.files.update(dict.fromkeys(self._names(file), file))
            if self.files:
                break
        if not self.files:
            raise ConfigError(f"init_from={directory}: no weights there (*.safetensors or pytorch_model*.bin)")

    def _handle(self, file: Path):
        if file not in self._open:
            if file.suffix == ".safetensors":
                from safetensors import safe_open

                self._open[file] = safe_open(str(file), "pt")
            else:
                self._open[file] = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        return self._open[file]

    def _names(self, file: Path) -> list[str]:
        try:
            handle = self._handle(file)
        except Exception as exc:  # a damaged file: safetensors, pickle and zip errors alike
            raise ConfigError(f"init_from: {file} cannot be read ({type(exc).__name__}: {exc})") from exc
        return list(handle.keys())

    def names(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        handle = self._handle(self.files[name])
        if isinstance(handle, dict):
            return tuple(handle[name].shape)
        return tuple(handle.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        handle = self._handle(self.files[name])
        return handle[name] if isinstance(handle, dict) else handle.get_tensor(name)


def prepare(config) -> InitSource | None:
    """The run's `init_from` checked and its config's model fields completed from the checkpoint's
    (`merge_model_fields`); None without `init_from`. Idempotent, so a resumed run resolves the same."""
    if not config.init_from:
        return None
    source = read_source(config.init_from, config.stage)
    config.model = merge_model_fields(config.model, source)
    return source


def read_source(path: str, stage: str) -> InitSource:
    """`path` checked to hold a model of `stage`; a ConfigError saying what it holds otherwise."""
    from pretrain.stages import describe_kind, get_stage

    directory = Path(path)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"init_from={path}: no config.json there; expected a model directory (an export of "
                          f"a {stage} run, the authors' released checkpoint or a Hugging Face model)")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except json.JSONDecodeError as exc:
        raise ConfigError(f"init_from={path}: config.json is not valid JSON ({exc})") from exc
    spec = get_stage(stage)
    if model_type != spec.model_type:
        raise ConfigError(f"init_from={path} holds {describe_kind(model_type)}, not a {stage} model "
                          f"(model_type {spec.model_type!r}); a {stage} run starts from a {stage} checkpoint")
    return InitSource(directory, stage, spec.config_class.from_pretrained(str(directory)), TensorStore(directory))


def merge_model_fields(model: dict[str, Any], source: InitSource) -> dict[str, Any]:
    """The run's `model:` section completed from the checkpoint's config; a ConfigError listing every
    field the run sets to another value than the checkpoint has."""
    from pretrain.stages import get_stage

    allowed = set(get_stage(source.stage).config_class().to_dict()) - BOOKKEEPING
    saved = {k: v for k, v in source.config.to_dict().items() if k in allowed}
    missing = object()
    theirs = {k: saved.get(k, getattr(source.config, k, missing)) for k in model}
    differ = [f"{k}: run {v!r}, checkpoint {theirs[k]!r}" for k, v in model.items()
              if theirs[k] is not missing and theirs[k] != v]
    if differ:
        raise ConfigError(f"init_from={source.path}: the run's model fields disagree with the checkpoint's ("
                          + "; ".join(differ) + "); drop them from the config or use a matching checkpoint")
    return {**saved, **model}


def check_tokenizer(source: InitSource, manifest: dict, data_dir) -> None:
    """The checkpoint was made with the data's tokenizer: the training record's tokenizer hash where the
    directory has one (our exports), otherwise its tokenizer files' vocabulary against the data's."""
    from data_prep.manifest import ManifestError, check_compatible

    record = source.path / "training.json"
    trained_on = json.loads(record.read_text()).get("data_tokenizer") if record.is_file() else None
    if trained_on:
        try:
            check_compatible(manifest, tokenizer_sha256=trained_on["sha256"], model=f"init_from={source.path}")
        except ManifestError as exc:
            raise ConfigError(str(exc)) from exc
        return
    if not any((source.path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return  # nothing to compare beyond the vocabulary size, which the data rule checks
    from transformers import AutoTokenizer

    from pretrain.data import load_tokenizer

    theirs = AutoTokenizer.from_pretrained(str(source.path)).get_vocab()
    if theirs != load_tokenizer(data_dir).get_vocab():
        raise ConfigError(f"init_from={source.path}: its tokenizer is not the one the data at {data_dir} was "
                          "made with (different token ids); prepare the data with --tokenizer "
                          f"{source.path}")


def _targets(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module tree's parameters and persistent buffers by state-dict name (tied ones once)."""
    targets = {n: p for n, p in model.named_parameters() if not n.startswith("ae_model.")}
    for module_name, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                targets[f"{module_name}.{name}".lstrip(".")] = buffer
    return targets


def _ignored(model: torch.nn.Module, name: str) -> bool:
    patterns = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    return name in tied or any(re.search(p, name) for p in patterns)


def check_weights(model: torch.nn.Module, source: InitSource) -> None:
    """Every tensor of `model` is in the checkpoint with its shape, and nothing else is; a ConfigError
    naming missing, unexpected and wrongly shaped tensors otherwise. CALM's `ae_model.*` are compared with the frozen
    autoencoder instead (`check_autoencoder_weights`)."""
    targets = _targets(model)
    names = [n for n in source.store.names() if not n.startswith("ae_model.")]
    missing = sorted(set(targets) - set(names))
    unexpected = sorted(n for n in set(names) - set(targets) if not _ignored(model, n))
    shapes = [f"{n}: checkpoint {list(source.store.shape(n))}, model {list(getattr(t, 'ds_shape', t.shape))}"
              for n, t in targets.items() if n in names
              and tuple(source.store.shape(n)) != tuple(getattr(t, "ds_shape", t.shape))]
    problems = [f"{label} {items[:4]}{' ...' if len(items) > 4 else ''}"
                for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes))
                if items]
    if problems:
        raise ConfigError(f"init_from={source.path} does not fit the {source.stage} model: " + "; ".join(problems))


def check_autoencoder_weights(model: torch.nn.Module, source: InitSource, ae_path: str) -> None:
    """A CALM checkpoint's `ae_model.*` (when it carries them) equal the autoencoder at `ae_path`:
    continuing a CALM on another autoencoder's latents would train it on targets it never saw."""
    ae = getattr(model, "ae_model", None)
    carried = [n for n in source.store.names() if n.startswith("ae_model.")]
    if ae is None or not carried:
        return
    frozen = ae.state_dict()
    for name in carried:
        key = name[len("ae_model."):]
        saved = source.store.get(name)
        if key not in frozen or frozen[key].shape != saved.shape or not torch.equal(frozen[key].to(saved.dtype), saved):
            raise ConfigError(f"init_from={source.path} was trained with another autoencoder than ae_path={ae_path} "
                              f"({name} differs); set ae_path to the autoencoder this CALM was trained with")


@torch.no_grad()
def load_weights(model: torch.nn.Module, source: InitSource, zero3: bool, is_main: bool) -> int:
    """Copy the checkpoint's tensors into `model` (built, possibly partitioned); returns how many.
    Collective under ZeRO-3: every rank calls it, rank 0 reads the files."""
    targets = _targets(model)
    check_weights(model, source)
    for name, tensor in targets.items():
        partitioned = zero3 and hasattr(tensor, "ds_id")
        if not partitioned:
            tensor.copy_(source.store.get(name).to(tensor.dtype))
            continue
        import deepspeed

        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=0):
            if is_main:
                tensor.data.copy_(source.store.get(name).to(tensor.dtype))
    return len(targets)
