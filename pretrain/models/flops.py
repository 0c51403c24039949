"""Parameter and FLOPs accounting for the three model kinds, counted as in the paper (docs/method.md §7).

Convention (the paper's Table 1): a forward pass costs 2 FLOPs per parameter it touches per token
(matrix multiplies; embedding *lookups* are free, output matrices are not), plus attention
4 * layers * context * d per backbone position; training costs 3x the forward pass. CALM runs its
backbone once per K tokens, its energy head N = num_samples times per position in training (once
when generating), the frozen autoencoder's encoder forward-only during training (it makes the
targets) and its decoder when generating.

`context` is counted in backbone positions: tokens for the baseline, chunk steps (block_len / K) for
CALM. The default 2048 is the paper's protocol for Table 1 (2048 tokens for the baseline, 2048 steps =
8192 tokens for CALM). Attention is charged at the full context for every position (the paper's
convention for inference; an upper bound for causal training).
Everything is computed from the config alone, so paper-sized models need no memory; the tests check
the parameter formulas against models built on the meta device. `python -m evaluation.flops` prints
these counts for presets beside the paper's Table 1.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import LlamaConfig, PreTrainedConfig

from .autoencoder import AutoencoderConfig
from .calm import CALMConfig

PAPER_CONTEXT = 2048
ConfigLike = PreTrainedConfig | dict[str, Any]
"""A stage's HF config, or the `model:` mapping of a preset."""


def _as_config(config: ConfigLike, stage: str) -> PreTrainedConfig:
    if isinstance(config, dict):
        from pretrain.stages import get_stage

        return get_stage(stage).build_config(config)
    return config


def _linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def llama_layer_params(config: LlamaConfig) -> int:
    """One Llama decoder layer: attention, SwiGLU MLP and two RMSNorms."""
    d, hd = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    attn = _linear(d, q, config.attention_bias) + 2 * _linear(d, kv, config.attention_bias)
    attn += _linear(q, d, config.attention_bias)
    ffn, bias = config.intermediate_size, config.mlp_bias
    mlp = 2 * _linear(d, ffn, bias) + _linear(ffn, d, bias)
    return attn + mlp + 2 * d


def _backbone_nonembedding(config: LlamaConfig) -> int:
    return config.num_hidden_layers * llama_layer_params(config) + config.hidden_size


def _ae_layer(config: AutoencoderConfig) -> int:
    return config.hidden_size + 3 * _linear(config.hidden_size, config.intermediate_size, config.mlp_bias)


def _ae_parts(config: AutoencoderConfig) -> dict[str, int]:
    d, k, l = config.hidden_size, config.patch_size, config.latent_size
    return {
        "embed": config.vocab_size * d,
        "layer": _ae_layer(config),
        "squeeze": _linear(k * d, d),
        "enc_head": d + _linear(d, 2 * l),  # norm + hidden_to_latent
        "latent_to_hidden": _linear(l, d),
        "expand": _linear(d, k * d),
        "dec_norm": d,
    }


def _head_parts(config: CALMConfig) -> dict[str, int]:
    d = config.hidden_size
    block = 2 * d + _linear(2 * d, d) + _linear(d, d) + _linear(d, 2 * d) + _linear(d, d)
    final = 2 * d + _linear(d, d) + _linear(d, config.latent_size)
    # The hidden stream is embedded once per position; the noise stream runs once per sample.
    return {"per_position": _linear(d, d) + 2 * d,
            "per_sample": _linear(config.noise_size, d) + 2 * d + config.num_mlp_layers * block + final}


def _embed_proj(config: CALMConfig) -> int:
    d = config.hidden_size
    return _linear(config.patch_size * d, 2 * d) + _linear(2 * d, d) + 2 * d


def calm_ae_config(config: CALMConfig) -> AutoencoderConfig:
    """The CALM's autoencoder config: in memory, else read from `ae_path` when that is an exported
    autoencoder here, else the paper's 75M autoencoder (e.g. the authors' configs' unreachable paths)."""
    if config.ae_config is not None:
        return config.ae_config
    if config.ae_path and os.path.isfile(os.path.join(config.ae_path, "config.json")):
        return AutoencoderConfig.from_pretrained(config.ae_path)
    return AutoencoderConfig(vocab_size=config.vocab_size, patch_size=config.patch_size, latent_size=config.latent_size)


def param_count(config: ConfigLike, stage: str, include_ae: bool = False) -> int:
    """Parameters of the stage's model; CALM excludes its frozen autoencoder unless `include_ae`."""
    config = _as_config(config, stage)
    if stage == "baseline":
        embed = config.vocab_size * config.hidden_size
        return embed + _backbone_nonembedding(config) + (0 if config.tie_word_embeddings else embed)
    if stage == "autoencoder":
        p = _ae_parts(config)
        layers = (config.num_encoder_layers + config.num_decoder_layers) * p["layer"]
        return (p["embed"] + layers + p["squeeze"] + p["enc_head"] + p["latent_to_hidden"] + p["expand"]
                + p["dec_norm"])
    if stage == "calm":
        head = _head_parts(config)
        total = (config.vocab_size * config.hidden_size + _backbone_nonembedding(config) + _embed_proj(config)
                 + head["per_position"] + head["per_sample"])
        return total + (param_count(calm_ae_config(config), "autoencoder") if include_ae else 0)
    raise ValueError(f"unknown stage {stage!r}")


def _ae_encoder_flops(config: AutoencoderConfig) -> float:
    """Forward FLOPs per token of the encoder: first half per token, the rest once per chunk."""
    p, k = _ae_parts(config), config.patch_size
    n1 = config.num_encoder_layers // 2
    n2 = config.num_encoder_layers - n1
    return 2.0 * (n1 * p["layer"] + (p["squeeze"] + n2 * p["layer"] + p["enc_head"]) / k)


def _ae_decoder_flops(config: AutoencoderConfig) -> float:
    """Forward FLOPs per token of the decoder, including the tied output matrix."""
    p, k = _ae_parts(config), config.patch_size
    m1 = config.num_decoder_layers // 2
    m2 = config.num_decoder_layers - m1
    return 2.0 * ((p["latent_to_hidden"] + m1 * p["layer"] + p["expand"]) / k + m2 * p["layer"] + p["dec_norm"]
                  + p["embed"])


def _attention(config: LlamaConfig, positions: float) -> float:
    return 4.0 * config.num_hidden_layers * positions * config.hidden_size


def _calm_step_flops(config: CALMConfig, positions: float, head_samples: int) -> float:
    head = _head_parts(config)
    matmul = (_backbone_nonembedding(config) + _embed_proj(config) + head["per_position"]
              + head_samples * head["per_sample"])
    return 2.0 * matmul + _attention(config, positions)


def forward_flops_per_token(config: ConfigLike, stage: str, context: int = PAPER_CONTEXT) -> float:
    """One teacher-forced forward pass, per token (CALM: backbone + one head sample, no autoencoder)."""
    config = _as_config(config, stage)
    if stage == "baseline":
        out = config.vocab_size * config.hidden_size
        return 2.0 * (_backbone_nonembedding(config) + out) + _attention(config, context)
    if stage == "autoencoder":
        return _ae_encoder_flops(config) + _ae_decoder_flops(config)
    if stage == "calm":
        return _calm_step_flops(config, context, 1) / config.patch_size
    raise ValueError(f"unknown stage {stage!r}")


def train_flops_per_token(config: ConfigLike, stage: str, context: int = PAPER_CONTEXT) -> float:
    """Training FLOPs per token: 3x forward; CALM's head runs num_samples times, its frozen encoder 1x."""
    config = _as_config(config, stage)
    if stage != "calm":
        return 3.0 * forward_flops_per_token(config, stage, context)
    step = _calm_step_flops(config, context, config.num_samples)
    return 3.0 * step / config.patch_size + _ae_encoder_flops(calm_ae_config(config))


def inference_flops_per_token(config: ConfigLike, stage: str, context: int = PAPER_CONTEXT) -> float:
    """FLOPs per generated token (CALM: backbone + one head sample per K tokens + the AE decoder per token)."""
    config = _as_config(config, stage)
    if stage == "calm":
        return forward_flops_per_token(config, stage, context) + _ae_decoder_flops(calm_ae_config(config))
    return forward_flops_per_token(config, stage, context)
