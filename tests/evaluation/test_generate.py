"""Generation mechanics on tiny random CALMs: K tokens per backbone pass, an uncorrupted context for
prompts of any length, per-row EOS, and the CLI for both model kinds."""

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from evaluation.baseline_generation import baseline_generate
from evaluation.generate import main
from pretrain.models.generation import calm_generate
from pretrain.stages import build_model

K, V, EOS, PAD = 4, 64, 1, 0


def tiny_calm(seed=0, spread=True):
    torch.manual_seed(seed)
    ae = dict(vocab_size=V, hidden_size=32, intermediate_size=64, latent_size=8, patch_size=K)
    model = build_model("calm", dict(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, latent_size=8, patch_size=K, num_mlp_layers=1, ae_config=ae,
        eos_token_id=EOS, pad_token_id=PAD), device="cpu").eval()
    if spread:  # the head's last layer starts at zero (one constant latent); give it some spread
        torch.nn.init.normal_(model.mlp_generator.final_layer.linears[2].weight, std=0.5)
    return model


def force_chunk(model, tokens):
    """Make the autoencoder decode every latent to `tokens`, whatever the head draws."""
    decoder = model.ae_model.decoder
    emb = model.ae_model.encoder.embed_tokens.weight
    with torch.no_grad():
        decoder.expand_layer.weight.zero_()
        decoder.expand_layer.bias.copy_(torch.cat([emb[t] * 10 for t in tokens]))
        for layer in decoder.decoder_layers[decoder.n_first:]:
            layer.mlp.down_proj.weight.zero_()
    assert model.decode_latents(torch.randn(3, 2, 8)).tolist() == [tokens * 2] * 3


class ContextSpy:
    """Records every chunk of token ids the backbone reads, per row."""

    def __init__(self, model):
        self.calls = []
        original = model.chunk_embeddings

        def spy(ids):
            self.calls.append(ids.clone())
            return original(ids)

        model.chunk_embeddings = spy

    def context(self, row, prefill_chunks):
        ids = torch.cat([c[row] for c in self.calls])
        return ids[(self.calls[0].shape[1] // K - prefill_chunks) * K:].tolist()


@pytest.mark.parametrize("sampler,temperature", [("exact", 1.0), ("exact", 0.5), ("batch", 0.5)])
def test_k_tokens_per_backbone_pass_and_exact_context(sampler, temperature):
    model = tiny_calm()
    spy = ContextSpy(model)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22, 23, 24, 25, 26]]  # 2 chunks; 1 chunk + 3 leftover
    out = calm_generate(model, prompts, max_new_tokens=16, temperature=temperature, sampler=sampler,
                        eos_token_id=None, pad_token_id=PAD, seed=3, num_candidates=32, max_draws=200)
    assert out.lengths.tolist() == [16, 16]
    # row 0: 16 tokens in 4 chunks; row 1: the first chunk completes its prompt (1 new token), then 4 more
    assert out.steps == 5
    assert out.backbone_calls == out.steps  # the prefill, then one pass per sampled chunk but the last
    assert len(spy.calls) == out.backbone_calls
    # what the backbone read is exactly prompt + generated tokens: no padding inside any real chunk
    gen = out.sequences.tolist()
    assert spy.context(0, 2) == prompts[0] + gen[0][:16]
    assert spy.context(1, 1) == prompts[1] + gen[1][:13]
    assert (spy.calls[0][1, :K] == EOS).all(), "row 1's missing chunk is masked padding (filled with EOS)"


def test_prompt_shorter_than_k_is_preceded_by_document_separator():
    model = tiny_calm()
    spy = ContextSpy(model)
    out = calm_generate(model, [[7, 8]], max_new_tokens=4, temperature=1.0, eos_token_id=EOS, seed=0)
    assert spy.calls[0].tolist() == [[EOS, EOS, 7, 8]]
    assert out.steps == 1 and out.sequences.shape == (1, 4)


@pytest.mark.parametrize("sampler", ["exact", "batch"])
def test_eos_stops_each_row_and_pads_after(sampler):
    model = tiny_calm()
    force_chunk(model, [5, 6, EOS, 7])
    prompts = [[10, 11, 12, 13, 14, 15, 16, 17], [20, 21, 22, 23, 24, 25, 26]]
    out = calm_generate(model, prompts, max_new_tokens=12, temperature=0.5, sampler=sampler, eos_token_id=EOS,
                        pad_token_id=PAD, seed=0, num_candidates=8, max_draws=16)
    # row 0 stops inside its first chunk; row 1's first chunk can never start with [24, 25, 26], so
    # that chunk is the capped fallback with the prompt's leftover tokens kept, and it stops one chunk later
    assert out.lengths.tolist() == [3, 4]
    assert out.sequences[0].tolist() == [5, 6, EOS] + [PAD] * 9
    assert out.sequences[1].tolist() == [7, 5, 6, EOS] + [PAD] * 8
    assert out.steps == 2
    if sampler == "exact":
        assert out.capped == 1


def test_max_new_tokens_cuts_inside_a_chunk():
    model = tiny_calm()
    force_chunk(model, [5, 6, 7, 8])
    out = calm_generate(model, [[10, 11, 12, 13]], max_new_tokens=6, temperature=1.0, eos_token_id=EOS, seed=0)
    assert out.sequences.tolist() == [[5, 6, 7, 8, 5, 6]]
    assert out.steps == 2 and out.backbone_calls == 2


def test_bad_arguments_are_rejected():
    model = tiny_calm()
    with pytest.raises(ValueError, match="temperature"):
        calm_generate(model, [[1, 2, 3, 4]], 4, temperature=1.5)
    with pytest.raises(ValueError, match="sampler"):
        calm_generate(model, [[1, 2, 3, 4]], 4, sampler="greedy")


def test_same_seed_same_text():
    model = tiny_calm()
    runs = [calm_generate(model, [[5, 6, 7, 8, 9]], 12, 0.5, seed=7, eos_token_id=None,
                          max_draws=50).sequences for _ in range(2)]
    assert torch.equal(*runs)


def tiny_tokenizer(path):
    vocab = {"<pad>": PAD, "<eos>": EOS, **{f"w{i}": i for i in range(2, V)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="w2")
    fast.save_pretrained(path)


def test_cli_generates_from_exported_calm_and_baseline(tmp_path, capsys):
    calm_dir, base_dir = tmp_path / "calm", tmp_path / "baseline"
    tiny_calm().save_pretrained(calm_dir)
    tiny_tokenizer(calm_dir)
    torch.manual_seed(0)
    baseline = build_model("baseline", dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=4), device="cpu")
    baseline.save_pretrained(base_dir)
    tiny_tokenizer(base_dir / "tokenizer")  # tokenizer in DIR/tokenizer is found too

    assert main(["--model", str(calm_dir), "--prompt", "w5 w6 w7", "--max-new-tokens", "8", "--temperature", "0.5"]) == 0
    captured = capsys.readouterr()
    streamed = captured.out.splitlines()[-1].split()
    assert streamed[:3] == ["w5", "w6", "w7"] and len(streamed) == 3 + 8
    assert "[calm]" in captured.err and "backbone passes" in captured.err

    assert main(["--model", str(base_dir), "--prompt", "w5 w6", "--prompt", "w9", "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("-" * 40) == 2
    texts = [line.split() for line in captured.out.splitlines() if line.startswith("w")]
    assert [t[:len(p)] for t, p in zip(texts, (["w5", "w6"], ["w9"]))] == [["w5", "w6"], ["w9"]]
    assert len(texts[0]) <= 2 + 5 and len(texts[1]) <= 1 + 5
    assert "[baseline]" in captured.err

    # Refused with one line, before any sampling: a CALM temperature above 1, a prompt past the positions.
    assert main(["--model", str(calm_dir), "--prompt", "w5", "--temperature", "2"]) == 2
    assert "temperatures in (0, 1]" in capsys.readouterr().err
    positions = json.loads((calm_dir / "config.json").read_text())["max_position_embeddings"]
    long_prompt = " ".join(["w5"] * (4 * positions))
    for model_dir in (calm_dir, base_dir):
        assert main(["--model", str(model_dir), "--prompt", long_prompt, "--max-new-tokens", "4"]) == 2
        err = capsys.readouterr().err
        assert "positions" in err and "Traceback" not in err, err[-500:]


def test_baseline_generate_counts_one_pass_per_token():
    torch.manual_seed(0)
    model = build_model("baseline", dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4), device="cpu").eval()
    out = baseline_generate(model, [[5, 6, 7], [8]], max_new_tokens=6, temperature=0.5, eos_token_id=None,
                            pad_token_id=PAD, seed=0)
    assert out.sequences.shape == (2, 6) and out.lengths.tolist() == [6, 6]
    assert out.backbone_calls == 6


def test_cli_rejects_a_directory_without_config(tmp_path, capsys):
    assert main(["--model", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "config.json not found" in err[-1] and "Traceback" not in "".join(err)


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--temperature", "-1"], "--temperature must be > 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--max-draws", "0"], "--max-draws must be >= 1"),
])
def test_cli_refuses_bad_flags_before_loading(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path), "--prompt", "x", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("shortlist", [1, 16])
def test_screened_argmax_decoder_matches_float32_decoding(shortlist):
    from pretrain.models.argmax_decode import ArgmaxDecoder

    torch.manual_seed(1)
    ae = dict(vocab_size=3000, hidden_size=64, intermediate_size=128, latent_size=8, patch_size=K)
    model = build_model("calm", dict(vocab_size=3000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=4, latent_size=8, patch_size=K,
                                     num_mlp_layers=1, ae_config=ae), device="cpu").eval()
    decoder = ArgmaxDecoder(model, shortlist=shortlist)
    latents = torch.randn(64, 3, 8) * 3
    assert torch.equal(decoder(latents), model.decode_latents(latents))
    # a shortlist of 1 can rarely be certified: rescoring the screen's contenders must then carry the
    # result; with 16 it is left to the rare near-ties (this draw has one top-2 gap within the float32
    # rounding bound, which the float64 rescoring settles)
    assert decoder.fallbacks > 100 if shortlist == 1 else decoder.fallbacks <= 2
    assert decoder.full_projections == 0
    decoder.max_contenders = 1  # no contest: every unsettled position takes the full projection
    assert torch.equal(decoder(latents), model.decode_latents(latents))
    assert decoder.full_projections > 100 if shortlist == 1 else decoder.full_projections <= 4


def test_draws_certified_against_references_match_float32_decoding():
    from pretrain.models.argmax_decode import ArgmaxDecoder, StreamMemory

    torch.manual_seed(2)
    ae = dict(vocab_size=3000, hidden_size=64, intermediate_size=128, latent_size=8, patch_size=K)
    model = build_model("calm", dict(vocab_size=3000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=4, latent_size=8, patch_size=K,
                                     num_mlp_layers=1, ae_config=ae), device="cpu").eval()
    # draws cluster around a few latents per row (repeats, tiny and large perturbations), as a peaked
    # head's do, so certificates succeed, fail and fall back to further references and the screen
    rows, draws = 6, 24
    centres = torch.randn(rows, 3, 8) * 3
    pick = torch.randint(0, 3, (rows, draws))
    scale = torch.tensor([0.0, 1e-3, 0.3])[torch.randint(0, 3, (rows, draws))]
    latents = centres.gather(1, pick[..., None].expand(-1, -1, 8)) + scale[..., None] * torch.randn(rows, draws, 8)
    expected = model.decode_latents(latents).view(rows, draws, K)
    decoder = ArgmaxDecoder(model, min_certifiable=0)
    assert torch.equal(decoder.decode_draws(latents), expected)
    assert decoder.projected < rows * draws * K  # most draws skipped the full-vocabulary pass
    # a memory carries each stream's first reference into the next call (rows given in any order)
    memory_decoder = ArgmaxDecoder(model, max_references=0)
    memory = StreamMemory(memory_decoder, rows)
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    first = memory_decoder.decode_draws(latents[order, :4], memory, order)
    projected = memory_decoder.projected
    assert torch.equal(first, expected[order, :4])
    assert torch.equal(memory_decoder.decode_draws(latents[:, 4:], memory, torch.arange(rows)), expected[:, 4:])
    assert memory_decoder.projected - projected < rows * (draws - 4) * K
    screened_only = ArgmaxDecoder(model, max_references=0)
    assert torch.equal(screened_only.decode_draws(latents), expected)
    assert screened_only.projected == rows * draws * K


@pytest.mark.parametrize("direct_vocab", [0, None])
def test_generation_is_the_same_with_and_without_certified_decoding(monkeypatch, direct_vocab):
    from pretrain.models.argmax_decode import ArgmaxDecoder

    if direct_vocab is not None:  # V = 64 is decoded directly by default; 0 forces the certified path
        monkeypatch.setattr(ArgmaxDecoder, "DIRECT_VOCAB", direct_vocab)
    model = tiny_calm(seed=3)
    # 4 rows x K x 15 later draws per call reach ArgmaxDecoder's min_certifiable: references are used
    prompts = [[EOS, 5, 6, 7, 8, 9], [EOS, 11, 12, 13], [EOS, 20], [EOS, 30, 31, 32, 33]]
    outputs = [calm_generate(model, prompts, 24, temperature=0.5, seed=4, first_round=16, eos_token_id=None,
                             screened_decode=screened).sequences for screened in (True, False)]
    assert torch.equal(*outputs)


def test_pair_decoding_matches_float32_decoding_on_near_ties():
    from pretrain.models.argmax_decode import ArgmaxDecoder, StreamMemory
    from pretrain.models.sampling import first_equal_pair

    torch.manual_seed(5)
    ae = dict(vocab_size=3000, hidden_size=64, intermediate_size=128, latent_size=8, patch_size=K)
    model = build_model("calm", dict(vocab_size=3000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=4, latent_size=8, patch_size=K,
                                     num_mlp_layers=1, ae_config=ae), device="cpu").eval()
    with torch.no_grad():  # adversarial vocabulary: near-duplicate rows, so argmaxes tie below bf16 resolution
        emb = model.ae_model.encoder.embed_tokens.weight
        emb[1500:] = emb[:1500] * (1 + 1e-5 * torch.randn(1500, 1))
    # pairs of draws: identical, nearly identical (perturbations at and far below the ties' scale) and
    # unrelated, around a few centres per row, so every settling path (memory, screen, certificate) is taken
    rows, pairs = 8, 12
    centres = torch.randn(rows, 3, 8) * 3
    base = centres.gather(1, torch.randint(0, 3, (rows, pairs, 1)).expand(-1, -1, 8))
    scale = torch.tensor([0.0, 1e-7, 1e-4, 1e-2, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0])
    second = base + scale[torch.randint(0, 10, (rows, pairs))][..., None] * torch.randn(rows, pairs, 8)
    latents = torch.stack([base, second], dim=2).view(rows, 2 * pairs, 8)
    expected = first_equal_pair(model.decode_latents(latents).view(rows, pairs, 2, K))
    decoder = ArgmaxDecoder(model)
    memory = StreamMemory(decoder, rows)
    order = torch.tensor([3, 0, 5, 1, 4, 2, 7, 6])
    half = pairs  # two calls: the second starts from the references the first kept
    for part in (slice(0, half), slice(half, 2 * pairs)):
        want = first_equal_pair(model.decode_latents(latents[order, part]).view(rows, -1, 2, K))
        got = decoder.decode_pairs(latents[order, part], memory, order)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    got = ArgmaxDecoder(model).decode_pairs(latents, StreamMemory(decoder, rows), torch.arange(rows))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert len(set(expected[0].tolist())) > 2  # rows accept at different pairs: later pairs were reached
    assert decoder.full_projections > 0  # the near-duplicate rows defeat the screen somewhere
    assert decoder.projected < rows * 2 * pairs * K  # and pairs are settled without decoding every draw
