"""FLOPs and parameter accounting against models built on the meta device and the paper's Table 1."""

import pytest
import torch

from pretrain.config import load_config
from pretrain.models import AutoencoderConfig
from pretrain.models.flops import (
    calm_ae_config,
    forward_flops_per_token,
    inference_flops_per_token,
    param_count,
    train_flops_per_token,
)
from pretrain.stages import build_model, get_stage

# Inference FLOPs per generated token, Table 1 of the paper: attention at a 2048-position context.
TABLE1_INFERENCE = {
    "transformer-s": 4.4e8, "transformer-m": 7.9e8, "transformer-l": 15.0e8,
    "calm-m": 2.9e8, "calm-l": 4.6e8, "calm-xl": 9.4e8,
}
TINY_AE = dict(vocab_size=50, hidden_size=16, intermediate_size=24, latent_size=8, patch_size=2,
               num_encoder_layers=3, num_decoder_layers=1)


def _preset(name):
    config = load_config(name)
    return config.stage, get_stage(config.stage).build_config(config.model)


@pytest.mark.parametrize("preset", sorted(TABLE1_INFERENCE))
def test_inference_flops_match_table_1(preset):
    stage, config = _preset(preset)
    flops = inference_flops_per_token(config, stage)
    assert abs(flops / TABLE1_INFERENCE[preset] - 1) < 0.15, f"{preset}: {flops:.3g}"


@pytest.mark.parametrize("stage, kwargs", [
    ("autoencoder", TINY_AE),
    ("baseline", dict(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attention_bias=True)),
    ("baseline", dict(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=2, tie_word_embeddings=True)),
    ("calm", dict(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                  latent_size=8, patch_size=2, num_mlp_layers=3, noise_size=5, ae_config=TINY_AE)),
])
def test_param_formulas_match_built_models(stage, kwargs):
    with torch.device("meta"):
        model = build_model(stage, kwargs)
    # named_parameters() lists a tied matrix once, as the formula does.
    params = dict(model.named_parameters())
    own = sum(p.numel() for name, p in params.items() if not name.startswith("ae_model."))
    assert param_count(kwargs, stage) == own
    if stage == "calm":
        assert param_count(kwargs, stage, include_ae=True) == sum(p.numel() for p in params.values())


def test_paper_presets_param_formulas_match_meta_models():
    for name in ("transformer-m", "calm-m", "ae"):
        config = load_config(name)
        kwargs = dict(config.model)
        if config.stage == "calm":
            kwargs["ae_config"] = AutoencoderConfig().to_dict()
        with torch.device("meta"):
            model = build_model(config.stage, kwargs)
        own = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("ae_model."))
        assert param_count(get_stage(config.stage).build_config(config.model), config.stage) == own, name


def test_training_costs_three_forward_passes_and_calm_head_runs_n_times():
    stage, config = _preset("transformer-s")
    assert train_flops_per_token(config, stage, 2048) == pytest.approx(3 * forward_flops_per_token(config, stage, 2048))
    stage, calm = _preset("calm-m")
    more = get_stage("calm").build_config({**load_config("calm-m").model, "num_samples": 16})
    assert train_flops_per_token(more, "calm") > train_flops_per_token(calm, "calm")
    assert forward_flops_per_token(more, "calm") == forward_flops_per_token(calm, "calm")
    # Longer context costs more attention.
    assert inference_flops_per_token(calm, "calm", 4096) > inference_flops_per_token(calm, "calm", 2048)


def test_headline_compute_savings_of_calm_m_over_transformer_s():
    # Paper: 44% fewer training FLOPs and 34% fewer inference FLOPs (CALM at 2048 steps, baseline 2048 tokens).
    stage_s, small = _preset("transformer-s")
    stage_m, calm = _preset("calm-m")
    train_ratio = train_flops_per_token(calm, stage_m, 2048) / train_flops_per_token(small, stage_s, 2048)
    infer_ratio = inference_flops_per_token(calm, stage_m) / inference_flops_per_token(small, stage_s)
    assert train_ratio == pytest.approx(0.56, abs=0.05)
    assert infer_ratio == pytest.approx(0.66, abs=0.05)


def test_calm_config_naming_an_exported_autoencoder_counts_that_autoencoder(tmp_path):
    tiny = AutoencoderConfig(vocab_size=260, hidden_size=64, intermediate_size=128, latent_size=16, patch_size=4)
    tiny.save_pretrained(tmp_path)
    named = get_stage("calm").build_config(dict(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=4, latent_size=16, patch_size=4,
                                      num_mlp_layers=1), str(tmp_path))
    assert calm_ae_config(named).hidden_size == 64  # not the paper's 512-wide fallback
    in_memory = get_stage("calm").build_config(dict(named.to_dict(), ae_path=None, ae_config=tiny))
    assert train_flops_per_token(named, "calm", 64) == train_flops_per_token(in_memory, "calm", 64)
