"""The three models of the pipeline, as Hugging Face models registered with the Auto classes.

    stage "autoencoder" -> AutoencoderConfig / Autoencoder           (model_type "autoencoder")
    stage "calm"        -> CALMConfig / CALM (frozen AE inside)       (model_type "energy")
    stage "baseline"    -> LlamaConfig / LlamaForCausalLM             (model_type "llama")

`build_model(stage, model_kwargs, ae_path)` is what training calls; exported directories reload with
`transformers.AutoModel.from_pretrained(dir)` (autoencoder, CALM) or `AutoModelForCausalLM` (baseline)
once this package is imported. The model_type names match the authors' released configs, so their
config.json files resolve through AutoConfig too.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModel, LlamaConfig, LlamaForCausalLM, PreTrainedConfig, PreTrainedModel

from pretrain.models.attention import attn_implementation
from pretrain.models.autoencoder import Autoencoder, AutoencoderConfig, AutoencoderOutput
from pretrain.models.baseline import baseline_config
from pretrain.models.calm import CALM, CALMConfig, CALMOutput
from pretrain.models.energy import MLPGenerator, energy_loss

__all__ = [
    "CALM", "CALMConfig", "CALMOutput", "Autoencoder", "AutoencoderConfig", "AutoencoderOutput",
    "MLPGenerator", "energy_loss", "baseline_config", "attn_implementation", "config_class_for",
    "build_config", "build_model", "load_model", "STAGES",
]

STAGES = ("autoencoder", "calm", "baseline")
_CONFIGS = {"autoencoder": AutoencoderConfig, "calm": CALMConfig, "baseline": LlamaConfig}

AutoConfig.register(AutoencoderConfig.model_type, AutoencoderConfig, exist_ok=True)
AutoModel.register(AutoencoderConfig, Autoencoder, exist_ok=True)
AutoConfig.register(CALMConfig.model_type, CALMConfig, exist_ok=True)
AutoModel.register(CALMConfig, CALM, exist_ok=True)


def config_class_for(stage: str) -> type[PreTrainedConfig]:
    """The HF config class whose fields make up a preset's `model:` section."""
    if stage not in _CONFIGS:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    return _CONFIGS[stage]


def build_config(stage: str, model_kwargs: dict[str, Any], ae_path: str | None = None) -> PreTrainedConfig:
    """The stage's config from a preset's `model:` mapping (baseline: on top of `baseline_config` defaults).

    For CALM, `ae_path` (the TrainConfig field) overrides `model_kwargs['ae_path']`.
    """
    kwargs = dict(model_kwargs)
    if stage == "baseline":
        return baseline_config(**kwargs)
    if stage == "calm" and ae_path is not None:
        kwargs["ae_path"] = ae_path
    return config_class_for(stage)(**kwargs)


def build_model(
    stage: str,
    model_kwargs: dict[str, Any],
    ae_path: str | None = None,
    device: str | torch.device | None = None,
) -> PreTrainedModel:
    """A freshly initialised model for training, built on the current default device.

    `device` is where it will run; it only picks the attention kernel (see attention.py). For CALM the
    frozen autoencoder's weights are loaded from `ae_path` (an exported Autoencoder directory) unless
    the model is built on the meta device or `model_kwargs` carries an in-memory `ae_config` and no
    ae_path is given (tests, parameter counting).
    """
    config = build_config(stage, model_kwargs, ae_path)
    if stage == "autoencoder":
        return Autoencoder(config)  # no attention anywhere
    config._attn_implementation = attn_implementation(device)
    if stage == "baseline":
        return LlamaForCausalLM(config)
    model = CALM(config)
    if config.ae_path and model.ae_model.encoder.embed_tokens.weight.device.type != "meta":
        trained = Autoencoder.from_pretrained(config.ae_path)
        model.ae_model.load_state_dict(trained.state_dict())
    return model


def load_model(stage: str, path: str, **kwargs) -> PreTrainedModel:
    """Load an exported model directory of the given stage (kwargs go to `from_pretrained`)."""
    cls = {"autoencoder": Autoencoder, "calm": CALM, "baseline": LlamaForCausalLM}.get(stage)
    if cls is None:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    return cls.from_pretrained(path, **kwargs)
