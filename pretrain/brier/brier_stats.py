"""Accumulate per-position Brier-1..4 estimates into BrierLM with a standard error (docs/method.md §5).

Every estimator in `pretrain.brier.brierlm` yields one row of four unbiased estimates (Brier-1..4) per
evaluated position. This module only keeps sufficient statistics — the count, the sums and the sums
of outer products, in float64 — so blocks, batches and ranks combine by addition (`all_reduce`
under torch.distributed), and turns them into:

- `brier_n`: the mean of each column; `brier_n_se`: its standard error (sample std / sqrt(count));
- `brierlm` = 100 · (Brier-1 · Brier-2 · Brier-3 · Brier-4)^(1/4), 0 when any mean is <= 0;
- `brierlm_se`: delta-method standard error of `brierlm` from the 4×4 covariance of the columns.

The standard errors treat positions as independent draws; neighbouring positions of one document
are correlated, so they are a lower bound on the document-level uncertainty.
"""

from __future__ import annotations

import math

import torch

N_GRAMS = 4


class BrierAccumulator:
    """Sufficient statistics of per-position (Brier-1..4) estimates."""

    def __init__(self) -> None:
        self.count = torch.zeros((), dtype=torch.float64)
        self.sum = torch.zeros(N_GRAMS, dtype=torch.float64)
        self.outer = torch.zeros(N_GRAMS, N_GRAMS, dtype=torch.float64)

    def add(self, estimates: torch.Tensor) -> None:
        """Add rows of per-position estimates, shape (N, 4)."""
        if estimates.dim() != 2 or estimates.shape[1] != N_GRAMS:
            raise ValueError(f"expected estimates of shape (N, {N_GRAMS}), got {tuple(estimates.shape)}")
        x = estimates.detach().to("cpu", torch.float64)
        self.count += x.shape[0]
        self.sum += x.sum(dim=0)
        self.outer += x.T @ x

    def all_reduce(self) -> None:
        """Sum the statistics over all ranks (no-op outside torch.distributed)."""
        from pretrain.distributed import all_reduce

        flat = all_reduce(torch.cat([self.count.view(1), self.sum, self.outer.flatten()]))
        self.count = flat[0].clone()
        self.sum = flat[1 : 1 + N_GRAMS].clone()
        self.outer = flat[1 + N_GRAMS :].view(N_GRAMS, N_GRAMS).clone()

    def summary(self) -> dict:
        """BrierLM, Brier-1..4 and their standard errors; raises if nothing was added."""
        n = float(self.count)
        if n == 0:
            raise ValueError("no positions were evaluated (documents shorter than 5 tokens / one chunk?)")
        mean = self.sum / n
        cov = (self.outer / n - torch.outer(mean, mean)) * (n / max(n - 1.0, 1.0))
        se = (cov.diagonal().clamp_min(0) / n).sqrt()
        score = brierlm(mean.tolist())
        if score > 0:
            grad = score / (N_GRAMS * mean)
            lm_se = math.sqrt(max(float(grad @ cov @ grad), 0.0) / n)
        else:
            lm_se = 0.0
        return {
            "brierlm": score,
            "brierlm_se": lm_se,
            "brier_n": [float(v) for v in mean],
            "brier_n_se": [float(v) for v in se],
            "positions": int(n),
        }


def brierlm(brier_n: list[float]) -> float:
    """100 × geometric mean of Brier-1..4, floored at 0."""
    if len(brier_n) != N_GRAMS:
        raise ValueError(f"expected {N_GRAMS} Brier-n values, got {len(brier_n)}")
    if min(brier_n) <= 0:
        return 0.0
    return 100.0 * math.exp(sum(math.log(v) for v in brier_n) / N_GRAMS)
