"""The energy loss: matches the formula, is proper in practice, and has finite gradients."""

import itertools

import pytest
import torch

from pretrain.models import energy_loss


def test_matches_the_formula_on_a_small_case():
    gen = torch.Generator().manual_seed(0)
    n, m, beta = 3, 5, 1.3
    x = torch.randn(n, 2, 4, generator=gen)
    mu, log_sigma = torch.randn(2, 4, generator=gen), torch.randn(2, 4, generator=gen) * 0.3
    loss = energy_loss(x, mu, log_sigma, num_target_samples=m, beta=beta, generator=torch.Generator().manual_seed(7))
    eps = torch.randn((m, 2, 4), generator=torch.Generator().manual_seed(7))
    y = mu + log_sigma.exp() * eps
    for p in range(2):
        cross = sum((x[i, p] - y[j, p]).norm() ** beta for i in range(n) for j in range(m)) * 2 / (n * m)
        within = sum((x[i, p] - x[k, p]).norm() ** beta for i, k in itertools.permutations(range(n), 2))
        torch.testing.assert_close(loss[p], cross - within / (n * (n - 1)))


@pytest.mark.parametrize("beta", [1.0, 1.5])
def test_samples_from_the_target_score_best(beta):
    # Fixed seed; many positions so that the expectation is resolved well beyond the gaps below.
    gen = torch.Generator().manual_seed(0)
    positions, latent, n = 2000, 16, 8
    mu = torch.randn(positions, latent, generator=gen)
    log_sigma = torch.randn(positions, latent, generator=gen) * 0.2 - 0.5
    sigma = log_sigma.exp()

    def score(samples):
        return energy_loss(samples, mu, log_sigma, 100, beta, generator=torch.Generator().manual_seed(1)).mean()

    noise = torch.randn(n, positions, latent, generator=gen)
    true = score(mu + sigma * noise)
    candidates = {
        "shifted": score(mu + 0.3 * sigma + sigma * noise),
        "collapsed": score(mu.expand(n, -1, -1)),
        "overdispersed": score(mu + 1.5 * sigma * noise),
        "underdispersed": score(mu + 0.5 * sigma * noise),
    }
    for name, value in candidates.items():
        assert true < value - 0.01, (name, true.item(), value.item())


def test_gradients_are_finite_even_for_identical_samples():
    mu = torch.zeros(3, 4)
    x = torch.zeros(4, 3, 4, requires_grad=True)
    energy_loss(x, mu, torch.zeros(3, 4), beta=0.75).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_rejects_a_single_sample():
    with pytest.raises(ValueError, match="at least 2"):
        energy_loss(torch.zeros(1, 3, 4), torch.zeros(3, 4), torch.zeros(3, 4))
