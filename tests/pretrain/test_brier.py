"""BrierLM estimators against exact values on models whose n-gram distributions can be enumerated."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pretrain.brier.brier_stats import BrierAccumulator, brierlm
from pretrain.brier.brierlm import baseline_brier_batched, baseline_brier_reference, sample_inverse_cdf
from pretrain.brier.calm_brier import calm_brier_block
from pretrain.models.argmax_decode import ArgmaxDecoder

VOCAB = 6


@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).double().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(25.0)  # peaked distributions: samples agree often, branches get exercised
    return model


@torch.no_grad()
def exact_baseline(model, ids: torch.Tensor, length: int) -> torch.Tensor:
    """Exact Brier-1..4 per position p <= length-5 by enumerating every 3-token continuation."""
    conts = torch.tensor(list(itertools.product(range(VOCAB), repeat=3)))
    rows = []
    for p in range(length - 4):
        seqs = torch.cat([ids[: p + 1].expand(len(conts), -1), conts], dim=1)
        probs = model(seqs).logits[:, p:].softmax(-1)  # (V^3, 4, V)
        true = model(ids[None, : p + 5]).logits[0, p : p + 4].softmax(-1)
        acc = torch.cumprod(true[torch.arange(4), ids[p + 1 : p + 5]], 0)
        coll, weight = [], torch.ones(len(conts), dtype=torch.float64)
        for n in range(4):
            # each (n-1)-prefix occurs V^(4-n) times among the V^3 continuations
            coll.append((weight * probs[:, n].square().sum(-1)).sum() / VOCAB ** (3 - n))
            if n < 3:
                weight = weight * probs[torch.arange(len(conts)), n, conts[:, n]].square()
        rows.append(2 * acc - torch.stack(coll))
    return torch.stack(rows)


def _replicated(ids, lengths, reps):
    return ids.repeat(reps, 1), lengths.repeat(reps)


def test_batched_equals_reference_on_same_draws(tiny_lm):
    ids = torch.randint(0, VOCAB, (3, 14), generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([14, 9, 5])
    a = baseline_brier_batched(tiny_lm, ids, lengths, torch.Generator().manual_seed(7), max_queries=4)
    b = baseline_brier_reference(tiny_lm, ids, lengths, torch.Generator().manual_seed(7))
    assert a.estimates.shape == (10 + 5 + 1, 4)
    assert torch.allclose(a.estimates, b.estimates, atol=1e-10)
    assert a.forward_calls <= 1 + 3 * 4  # per batch, not per position
    assert b.forward_calls > a.forward_calls


def test_batched_mean_matches_exact(tiny_lm):
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    lengths = torch.tensor([10, 8])
    exact = torch.cat([exact_baseline(tiny_lm, ids[b], int(lengths[b])) for b in range(2)])
    reps = 400
    rep_ids, rep_len = _replicated(ids, lengths, reps)
    est = baseline_brier_batched(tiny_lm, rep_ids, rep_len, torch.Generator().manual_seed(11)).estimates
    est = est.view(reps, -1, 4)
    mean, se = est.mean(0), est.std(0) / math.sqrt(reps)
    # the sampled collision terms are exercised (not all zero variance) ...
    assert (se[:, 1:] > 0).any()
    # ... Brier-1 is exact, the rest within a few standard errors of the enumerated truth
    assert torch.allclose(mean[:, 0], exact[:, 0], atol=1e-10)
    z = (mean - exact).abs() / se.clamp_min(1e-12)
    assert bool(((z < 4.5) | ((mean - exact).abs() < 1e-10)).all()), z


def test_stream_protocol_blocks_match_exact(tiny_lm):
    """The authors' protocol (documents concatenated, fixed blocks across them) is unbiased too."""
    from evaluation.documents import split_blocks, stream_blocks

    gen = torch.Generator().manual_seed(8)
    documents = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (7, 5, 9)]
    blocks = stream_blocks(documents, 8)
    stream = torch.tensor(sum(documents, []))  # 21 tokens: two blocks of 8, the last 5 dropped
    assert [b.numel() for b in blocks] == [8, 8] and torch.equal(torch.cat(blocks), stream[:16])
    assert [b.numel() for b in split_blocks(documents, 8)] == [7, 5, 8, 1]  # ours: never across documents
    ids = torch.stack(blocks[:2])
    exact = torch.cat([exact_baseline(tiny_lm, row, 8) for row in ids])
    reps = 400
    rep_ids, rep_len = _replicated(ids, torch.tensor([8, 8]), reps)
    est = baseline_brier_batched(tiny_lm, rep_ids, rep_len, torch.Generator().manual_seed(13)).estimates.view(reps, -1, 4)
    mean, se = est.mean(0), est.std(0) / math.sqrt(reps)
    assert torch.allclose(mean[:, 0], exact[:, 0], atol=1e-10)
    z = (mean - exact).abs() / se.clamp_min(1e-12)
    assert bool(((z < 4.5) | ((mean - exact).abs() < 1e-10)).all()), z


def test_reference_mean_matches_exact(tiny_lm):
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(9))
    exact = exact_baseline(tiny_lm, ids[0], 8)
    reps = 60
    est = baseline_brier_reference(tiny_lm, ids.repeat(reps, 1), None, torch.Generator().manual_seed(2)).estimates
    est = est.view(reps, -1, 4)
    mean, se = est.mean(0), est.std(0) / math.sqrt(reps)
    z = (mean - exact).abs() / se.clamp_min(1e-12)
    assert bool(((z < 4.5) | ((mean - exact).abs() < 1e-10)).all()), z


class MarkovChunks:
    """Synthetic CALM head: the next chunk depends only on the current one through a known table."""

    def __init__(self, k: int, seed: int, num_samples: int = 2) -> None:
        self.patch_size = k
        self.num_samples = num_samples
        self.gen = torch.Generator().manual_seed(seed)
        n = 2 ** k
        self.table = torch.distributions.Dirichlet(torch.full((n,), 0.3)).sample((n,)).double()
        self.table = (self.table + 1e-3) / (self.table + 1e-3).sum(-1, keepdim=True)
        self.bits = 2 ** torch.arange(k)

    def index(self, chunks: torch.Tensor) -> torch.Tensor:
        return (chunks * self.bits).sum(-1)

    def tokens(self, idx: torch.Tensor) -> torch.Tensor:
        return (idx[..., None] // self.bits) % 2

    def _draw(self, idx: torch.Tensor, num: int = 2) -> torch.Tensor:
        probs = self.table[idx.flatten()]
        draws = torch.multinomial(probs, num, replacement=True, generator=self.gen)
        return self.tokens(draws.view(*idx.shape, num))

    def teacher(self, input_ids):
        return self._draw(self.index(input_ids.view(input_ids.shape[0], -1, self.patch_size)), self.num_samples)

    def branch(self, chunks, position_ids, prefix_len, prev_cols):
        return self._draw(self.index(chunks)), torch.zeros_like(position_ids)

    def prob(self, c: int, seq: list[int]) -> float:
        k = self.patch_size
        if len(seq) <= k:
            return sum(float(self.table[c, j]) for j in range(2 ** k) if self.tokens(torch.tensor(j))[: len(seq)].tolist() == seq)
        nxt = int(self.index(torch.tensor(seq[:k])))
        return float(self.table[c, nxt]) * self.prob(nxt, seq[k:])

    def collision(self, c: int, m: int) -> float:
        return sum(self.prob(c, list(s)) ** 2 for s in itertools.product(range(2), repeat=m))


@pytest.mark.parametrize("k, num_samples", [(4, 2), (4, 8), (2, 2), (1, 2)])
def test_calm_estimator_matches_exact_markov_head(k, num_samples):
    torch.manual_seed(k)
    sampler = MarkovChunks(k, seed=k, num_samples=num_samples)
    steps = 7
    ids = torch.randint(0, 2, (2, steps * k), generator=torch.Generator().manual_seed(k))
    depth = math.ceil(4 / k)
    exact = []
    for b in range(2):
        chunks = ids[b].view(steps, k)
        for t in range(steps - depth):
            c = int(sampler.index(chunks[t]))
            y = ids[b, (t + 1) * k : (t + 1) * k + 4].tolist()
            exact.append([2 * sampler.prob(c, y[:n]) - sampler.collision(c, n) for n in range(1, 5)])
    exact = torch.tensor(exact, dtype=torch.float64)
    reps = 1500
    est = calm_brier_block(sampler, ids.repeat(reps, 1)).view(reps, -1, 4)
    assert est.shape[1] == exact.shape[0]
    mean, se = est.mean(0), est.std(0) / math.sqrt(reps)
    z = (mean - exact).abs() / se.clamp_min(1e-12)
    assert bool((z < 4.5).all()), z


def test_more_samples_per_position_lower_the_variance_not_the_mean():
    ids = torch.randint(0, 2, (4, 40), generator=torch.Generator().manual_seed(0))
    reps, est = 800, {}
    for num in (2, 8):
        torch.manual_seed(3)  # the same transition table (drawn from the global generator) for both
        est[num] = calm_brier_block(MarkovChunks(4, seed=num, num_samples=num), ids.repeat(reps, 1)).view(reps, -1, 4)
    mean = {n: e.mean(0) for n, e in est.items()}  # per position and n-gram
    var = {n: e.var(0) for n, e in est.items()}  # the estimator's own variance at each position
    z = (mean[2] - mean[8]).abs() / ((var[2] + var[8]) / reps).sqrt().clamp_min(1e-12)
    assert bool((z < 4.5).all()), z
    assert bool((var[8].mean(0) < 0.6 * var[2].mean(0)).all()), (var[8].mean(0), var[2].mean(0))


def test_more_than_two_samples_need_whole_ngrams_in_one_chunk():
    with pytest.raises(ValueError, match="need K >= 4"):
        calm_brier_block(MarkovChunks(2, 0, num_samples=4), torch.zeros(1, 8, dtype=torch.long))


def test_calm_block_rejects_lengths_not_multiple_of_k():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        calm_brier_block(MarkovChunks(2, 0), torch.zeros(1, 7, dtype=torch.long))


def test_accumulator_summary_and_floor():
    acc = BrierAccumulator()
    rows = torch.tensor([[0.5, 0.3, 0.2, 0.1], [0.3, 0.1, 0.0, 0.1]], dtype=torch.float64)
    acc.add(rows[:1])
    acc.add(rows[1:])
    out = acc.summary()
    assert out["positions"] == 2
    assert out["brier_n"] == pytest.approx([0.4, 0.2, 0.1, 0.1])
    assert out["brier_n_se"][0] == pytest.approx(0.1)
    assert out["brierlm"] == pytest.approx(100 * (0.4 * 0.2 * 0.1 * 0.1) ** 0.25)
    assert out["brierlm_se"] > 0
    assert brierlm([0.4, 0.2, -0.01, 0.1]) == 0.0
    with pytest.raises(ValueError, match="no positions"):
        BrierAccumulator().summary()


def test_inverse_cdf_sampling_follows_the_weights():
    gen = torch.Generator().manual_seed(4)
    weights = torch.rand(2, 600, generator=gen) * (torch.rand(2, 600, generator=gen) > 0.3)
    n = 20000
    u = ((torch.arange(n, dtype=torch.float64) + 0.5) / n).expand(2, n)  # a uniform grid: counts are exact
    ids = sample_inverse_cdf(weights * 7.0, u)
    for row in range(2):
        counts = torch.bincount(ids[row], minlength=600).double()
        expect = n * weights[row].double() / weights[row].double().sum()
        assert (counts - expect).abs().max() <= 1.0 + 1e-6
        assert counts[weights[row] == 0].sum() == 0


def test_calm_estimates_are_identical_with_the_certified_decoder():
    """The certified argmax decoder gives exactly the reference decode's tokens, so the same draws give
    the same estimates, only faster."""
    from pretrain.brier.calm_brier import CALMSampler, calm_brier
    from pretrain.stages import build_model

    torch.manual_seed(0)
    ae = dict(vocab_size=300, hidden_size=32, intermediate_size=64, latent_size=16, patch_size=4)
    calm = build_model("calm", dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=2, latent_size=16, patch_size=4,
                                    num_mlp_layers=1, ae_config=ae)).eval()
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(4))
    out = [calm_brier(CALMSampler(calm, torch.Generator().manual_seed(9), screened_decode=s), ids).estimates
           for s in (False, True)]
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("direct_vocab", [0, None])
def test_calm_estimates_are_identical_when_only_needed_tokens_are_decoded(direct_vocab):
    """With K >= 4 the certified path decodes a sample's later positions only while its prefix equals the
    truth's or the other sample's: a head that repeats a few latents (so collisions and hits are common,
    and prefixes part at every position) must still give the reference decode's estimates."""
    from pretrain.brier.calm_brier import CALMSampler, calm_brier
    from pretrain.stages import build_model

    torch.manual_seed(1)
    ae = dict(vocab_size=300, hidden_size=32, intermediate_size=64, latent_size=16, patch_size=4)
    calm = build_model("calm", dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=2, latent_size=16, patch_size=4,
                                    num_mlp_layers=1, ae_config=ae)).eval()
    # latents along a segment: neighbouring ones decode to chunks that share some positions and not others
    ends = torch.randn(2, 16) * 3
    line = ends[0] + torch.linspace(0, 1, 400)[:, None] * (ends[1] - ends[0])
    chunks = calm.decode_latents(line[:, None, :])
    change = torch.cat([torch.tensor([True]), (chunks[1:] != chunks[:-1]).any(-1)])
    codes = line[change][:6]
    real = calm.sample_latents

    def sample_latents(hidden, num_samples=1, generator=None):
        z = real(hidden, num_samples=num_samples, generator=generator)
        pick = torch.randint(0, len(codes), z.shape[:-1], generator=generator)
        return codes[pick]

    calm.sample_latents = sample_latents
    pick = torch.randint(0, len(codes), (2, 40), generator=torch.Generator().manual_seed(2))
    ids = calm.decode_latents(codes[pick][..., None, :]).view(2, 160)  # the head's chunks: samples hit the truth
    sampler = lambda s: CALMSampler(calm, torch.Generator().manual_seed(9), screened_decode=s)
    fast = sampler(True)
    fast.decoder = ArgmaxDecoder(calm, direct_vocab=direct_vocab)
    out = [calm_brier(s, ids).estimates for s in (sampler(False), fast)]
    assert torch.equal(out[0], out[1])
    assert bool((out[0][:, 3] != 0).any()) and bool((out[0][:, 0] != out[0][:, 3]).any())
