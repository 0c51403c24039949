"""The discrete baseline: a plain transformers `LlamaForCausalLM` trained with cross-entropy (docs/method.md §4).

Only the config is ours: `baseline_config(**overrides)` gives the Llama-style defaults the paper's
baselines share (untied input/output embeddings, no biases, RMSNorm eps 1e-6, Llama 3 vocabulary).
"""

from __future__ import annotations

from transformers import LlamaConfig

BASELINE_DEFAULTS = {
    "vocab_size": 128256,
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}


def baseline_config(**overrides) -> LlamaConfig:
    """LlamaConfig with the baseline defaults (Transformer-S sizes), updated by `overrides`."""
    return LlamaConfig(**{**BASELINE_DEFAULTS, **overrides})
