"""Exact greedy decoding of CALM latents at a fraction of the full-vocabulary projection's cost.

Generation only needs argmax tokens from the autoencoder decoder, never its logits. The output
projection h·Eᵀ over the whole vocabulary is what dominates a CALM step (K positions × every head
draw × V × d), so it is screened in bfloat16 (2.5-3× faster than float32 on CPUs with bf16 dot
products, half the memory traffic) and certified exact:

- every screened logit is within b = (3u + 2u² + d·2⁻²³)·‖h‖·max‖e_v‖ of the exact one (u = 2⁻⁸,
  bf16 unit roundoff: rounding of h, of E and of the bf16 result; float32 accumulation over d terms);
- the top `shortlist` screened tokens are rescored exactly in float32; if the best exact score beats
  the shortlist's lowest screened score + b, no token outside the shortlist can win, so that token is
  the exact argmax. Positions failing the test (near-ties wider than the bound) fall back to the full
  float32 projection.

So `ArgmaxDecoder(model)(latents)` returns the same tokens as `model.decode_latents(latents)`.
"""

from __future__ import annotations

import torch

BF16_UNIT_ROUNDOFF = 2.0 ** -8


class ArgmaxDecoder:
    """Greedy tokens of a CALM's frozen autoencoder decoder; holds a bf16 copy of the output matrix."""

    def __init__(self, model, shortlist: int = 16):
        ae = model.ae_model
        self.decoder = ae.decoder
        self.weight = ae.encoder.embed_tokens.weight.detach()
        self.low = self.weight.to(torch.bfloat16)
        self.max_norm = float(self.weight.float().norm(dim=1).max())
        self.shortlist = min(shortlist, self.weight.shape[0])
        u, d = BF16_UNIT_ROUNDOFF, self.weight.shape[1]
        self.rel_bound = 1.25 * (3 * u + 2 * u * u + d * 2.0 ** -23)  # 25% slack over the analysis
        self.fallbacks = 0
        """Positions that needed the full float32 projection (for benchmarks)."""

    @torch.no_grad()
    def tokens_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """(M, d) final decoder states -> (M,) exact argmax of hidden @ weight.T."""
        hidden = hidden.to(self.weight.dtype)
        screen = hidden.to(torch.bfloat16) @ self.low.T  # ranked in bf16: a float32 copy costs a full pass
        top_vals, top_idx = screen.topk(self.shortlist, dim=1)
        top_vals = top_vals.float()
        exact = torch.einsum("md,mkd->mk", hidden, self.weight[top_idx])
        best, where = exact.max(dim=1)
        tokens = top_idx.gather(1, where[:, None]).squeeze(1)
        bound = self.rel_bound * hidden.norm(dim=1) * self.max_norm
        unsure = best <= top_vals[:, -1] + bound
        if unsure.any():
            self.fallbacks += int(unsure.sum())
            tokens[unsure] = (hidden[unsure] @ self.weight.T).argmax(dim=1)
        return tokens

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (..., T, l) -> token ids (..., T*K), like `CALM.decode_latents`."""
        lead = latents.shape[:-2]
        flat = latents.reshape(-1, *latents.shape[-2:]).to(self.weight.dtype)
        hidden = self.decoder(flat)
        tokens = self.tokens_from_hidden(hidden.reshape(-1, hidden.shape[-1]))
        return tokens.reshape(*lead, hidden.shape[1])
