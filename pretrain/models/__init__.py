"""The three models of the pipeline, as Hugging Face models registered with the Auto classes.

    AutoencoderConfig / Autoencoder   (model_type "autoencoder")   stage 1: K tokens <-> one latent
    CALMConfig / CALM                 (model_type "energy")        stage 2: next-latent prediction
    LlamaConfig / LlamaForCausalLM    (model_type "llama")         the discrete baseline

Which stage is which, and how a model is built or loaded, is `pretrain.stages` (the registry);
parameter and FLOPs accounting is `pretrain.models.flops`. Importing this package registers our
configs and models with transformers' Auto classes, so exported directories reload with
`AutoModel.from_pretrained(dir)`. The model_type names match the authors' released configs, so their
config.json files resolve through AutoConfig too.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from pretrain.models.attention import attn_implementation
from pretrain.models.autoencoder import Autoencoder, AutoencoderConfig, AutoencoderOutput
from pretrain.models.baseline import baseline_config
from pretrain.models.calm import CALM, CALMConfig, CALMOutput
from pretrain.models.energy import MLPGenerator, energy_loss

__all__ = [
    "CALM", "CALMConfig", "CALMOutput", "Autoencoder", "AutoencoderConfig", "AutoencoderOutput",
    "MLPGenerator", "energy_loss", "baseline_config", "attn_implementation",
]

AutoConfig.register(AutoencoderConfig.model_type, AutoencoderConfig, exist_ok=True)
AutoModel.register(AutoencoderConfig, Autoencoder, exist_ok=True)
AutoConfig.register(CALMConfig.model_type, CALMConfig, exist_ok=True)
AutoModel.register(CALMConfig, CALM, exist_ok=True)
AutoModelForCausalLM.register(CALMConfig, CALM, exist_ok=True)
