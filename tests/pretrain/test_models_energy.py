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


def test_small_head_learns_from_the_hidden_state_quickly():
    """The head as CALM initialises it, at the tiny preset's width, must start using the hidden state
    within 100 steps. (With the backbone's N(0, 0.02) init a 128-wide head stayed near the marginal
    distribution — loss/marginal 0.94 here — and in CALM training learned only the marginal.)"""
    from pretrain.models.autoencoder import AutoencoderConfig
    from pretrain.models.calm import CALM, CALMConfig

    torch.manual_seed(0)
    ae = AutoencoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_encoder_layers=1,
                           num_decoder_layers=1, latent_size=64, patch_size=4)
    head = CALM(CALMConfig(vocab_size=64, hidden_size=128, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, latent_size=64, num_mlp_layers=1,
                           ae_config=ae.to_dict())).mlp_generator
    hidden = torch.randn(256, 128)
    mu = hidden @ (torch.randn(128, 64) / 128 ** 0.5)  # targets that depend on the hidden state
    log_sigma = torch.full_like(mu, -2.0)
    # the score of a perfect *unconditional* sampler: samples are other positions' targets
    marginal = energy_loss(torch.stack([mu[torch.randperm(256)] for _ in range(8)]), mu, log_sigma).mean()
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(100):
        loss = energy_loss(head(hidden, num_samples=8), mu, log_sigma).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * marginal.item(), (loss.item(), marginal.item())  # measured: 0.42 of it


def _energy_loss_direct(samples, mu, log_sigma, num_target_samples, beta, generator):
    """The earlier form: every distance from the direct (non-matmul) cdist kernel, uncentred."""
    n, latent = samples.shape[0], mu.shape[-1]
    x = samples.float().reshape(n, -1, latent).transpose(0, 1)
    eps = torch.randn((num_target_samples, *mu.shape), generator=generator)
    y = (mu.float() + torch.exp(log_sigma.float()) * eps).reshape(num_target_samples, -1, latent).transpose(0, 1)
    mode = "donot_use_mm_for_euclid_dist"
    d_xy = torch.cdist(x, y, compute_mode=mode).pow(beta).mean(dim=(1, 2))
    rows, cols = torch.triu_indices(n, n, offset=1)
    d_xx = torch.cdist(x, x, compute_mode=mode)[:, rows, cols].pow(beta).mean(dim=1)
    return (2 * d_xy - d_xx).reshape(mu.shape[:-1])


@pytest.mark.parametrize("beta", [1.0, 1.5])
def test_matmul_form_equals_the_direct_form_in_value_and_gradient(beta):
    """fp32, CALM-like sizes (N 8, M 100, latent 128, targets far from the origin): <= 1e-6 relative."""
    gen = torch.Generator().manual_seed(3)
    mu = 4 * torch.randn(2, 24, 128, generator=gen)
    log_sigma = torch.randn(2, 24, 128, generator=gen) * 0.3 - 1.0
    base = mu + torch.randn(8, 2, 24, 128, generator=gen)
    grads, values = [], []
    for fn in (energy_loss, _energy_loss_direct):
        x, m, s = (t.clone().requires_grad_(True) for t in (base, mu, log_sigma))
        value = fn(x, m, s, 100, beta, generator=torch.Generator().manual_seed(11))
        value.sum().backward()
        values.append(value.detach())
        grads.append([x.grad, m.grad, s.grad])
    torch.testing.assert_close(values[0], values[1], rtol=1e-6, atol=0)
    for new, old in zip(*grads):
        scale = old.abs().max()
        assert (new - old).abs().max() <= 1e-6 * scale, ((new - old).abs().max() / scale).item()


def test_terms_add_up_to_the_loss():
    gen = torch.Generator().manual_seed(2)
    x, mu, log_sigma = torch.randn(4, 3, 8, generator=gen), torch.randn(3, 8, generator=gen), torch.zeros(3, 8)
    plain = energy_loss(x, mu, log_sigma, generator=torch.Generator().manual_seed(5))
    loss, fidelity, diversity = energy_loss(x, mu, log_sigma, generator=torch.Generator().manual_seed(5), terms=True)
    assert torch.equal(loss, plain) and torch.equal(loss, fidelity - diversity) and (diversity > 0).all()
