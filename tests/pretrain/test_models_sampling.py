"""Statistical checks of the likelihood-free temperature samplers on a known categorical distribution."""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from pretrain.models.sampling import batch_sample, batch_select, exact_sample, split_temperature

P = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], dtype=torch.float64)
# distinct 3-token chunks; some share prefixes so prefix constraints have something to filter
CHUNKS = torch.tensor([[1, 2, 3], [1, 2, 4], [1, 5, 6], [7, 8, 9], [7, 8, 1], [2, 2, 2]])


def black_box(seed):
    gen = torch.Generator().manual_seed(seed)
    calls = []

    def sample_fn(rows, num):
        calls.append((len(rows), num))
        idx = torch.multinomial(P.float(), len(rows) * num, replacement=True, generator=gen)
        return CHUNKS[idx].view(len(rows), num, -1)

    return sample_fn, calls


def outcome_index(tokens):
    eq = (tokens[:, None, :] == CHUNKS[None]).all(-1)
    assert eq.any(-1).all(), "sampler returned a chunk the model never produced"
    return eq.float().argmax(-1)


def tempered(temperature, support=None):
    q = P ** (1.0 / temperature)
    if support is not None:
        q = q * support
    return (q / q.sum()).numpy()


def frequencies(tokens):
    return np.bincount(outcome_index(tokens).numpy(), minlength=len(P))


def test_split_temperature():
    assert split_temperature(1.0) == (1, 0.0)
    assert split_temperature(1 / 3) == (3, 0.0)
    n, alpha = split_temperature(0.7)
    assert n == 1 and alpha == pytest.approx(1 / 0.7 - 1)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="temperature"):
            split_temperature(bad)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 1 / 3, 0.7])
def test_exact_sampler_matches_tempered_distribution(temperature):
    rows = 20000
    sample_fn, calls = black_box(seed=11)
    result = exact_sample(sample_fn, rows, temperature, max_draws=10_000,
                          generator=torch.Generator().manual_seed(5))
    assert not result.capped.any()
    counts = frequencies(result.tokens)
    target = tempered(temperature)
    assert chisquare(counts, target * rows).pvalue > 1e-3
    if temperature < 1:
        # the test has power: the untempered distribution is clearly rejected
        assert chisquare(counts, tempered(1.0) * rows).pvalue < 1e-6
    # rows that finish stop drawing: later calls ask for fewer rows
    assert calls[-1][0] < rows or len(calls) == 1
    assert result.draws.min() >= split_temperature(temperature)[0]


def test_exact_sampler_at_half_is_exact_with_large_rounds():
    """A flat distribution (Σ p² ≈ 0.02) needs ~50 pairs per chunk, so rounds grow to `PAIR_ROUND`
    draws: batching them must not change the distribution (P² / Σ P²; the 2000 light chunks lumped)."""
    from pretrain.models.sampling import PAIR_ROUND

    rows, light = 6000, 2000
    probs = torch.cat([0.3 * P, torch.full((light,), 0.7 / light, dtype=torch.float64)])
    gen = torch.Generator().manual_seed(7)
    calls = []

    def sample_fn(rows_, num):
        calls.append(num)
        idx = torch.multinomial(probs.float(), len(rows_) * num, replacement=True, generator=gen)
        return torch.stack([idx // 100, idx % 100, idx % 7], -1).view(len(rows_), num, 3)

    result = exact_sample(sample_fn, rows, 0.5, max_draws=100_000, generator=gen)
    assert not result.capped.any() and max(calls) == PAIR_ROUND
    index = result.tokens[:, 0] * 100 + result.tokens[:, 1]
    counts = np.bincount(index.clamp(max=len(P)).numpy(), minlength=len(P) + 1)
    q = probs ** 2
    target = torch.cat([q[: len(P)], q[len(P):].sum()[None]]) / q.sum()
    assert chisquare(counts, target.numpy() * rows).pvalue > 1e-3
    untempered = torch.cat([probs[: len(P)], probs[len(P):].sum()[None]])
    assert chisquare(counts, untempered.numpy() * rows).pvalue < 1e-6  # the test has power


def test_exact_sampler_cap_is_reported():
    gen = torch.Generator().manual_seed(0)

    def sample_fn(rows, num):  # 10^4 equally likely chunks: n identical draws almost never happen
        return torch.randint(0, 10, (len(rows), num, 4), generator=gen)

    result = exact_sample(sample_fn, 8, 0.25, max_draws=20, generator=gen)
    assert result.capped.all()
    assert (result.draws == 20).all()
    assert result.tokens.shape == (8, 4)

    def distinct(rows, num):  # never two equal draws: T = 1/2 (pair rounds) can only stop at the cap
        return torch.arange(len(rows) * num * 4).view(len(rows), num, 4)

    for cap in (20, 21):
        result = exact_sample(distinct, 8, 0.5, max_draws=cap, generator=gen)
        assert result.capped.all() and (result.draws == cap - cap % 2).all()  # whole pairs only
        assert result.tokens.shape == (8, 4)


def test_exact_sampler_prefix_constraint_samples_conditional():
    rows = 12000
    sample_fn, _ = black_box(seed=3)
    prefix = torch.tensor([[1, 2, 0]]).expand(rows, 3)
    prefix_len = torch.full((rows,), 2)
    result = exact_sample(sample_fn, rows, 0.5, generator=torch.Generator().manual_seed(1),
                          prefix=prefix, prefix_len=prefix_len)
    assert result.matched.all()
    support = torch.tensor([1, 1, 0, 0, 0, 0], dtype=torch.float64)
    counts = frequencies(result.tokens)
    assert counts[2:].sum() == 0
    assert chisquare(counts[:2], tempered(0.5, support)[:2] * rows).pvalue > 1e-3


def total_variation(counts, target):
    return 0.5 * np.abs(counts / counts.sum() - target).sum()


@pytest.mark.parametrize("temperature", [0.5, 1 / 3, 0.7])
def test_batch_sampler_converges_with_more_candidates(temperature):
    rows = 10000
    target = tempered(temperature)
    distances = []
    for num in (4, 32, 256):
        sample_fn, calls = black_box(seed=num)
        result = batch_sample(sample_fn, rows, temperature, num_candidates=num,
                              generator=torch.Generator().manual_seed(2))
        assert calls == [(rows, num)]
        distances.append(total_variation(frequencies(result.tokens), target))
    assert distances[0] > distances[1] > distances[2]
    assert distances[0] > 0.05 and distances[2] < 0.02


def test_batch_select_weights_and_fallback():
    # row 0: value A seen 3 times, B twice, C once; at n = 2 weights are C(3,2)=3 : C(2,2)=1 : 0
    a, b, c = [1, 1], [2, 2], [3, 3]
    row0 = torch.tensor([a, b, a, c, b, a])
    # row 1: all distinct -> falls back to level 1 (uniform)
    row1 = torch.tensor([[i, i] for i in range(6)])
    chunks = torch.stack([row0, row1]).repeat(4000, 1, 1)
    index, level = batch_select(chunks, 0.5, generator=torch.Generator().manual_seed(0))
    assert (level[0::2] == 2).all() and (level[1::2] == 1).all()
    chosen = chunks[torch.arange(len(index)), index][0::2, 0]
    frac_a = (chosen == 1).float().mean().item()
    assert frac_a == pytest.approx(0.75, abs=0.02)
    assert not (chosen == 3).any()
    picks_row1 = np.bincount(index[1::2].numpy(), minlength=6)
    assert chisquare(picks_row1).pvalue > 1e-3


def test_batch_select_invalid_candidates_are_never_chosen():
    chunks = torch.tensor([[[1], [1], [1], [2]]]).repeat(500, 1, 1)
    valid = torch.tensor([[False, False, False, True]]).repeat(500, 1)
    index, _ = batch_select(chunks, 0.5, valid, generator=torch.Generator().manual_seed(0))
    assert (index == 3).all()


def test_capped_rows_choose_the_same_with_partially_decoded_draws():
    """`distinct_fn` (duplicate counts without decoding unshared tails) changes no capped choice."""
    from pretrain.models.sampling import duplicate_counts

    def run(partial):
        gen = torch.Generator().manual_seed(3)

        def sample_fn(rows, num):  # 400 chunks sharing prefixes: pairs rarely equal, duplicates common
            idx = torch.randint(0, 400, (len(rows), num), generator=gen)
            return torch.stack([idx // 100, idx // 10 % 10, idx % 10], -1)

        def distinct_fn(rows, num):
            full = sample_fn(rows, num)
            shared = duplicate_counts(full[..., :1], torch.ones(full.shape[:2], dtype=torch.bool)) > 1
            unique = -1 - torch.arange(num).view(1, num, 1).expand_as(full)
            tail = torch.where(shared[..., None], full, unique)  # unshared first token: tail left undecoded
            return torch.cat([full[..., :1], tail[..., 1:]], -1), lambda row, draw: full[row, draw]

        return exact_sample(sample_fn, 12, 0.5, max_draws=60, generator=gen,
                            distinct_fn=distinct_fn if partial else None)

    plain, partial = run(False), run(True)
    assert plain.capped.any() and torch.equal(plain.capped, partial.capped)
    assert torch.equal(plain.tokens, partial.tokens)
