"""Evaluation in bf16 forms logits and decodes latents in float32 (bf16 logits tie and shift probabilities)."""

import torch

from pretrain.brier.brierlm import head_stats
from pretrain.stages import load_model


def test_bf16_head_stats_use_float32_logits():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False).to(torch.bfloat16)
    hidden = torch.randn(40, 16).to(torch.bfloat16)
    targets, uniforms = torch.randint(0, 300, (40,)), torch.rand(40, 2, dtype=torch.float64)
    wide = torch.nn.Linear(16, 300, bias=False)
    wide.weight.data = head.weight.data.float()
    got = head_stats(hidden, head, targets, uniforms)
    want = head_stats(hidden.float(), wide, targets, uniforms)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_calm_loaded_in_bf16_keeps_its_autoencoder_and_decoding_in_float32(tiny_runs):
    export = tiny_runs["calm"] / "export"
    low = load_model("calm", str(export), dtype=torch.bfloat16)
    full = load_model("calm", str(export))
    assert low.transformer.embed_tokens.weight.dtype == torch.bfloat16
    assert {p.dtype for p in low.ae_model.parameters()} == {torch.float32}
    latents = torch.randn(3, 5, low.config.latent_size)
    assert torch.equal(low.decode_latents(latents), full.decode_latents(latents))
