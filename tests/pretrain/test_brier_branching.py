"""Branching off a teacher-forced cache gives what a fresh forward over each branch's own sequence gives."""

import torch
from transformers import DynamicCache

from pretrain.brier.branching import BranchCache, branch_forward, compact
from pretrain.brier.calm_brier import CALMSampler, calm_brier
from pretrain.stages import build_model


def tiny_calm(k):
    torch.manual_seed(0)
    ae = dict(vocab_size=40, hidden_size=16, intermediate_size=32, latent_size=4, patch_size=k)
    model = build_model("calm", dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, latent_size=4, patch_size=k,
                                     num_mlp_layers=1, ae_config=ae), device="cpu").double().eval()
    torch.nn.init.normal_(model.mlp_generator.final_layer.linears[2].weight, std=0.5)
    return model


def test_compact_moves_kept_entries_first():
    keep = torch.tensor([[False, True, False, True], [True, False, False, False]])
    vals = torch.arange(8).view(2, 4)
    valid, (out,) = compact(keep, vals)
    assert valid.tolist() == [[True, True], [True, False]]
    assert out[0].tolist() == [1, 3] and out[1, 0] == 4


@torch.no_grad()
def test_two_branch_steps_match_fresh_forward():
    model = tiny_calm(4).transformer
    gen = torch.Generator().manual_seed(1)
    embeds = torch.randn(2, 7, 32, generator=gen, dtype=torch.float64)
    cache = DynamicCache(config=model.config)
    model(inputs_embeds=embeds, past_key_values=cache, use_cache=True)
    cache = BranchCache(cache)
    pos = torch.tensor([[0, 3, 5], [6, 2, 2]])
    e1 = torch.randn(2, 3, 32, generator=gen, dtype=torch.float64)
    h1, cols1 = branch_forward(model, cache, e1, pos + 1, pos + 1, torch.zeros(2, 3, 0, dtype=torch.long), max_queries=2)
    e2 = torch.randn(2, 3, 32, generator=gen, dtype=torch.float64)
    h2, _ = branch_forward(model, cache, e2, pos + 2, pos + 1, cols1[..., None])
    for b in range(2):
        for i in range(3):
            p = int(pos[b, i])
            seq = torch.cat([embeds[b, : p + 1], e1[b, i : i + 1], e2[b, i : i + 1]])[None]
            fresh = model(inputs_embeds=seq).last_hidden_state[0]
            assert torch.allclose(h1[b, i], fresh[-2], atol=1e-10)
            assert torch.allclose(h2[b, i], fresh[-1], atol=1e-10)


@torch.no_grad()
def test_calm_sampler_branches_from_the_true_prefix():
    """K=2 needs one continuation step; the head must see the state after prefix + fed chunk."""
    model = tiny_calm(2)
    seen = []
    original = model.sample_latents

    def spy(hidden, num_samples=1, generator=None):
        seen.append(hidden.clone())
        return original(hidden, num_samples, generator)

    model.sample_latents = spy
    sampler = CALMSampler(model, torch.Generator().manual_seed(0))
    # a collapsed decoder makes both samples agree everywhere, so every position branches
    with torch.no_grad():
        model.ae_model.decoder.expand_layer.weight.zero_()
    ids = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(2))
    out = calm_brier(sampler, ids, torch.tensor([16, 12]))
    assert out.estimates.shape == (6 + 4, 4) and out.forward_calls == 2
    assert len(seen) == 2
    fed = model.decode_latents(original(seen[0], 2)[:, :, :, None])[0]  # same chunk for every draw
    for b, n_valid in ((0, 6), (1, 4)):
        for i in range(n_valid):
            seq = torch.cat([ids[b, : 2 * (i + 1)], fed[b, i]])[None]
            fresh, _ = model.backbone(model.chunk_embeddings(seq), use_cache=False)
            assert torch.allclose(seen[1][b, i], fresh[0, -1], atol=1e-10)
