"""Autoencoder fidelity (docs/method.md §2): reconstruction accuracy and its robustness to latent noise.

For every batch of token blocks (lengths multiples of K) the encoder gives (μ, log σ) per chunk;
each chunk is decoded by argmax from

- z = μ                      -> `accuracy_mean` (deterministic),
- z = μ + σ·ε                -> `accuracy` (posterior sampling; the paper's quality bar is > 99.9%),
- z = μ + σ·ε + s·ξ          -> the robustness curve, one point per noise std s (ε, ξ ~ N(0, I)),

the same convention as `Autoencoder.reconstruct(sample=True, noise_std=s)`. Encoding happens once
per batch and all noise levels reuse it. Counts are token-level and summed over ranks.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from pretrain.distributed import all_reduce

DEFAULT_NOISE_STDS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)


@torch.no_grad()
def reconstruction_eval(
    autoencoder,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    noise_stds: tuple[float, ...] = DEFAULT_NOISE_STDS,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """Token reconstruction accuracies over right-padded batches (ids (B, L), lengths (B,))."""
    k = autoencoder.config.patch_size
    stds = [float(s) for s in noise_stds]
    if any(s < 0 for s in stds):
        raise ValueError(f"noise stds must be >= 0, got {stds}")
    correct = torch.zeros(2 + len(stds), dtype=torch.float64)
    total = torch.zeros((), dtype=torch.float64)
    for ids, lengths in batches:
        if ids.shape[1] % k or bool((lengths % k).any()):
            raise ValueError(f"block lengths must be multiples of patch_size {k}, got {lengths.tolist()}")
        ids, lengths = ids.to(device), lengths.to(device)
        mask = torch.arange(ids.shape[1], device=device)[None, :] < lengths[:, None]
        mu, log_sigma = autoencoder.encode(ids)
        sigma = log_sigma.exp()
        eps = torch.randn(mu.shape, generator=generator, device=device, dtype=mu.dtype)
        sampled = mu + sigma * eps
        latents = [mu, sampled] + [
            sampled + s * torch.randn(mu.shape, generator=generator, device=device, dtype=mu.dtype) for s in stds
        ]
        for i, z in enumerate(latents):
            hits = (autoencoder.decode(z).argmax(-1) == ids) & mask
            correct[i] += hits.sum().double().cpu()
        total += mask.sum().double().cpu()
    counts = all_reduce(torch.cat([correct, total.view(1)]))
    correct, total = counts[:-1], float(counts[-1])
    if total == 0:
        raise ValueError("no tokens to reconstruct")
    acc = (correct / total).tolist()
    return {
        "accuracy": acc[1],
        "accuracy_mean": acc[0],
        "tokens": int(total),
        "robustness": [{"noise_std": s, "accuracy": a} for s, a in zip(stds, acc[2:])],
    }
