"""The stage registry: the one table of what each stage of the pipeline is, and the one way to build it.

    stage        config / model                           model_type     loads with
    autoencoder  AutoencoderConfig / Autoencoder          "autoencoder"  AutoModel
    calm         CALMConfig / CALM (frozen AE inside)     "energy"       AutoModel
    baseline     LlamaConfig / LlamaForCausalLM           "llama"        AutoModelForCausalLM

Training, export, evaluation, the dry run, the benchmarks and the report look a stage up here
(`get_stage`, `stage_of_model_type`) for its config and model classes, its training objective, its
FLOPs and parameter counts (`pretrain.models.flops`) and the name of its validation metric.
`build_model` is the only place a model is constructed (for training under ZeRO-3, for export, on
the meta device for counting, or plainly for tests); `load_model` the only place an export is read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from pretrain.finetune import masked_labels, unpack
from pretrain.models import flops
from pretrain.models.attention import as_one_row, attn_implementation, packs_in_one_row
from pretrain.models.autoencoder import Autoencoder, AutoencoderConfig
from pretrain.models.baseline import baseline_config
from pretrain.models.calm import CALM, CALMConfig
from pretrain.models.losses import linear_cross_entropy, resolve_chunk_rows


def _autoencoder_objective(model, batch: torch.Tensor, metrics: bool = True, ce_chunk_rows: int | str = "auto"):
    if not isinstance(batch, torch.Tensor):
        raise ValueError("the autoencoder stage trains on pretraining shards, not on fine-tuning (masked) data")
    return model(input_ids=batch, accuracy=metrics, ce_chunk_rows=ce_chunk_rows)


def _calm_objective(model, batch: torch.Tensor, metrics: bool = True, ce_chunk_rows: int | str = "auto"):
    """Energy loss; on fine-tuning data only the chunks holding response tokens (pretrain.finetune)."""
    ids, mask, positions = unpack(batch)
    return model(input_ids=ids) if mask is None else model(input_ids=ids, loss_mask=mask, position_ids=positions)


def _baseline_objective(model, batch: torch.Tensor, metrics: bool = True, ce_chunk_rows: int | str = "auto"):
    """Next-token cross-entropy. Small logits: transformers' own loss, unchanged. Large ones (see
    `losses.resolve_chunk_rows`): the backbone's final hidden states through the LM head in chunks of
    rows, so the (tokens x vocabulary) logits are never whole; the model stays a plain Llama. On
    fine-tuning data only the response targets are scored (labels -100 elsewhere; pretrain.finetune)."""
    batch, mask, positions = unpack(batch)
    labels = batch if mask is None else masked_labels(batch, mask)
    module = getattr(model, "module", model)  # a DeepSpeed engine or the model itself
    # No KV cache in training: it would only cost memory, and transformers keeps packed records apart
    # (pretrain.finetune) only when none is passed.
    extra = {"use_cache": False}
    if positions is not None:
        if packs_in_one_row(module.config):  # each row starts with an unscored token: no target crosses rows
            batch, labels, positions = as_one_row(batch, labels, positions)
        extra["position_ids"] = positions
    head = module.lm_head
    rows = resolve_chunk_rows(ce_chunk_rows, batch.numel(), module.config.vocab_size, batch.device.type)
    if not rows:
        return model(input_ids=batch, labels=labels, **extra)
    # logits_to_keep=1: the head's own forward makes one position's logits; hidden_states[-1] is the
    # final (normed) hidden state of every position.
    out = model(input_ids=batch, output_hidden_states=True, logits_to_keep=1, **extra)
    hidden = out.hidden_states[-1][:, :-1]
    # The head's weight as an output of the head's own forward (identity @ W^T is W^T exactly, in any
    # float format): under ZeRO-3 the partitioned weight is gathered for that call and again for its
    # gradient in backward, as for any module call, so nothing reads it outside its module.
    eye = torch.eye(hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
    loss, _ = linear_cross_entropy(hidden, head(eye).T, labels[:, 1:], rows)
    return CausalLMOutputWithPast(loss=loss)


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline. `objective(model, batch, metrics=True, ce_chunk_rows="auto")` returns
    a model output with `.loss` (`metrics=False`: skip per-step extras such as the autoencoder's
    accuracy; `ce_chunk_rows`: the output layer's chunking, `pretrain.models.losses`)."""

    name: str
    model_type: str
    config_class: type[PreTrainedConfig]
    model_class: type[PreTrainedModel]
    auto_class: str
    """The transformers Auto class an export loads with."""
    validation_metric: str
    """The stage's own metric in validation records, beside `loss`."""
    objective: Callable[[Any, torch.Tensor], Any]
    has_attention: bool

    def build_config(self, model_kwargs: dict[str, Any] | None = None, ae_path: str | None = None) -> PreTrainedConfig:
        """The HF config from a preset's `model:` mapping (baseline: on top of the baseline defaults).

        CALM's autoencoder is named by the run's `ae_path` (the TrainConfig field), never by the
        mapping itself, so one run has one answer to "which autoencoder".
        """
        kwargs = dict(model_kwargs or {})
        if self.name == "baseline":
            return baseline_config(**kwargs)
        if self.name == "calm" and ae_path is not None:
            kwargs["ae_path"] = str(ae_path)
        return self.config_class(**kwargs)

    def context_steps(self, config: PreTrainedConfig, block_len: int) -> int:
        """Backbone positions of a block: tokens, or chunks of K tokens for CALM."""
        return block_len // config.patch_size if self.name == "calm" else block_len

    def train_flops_per_token(self, config: PreTrainedConfig, block_len: int) -> float:
        """Training FLOPs per token at this block length (the convention of `pretrain.models.flops`)."""
        return float(flops.train_flops_per_token(config, self.name, self.context_steps(config, block_len)))

    def inference_flops_per_token(self, config: PreTrainedConfig, context_steps: int = flops.PAPER_CONTEXT) -> float:
        return float(flops.inference_flops_per_token(config, self.name, context_steps))

    def param_count(self, config: PreTrainedConfig, include_ae: bool = False) -> int:
        return int(flops.param_count(config, self.name, include_ae))


STAGES: dict[str, Stage] = {
    "autoencoder": Stage("autoencoder", "autoencoder", AutoencoderConfig, Autoencoder, "AutoModel",
                         "reconstruction_accuracy", _autoencoder_objective, has_attention=False),
    "calm": Stage("calm", "energy", CALMConfig, CALM, "AutoModel", "energy_loss", _calm_objective,
                  has_attention=True),
    "baseline": Stage("baseline", "llama", LlamaConfig, LlamaForCausalLM, "AutoModelForCausalLM", "ce",
                      _baseline_objective, has_attention=True),
}
STAGE_NAMES = tuple(STAGES)


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; expected one of {STAGE_NAMES}")
    return STAGES[name]


def stage_of_model_type(model_type: str | None) -> Stage:
    """The stage whose models are saved with this `config.json` model_type."""
    for stage in STAGES.values():
        if stage.model_type == model_type:
            return stage
    raise ValueError(f"model_type {model_type!r} is none of ours ({sorted(s.model_type for s in STAGES.values())})")


def describe_kind(model_type: str | None) -> str:
    """'a CALM model (model_type 'energy')' and the like, for messages about a directory of the wrong kind."""
    names = {"autoencoder": "an autoencoder", "calm": "a CALM model", "baseline": "a Llama (baseline) model"}
    try:
        name = names[stage_of_model_type(model_type).name]
    except ValueError:
        name = "a model that is none of this pipeline's"
    return f"{name} (model_type {model_type!r})"


def build_model(
    stage: str,
    model_kwargs: dict[str, Any] | PreTrainedConfig | None = None,
    ae_path: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    zero3_config: dict | None = None,
    frozen_ae_outside: bool = False,
    activation_checkpointing: bool = False,
) -> PreTrainedModel:
    """A freshly initialised model of `stage`, built on the current default device in `dtype`.

    `model_kwargs` is a preset's `model:` mapping (with `ae_path` for CALM) or an already built config.

    `device` is where it will run; it picks the attention kernel (see attention.py). With
    `zero3_config` the weights are partitioned as they are constructed (transformers does so while an
    `HfDeepSpeedConfig` is alive, through `_from_config`). For CALM the frozen autoencoder's weights
    are loaded from `ae_path` unless the model is built on the meta device or without an ae_path (an
    in-memory `ae_config`: tests, counting); with `frozen_ae_outside` (training) it is kept whole, in
    float32 and out of the module tree, so ZeRO neither partitions, optimizes nor checkpoints it.
    `activation_checkpointing`: see `enable_activation_checkpointing`.
    """
    spec = get_stage(stage)
    if isinstance(model_kwargs, PreTrainedConfig):
        config = model_kwargs
    else:
        config = spec.build_config(model_kwargs, ae_path)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if spec.has_attention:
        kwargs["attn_implementation"] = attn_implementation(device, dtype)
    hf_ds = None
    if zero3_config is not None:
        from transformers.integrations import HfDeepSpeedConfig

        # transformers partitions models built while this object is alive (it holds a weak reference).
        hf_ds = HfDeepSpeedConfig(zero3_config)
    model = spec.model_class._from_config(config, **kwargs)
    del hf_ds
    if stage == "calm" and config.ae_path and model.transformer.embed_tokens.weight.device.type != "meta":
        _attach_autoencoder(model, config.ae_path, frozen_ae_outside, torch.device(device or "cpu"))
    if activation_checkpointing:
        enable_activation_checkpointing(model, stage)
    return model


def enable_activation_checkpointing(model: PreTrainedModel, stage: str) -> None:
    """Recompute each Llama decoder layer in backward instead of keeping its activations (CALM's
    backbone, the baseline): only the layers' inputs stay alive, at the cost of a second forward pass
    of the layers. Non-reentrant `torch.utils.checkpoint`: under ZeRO-3 the recomputation runs the
    layer's modules again, so their partitioned weights are gathered again by DeepSpeed's hooks, and
    the gradients reach ZeRO's per-parameter hooks once per step as without checkpointing. The
    autoencoder has no attention and is small next to its logits: it is refused."""
    if stage == "autoencoder":
        raise ValueError("activation checkpointing is for the calm and baseline stages (the autoencoder's "
                         "memory is its logits: see ce_chunk_rows)")
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x; older: the alias
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _attach_autoencoder(model: CALM, ae_path: str, outside: bool, device: torch.device) -> None:
    # Kept in float32 even in bf16 runs: the targets are the autoencoder's exact posteriors (a bf16
    # encoder moved them by ~7e-3), and the encoder is cheap next to the backbone.
    trained = load_autoencoder(ae_path).to(torch.float32).eval()
    trained.requires_grad_(False)
    if outside:
        # Replace the (randomly initialised, possibly partitioned) placeholder by a plain attribute:
        # visible to CALM.forward, invisible to parameters(), state_dict() and ZeRO.
        del model._modules["ae_model"]
        object.__setattr__(model, "ae_model", trained.to(device))
    else:
        model.ae_model.load_state_dict(trained.state_dict())


class WeightsMismatch(ValueError):
    """A model directory's tensors are not the model's: the message names the missing and unexpected ones."""


def load_autoencoder(path: str | os.PathLike) -> Autoencoder:
    """The exported autoencoder at `path` (a directory with config.json and weights)."""
    return load_model("autoencoder", path)


def load_model(stage: str, path: str | os.PathLike, **kwargs) -> PreTrainedModel:
    """Load an exported model directory of the given stage (kwargs go to `from_pretrained`), strictly:
    a missing or unexpected tensor raises WeightsMismatch instead of transformers' load report (which
    would leave those weights freshly initialised)."""
    spec = get_stage(stage)
    config_file = Path(path) / "config.json"
    model_type = json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else None
    if config_file.is_file() and model_type != spec.model_type:
        raise WeightsMismatch(f"{path} holds {describe_kind(model_type)}, not a {stage} model")
    model, info = spec.model_class.from_pretrained(str(path), output_loading_info=True, **kwargs)
    problems = {kind: sorted(info.get(kind) or []) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {kind: names for kind, names in problems.items() if names}
    if problems:
        listed = "; ".join(f"{kind.split('_')[0]} {names[:4]}{' ...' if len(names) > 4 else ''}"
                           for kind, names in problems.items())
        raise WeightsMismatch(f"{path} does not hold a whole {stage} model of its config: {listed}")
    return model
