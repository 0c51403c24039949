"""CALM's one-step generative head (`MLPGenerator`) and the energy loss that trains it (docs/method.md §3).

The head turns uniform noise into a latent vector, conditioned on the backbone's hidden state, in a
single pass. It is trained with the energy score, a strictly proper scoring rule that needs only
samples (no likelihood): 2 E||x - y||^beta - E||x - x'||^beta, with x, x' model samples and y target
samples. Module and parameter names follow the authors' checkpoints (§8).
"""

from __future__ import annotations

import torch
from torch import nn


class MLPBlock(nn.Module):
    """Residual block refining the noise stream x, conditioned on the hidden stream c."""

    def __init__(self, channels: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.linears = nn.Sequential(
            nn.Linear(2 * channels, channels),
            nn.SiLU(),
            nn.Linear(channels, channels),
            nn.SiLU(),
            nn.Linear(channels, 2 * channels),
        )
        self.down_proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        gate, up = self.linears(torch.cat((self.in_ln(x), c), dim=-1)).chunk(2, dim=-1)
        return x + self.down_proj(nn.functional.silu(gate) * up)


class FinalLayer(nn.Module):
    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.linears = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, out_channels))
        # The head starts by predicting 0 for every input; CALM._init_weights honours this flag.
        self.linears[2].zero_init = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linears(self.in_ln(x))


class MLPGenerator(nn.Module):
    """hidden (..., d) -> `num_samples` latent samples (num_samples, ..., latent_size), one forward pass."""

    def __init__(self, hidden_size: int, latent_size: int, noise_size: int, num_mlp_layers: int):
        super().__init__()
        self.noise_size = noise_size
        self.noise_embd = nn.Linear(noise_size, hidden_size)
        self.hidden_embd = nn.Linear(hidden_size, hidden_size)
        self.norm_hidden = nn.LayerNorm(hidden_size, eps=1e-6)
        self.norm_noise = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp_blocks = nn.ModuleList(MLPBlock(hidden_size) for _ in range(num_mlp_layers))
        self.final_layer = FinalLayer(hidden_size, latent_size)
        # Xavier-uniform, not the backbone's N(0, 0.02): the head chains five linears and a gated product
        # per block, and at std 0.02 each layer scales its signal by 0.02·sqrt(width) (0.23 at width 128),
        # so small heads start with almost no path from the hidden state and learn only the marginal for
        # thousands of steps. CALM._init_weights honours this flag (and zero_init for the output layer).
        for module in self.modules():
            if isinstance(module, nn.Linear) and not getattr(module, "zero_init", False):
                module.xavier_init = True

    def forward(
        self, hidden: torch.Tensor, num_samples: int = 1, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        c = self.norm_hidden(self.hidden_embd(hidden))
        c = c.unsqueeze(0).expand(num_samples, *c.shape)
        noise = torch.rand(
            (num_samples, *hidden.shape[:-1], self.noise_size), device=hidden.device, generator=generator
        )
        x = self.norm_noise(self.noise_embd(noise.to(hidden.dtype) - 0.5))
        for block in self.mlp_blocks:
            x = block(x, c)
        return self.final_layer(x)


def energy_loss(
    samples: torch.Tensor,
    mu: torch.Tensor,
    log_sigma: torch.Tensor,
    num_target_samples: int = 100,
    beta: float = 1.0,
    generator: torch.Generator | None = None,
    terms: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Negative energy score per position (lower is better), computed in float32.

    samples: (N, ..., l) model samples, N >= 2; mu, log_sigma: (..., l) the target Gaussian, from which
    `num_target_samples` (M) samples y_m are drawn. Returns (...):
    2/(N M) sum_{n,m} ||x_n - y_m||^beta - 1/(N (N-1)) sum_{n != k} ||x_n - x_k||^beta.
    With `terms`, returns (loss, fidelity, diversity): the first term (samples against targets) and the
    second (samples against each other), each per position, so training can log them apart.
    """
    n = samples.shape[0]
    if n < 2:
        raise ValueError(f"energy_loss needs at least 2 model samples per position, got {n}")
    if samples.shape[1:] != mu.shape or mu.shape != log_sigma.shape:
        raise ValueError(f"shape mismatch: samples {tuple(samples.shape)}, mu {tuple(mu.shape)}, "
                         f"log_sigma {tuple(log_sigma.shape)}")
    batch_shape, latent = mu.shape[:-1], mu.shape[-1]
    # Centred on the target mean: distances do not change, and the matmul form below then works on
    # small numbers (its cancellation error scales with the squared norms).
    centre = mu.float().reshape(-1, 1, latent)
    x = samples.float().reshape(n, -1, latent).transpose(0, 1) - centre  # (P, N, l)
    eps = torch.randn((num_target_samples, *mu.shape), device=mu.device, generator=generator)
    y = (torch.exp(log_sigma.float()) * eps).reshape(num_target_samples, -1, latent).transpose(0, 1)  # (P, M, l)
    d_xy = _euclidean_matmul(x, y).pow(beta).mean(dim=(1, 2))
    # The N x N sample distances stay in the direct form: it is exact for near-equal samples, and only
    # the n < k pairs are raised to beta, so the zero diagonal never meets a negative power in backward.
    rows, cols = torch.triu_indices(n, n, offset=1, device=x.device)
    d_xx = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")[:, rows, cols].pow(beta).mean(dim=1)
    loss = (2 * d_xy - d_xx).reshape(batch_shape)
    if terms:
        return loss, (2 * d_xy).reshape(batch_shape), d_xx.reshape(batch_shape)
    return loss


def _euclidean_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_i - b_j|| for (P, N, l) x (P, M, l) -> (P, N, M) in float32 through one batched matmul.

    The direct form (`cdist` without mm) launches a block per distance on CUDA and keeps an
    (P, N, M, l) buffer for backward; this form needs (P, N, M). TF32 is switched off for it:
    its 10-bit mantissa would cost the distances about three decimal digits.
    """
    with _full_fp32_matmul(a.device):
        squared = torch.baddbmm((b * b).sum(-1).unsqueeze(1), a, b.transpose(1, 2), alpha=-2.0)
    squared = squared + (a * a).sum(-1, keepdim=True)
    # Clamped away from 0: rounding can make a tiny squared distance negative, and sqrt's gradient at 0
    # is infinite (the clamp's zero gradient then wins).
    return squared.clamp_min(1e-20).sqrt()


class _full_fp32_matmul:
    """Context manager: float32 matmuls in full precision on CUDA (TF32 off), restored on exit."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.saved = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = self.saved
        return False
