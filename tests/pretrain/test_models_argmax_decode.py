"""ArgmaxDecoder's exactness-relevant pieces in isolation: the float64 ranking of contenders that
replaces the full float32 projection on near-ties, and the prepacked bf16 screening product."""

import torch

from pretrain.models.argmax_decode import ArgmaxDecoder
from pretrain.stages import build_model

K, V, D = 4, 300, 64


def tiny_model(seed=0):
    torch.manual_seed(seed)
    ae = dict(vocab_size=V, hidden_size=D, intermediate_size=128, latent_size=8, patch_size=K)
    return build_model("calm", dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=4, latent_size=8, patch_size=K,
                                    num_mlp_layers=1, ae_config=ae), device="cpu").eval()


def test_contenders_within_float32_rounding_are_left_to_the_full_projection():
    model = tiny_model()
    decoder = ArgmaxDecoder(model)
    emb = model.ae_model.encoder.embed_tokens.weight
    h = torch.randn(1, D)
    with torch.no_grad():
        # token 9 is token 7 with one coordinate moved by one float32 ulp towards h: truly larger by far
        # less than float32 rounding, so float32 logits tie and argmax takes token 7 (the first)
        i = h[0].abs().argmax()
        emb[9] = emb[7]
        emb[9, i] = torch.nextafter(emb[7, i], torch.tensor(torch.inf) * h[0, i].sign())
        emb[11] = h[0] / h[0].norm() * 3  # far ahead of everyone
    exact64 = h.double() @ emb.double().T
    assert exact64[0, 9] > exact64[0, 7]
    assert (h @ emb[[7, 9]].T).argmax(1).item() == 0  # the trap: float64 and float32 disagree
    assert decoder._rank_contenders(h, torch.tensor([[7, 9]])).item() == -1
    assert decoder._rank_contenders(h, torch.tensor([[7, 9, 11]])).item() == 11
    decoder.fp32_dot = 0.0  # without the rounding slack the float64 winner would be taken: wrong
    assert decoder._rank_contenders(h, torch.tensor([[7, 9]])).item() == 9


def test_near_tied_screens_match_float32_decoding():
    model = tiny_model(seed=1)
    with torch.no_grad():  # pairs of near-duplicate tokens: ties at every scale down to float32 rounding
        emb = model.ae_model.encoder.embed_tokens.weight
        emb[V // 2:] = emb[: V // 2] * (1 + torch.logspace(-9, -3, V // 2)[:, None])
    decoder = ArgmaxDecoder(model, shortlist=2, direct_vocab=0)
    latents = torch.randn(256, 2, 8) * 3
    assert torch.equal(decoder(latents), model.decode_latents(latents))
    assert decoder.fallbacks > decoder.full_projections > 0  # both the contest and the full projection ran


def test_prepacked_screen_equals_plain_bf16_product():
    decoder = ArgmaxDecoder(tiny_model())
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert decoder.packed is not None  # the fast path is the one under test here
    for m in (1, 7, 40):
        h = torch.randn(m, D).to(torch.bfloat16)
        assert torch.equal(decoder._bf16_logits(h), h @ decoder.low.T)


def test_small_vocabularies_decode_directly_and_pairs_position_by_position():
    from pretrain.models.argmax_decode import StreamMemory
    from pretrain.models.sampling import first_equal_pair

    model = tiny_model(seed=2)
    decoder = ArgmaxDecoder(model)  # V = 300: below DIRECT_VOCAB
    assert decoder.direct and decoder.split
    # pairs: identical, nearly identical and unrelated draws, so pairs end at every position or never
    rows, pairs = 6, 40
    base = torch.randn(rows, pairs, 8) * 3
    scale = torch.tensor([0.0, 1e-3, 0.3] + [3.0] * 17)[torch.randint(0, 20, (rows, pairs))]
    latents = torch.stack([base, base + scale[..., None] * torch.randn(rows, pairs, 8)], 2).view(rows, 2 * pairs, 8)
    decoded = model.decode_latents(latents).view(rows, 2 * pairs, K)
    assert torch.equal(decoder.decode_draws(latents), decoded)
    want = first_equal_pair(decoded.view(rows, pairs, 2, K))
    got = decoder.decode_pairs(latents, StreamMemory(decoder, rows), torch.arange(rows))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert len(set(want[0].tolist())) > 2


def test_sliced_screen_equals_one_pass():
    model = tiny_model(seed=3)
    whole, sliced = ArgmaxDecoder(model, direct_vocab=0), ArgmaxDecoder(model, direct_vocab=0)
    whole.screen_rows, sliced.screen_rows = 10 ** 6, 7
    h = torch.randn(50, D) * 3
    for a, b in zip(whole._screen(h), sliced._screen(h)):
        assert torch.equal(a, b)
    assert torch.equal(sliced.tokens_from_hidden(h), (h @ model.ae_model.encoder.embed_tokens.weight.T).argmax(1))


def test_distinct_decoding_keeps_duplicate_counts_and_finishes_chosen_draws():
    from pretrain.models.sampling import duplicate_counts, first_equal_pair

    model = tiny_model(seed=4)
    decoder = ArgmaxDecoder(model)
    # few centres with exact repeats and near neighbours: duplicates, shared prefixes, unique draws
    rows, draws = 5, 60
    centres = torch.randn(rows, 4, 8) * 3
    pick = torch.randint(0, 4, (rows, draws))
    scale = torch.tensor([0.0, 0.0, 0.05, 3.0])[torch.randint(0, 4, (rows, draws))]
    latents = centres.gather(1, pick[..., None].expand(-1, -1, 8)) + scale[..., None] * torch.randn(rows, draws, 8)
    full = model.decode_latents(latents).view(rows, draws, K)
    for dec in (decoder, ArgmaxDecoder(model, direct_vocab=0)):
        chunks, finish = dec.decode_distinct(latents)
        valid = torch.ones(rows, draws, dtype=torch.bool)
        assert torch.equal(duplicate_counts(chunks, valid), duplicate_counts(full, valid))
        pairs = [first_equal_pair(c.view(rows, -1, 2, K)) for c in (chunks, full)]
        assert all(torch.equal(got, want) for got, want in zip(*pairs))
        row, draw = torch.arange(rows).repeat_interleave(draws), torch.arange(draws).repeat(rows)
        assert torch.equal(finish(row, draw), full[row, draw])
    assert (chunks >= 0).all()  # the certified decoder decodes everything
    chunks, _ = decoder.decode_distinct(latents)
    assert (chunks < 0).any() and (chunks[:, :, 1:] >= 0).any()  # some tails skipped, some prefixes followed
