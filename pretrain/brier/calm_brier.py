"""BrierLM estimator for CALM (docs/method.md §5): likelihood-free, from decoded head samples only.

At every chunk position t of a block (chunks c_0..c_{T−1}; the state after reading c_0..c_t predicts
c_{t+1}) two head samples are drawn and decoded by the autoencoder (argmax) into K tokens each. The
Brier-n estimate for the n tokens starting chunk t+1 is

    1{x¹_{1..n} = y} + 1{x²_{1..n} = y} − 1{x¹_{1..n} = x²_{1..n}}

computed with cumulative products over token positions. With K >= 4 every n <= 4 lies inside one
chunk and one teacher-forced pass suffices; there S > 2 samples may be drawn instead, and

    (2/S) Σ_s 1{x^s_{1..n} = y} − 2/(S(S−1)) Σ_{s<s'} 1{x^s_{1..n} = x^{s'}_{1..n}}

estimates the same 2 P(y) − Σ_x P(x)² with less variance: a weak model's whole-chunk hits are rare, and
with two samples its Brier-4 is mostly noise (the baseline's Brier-1 needs no samples at all, its exact
probabilities are known). With K < 4 the n-grams span D = ⌈4/K⌉ chunks and two samples are used:

- accuracy terms: sample a's tokens beyond chunk t+1 are taken from sample a of the *teacher-forced*
  steps t+1, t+2, ...; those only matter when sample a's earlier chunks equal the truth, and then
  their context is exactly the true one, so the indicator keeps its expectation P(y_{1..n});
- collision term: while the two samples agree on every chunk so far, the common chunk is fed back as
  the next input (a branch of the teacher-forced cache, `pretrain.brier.branching`, all positions in one
  pass per depth) and two fresh samples are compared; disagreeing positions need nothing more.

Only indicators whose running product is still 1 can change an estimate, so with K >= 4 the certified
path (`CALMSampler` with its `ArgmaxDecoder`) decodes position j of a sample only while its first j
tokens equal the truth's or another sample's: most samples part from both at their first token, so
about half of the positions (and of the decoder's per-position work) are skipped, with the estimates of
decoding everything.

The estimator core (`calm_brier_block`) talks to a `ChunkSampler`, so tests can drive it with a
synthetic head whose decoded distribution is known exactly; `CALMSampler` is the real model.
Evaluated positions are those whose D following chunks lie inside the block.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from transformers import DynamicCache

from pretrain.brier.branching import BranchCache, branch_forward, compact, ensure_mask_capable
from pretrain.brier.brier_stats import N_GRAMS
from pretrain.brier.brierlm import BlockEstimates
from pretrain.models.argmax_decode import ArgmaxDecoder, decoder_tail, decoder_trunk


class ChunkSampler(Protocol):
    """Decoded samples of the next chunk, teacher-forced (S of them) or on a branch (two)."""

    patch_size: int

    def teacher(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T·K) -> (B, T, S, K): S >= 2 samples of chunk t+1 given chunks 0..t."""

    def branch(
        self, chunks: torch.Tensor, position_ids: torch.Tensor, prefix_len: torch.Tensor, prev_cols: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed sampled chunks (B, M, K) after a teacher prefix of `prefix_len` chunks plus earlier branch
        entries `prev_cols` (B, M, S); returns two samples of the chunk after (B, M, 2, K) and the cache
        columns (B, M) the fed chunks were written to."""


class CALMSampler:
    """`ChunkSampler` over a `pretrain.models.CALM`: backbone + energy head + frozen AE decoder."""

    def __init__(self, model, generator: torch.Generator | None = None, max_queries: int = 256,
                 max_elements: int = 1 << 24, num_samples: int = 2, screened_decode: bool = True) -> None:
        ensure_mask_capable(model)
        self.model = model
        self.patch_size = model.config.patch_size
        if num_samples < 2 or (num_samples > 2 and self.patch_size < N_GRAMS):
            raise ValueError(f"samples per position must be 2, or more with K >= {N_GRAMS} "
                             f"(got {num_samples} at K = {self.patch_size})")
        self.num_samples = num_samples
        self.generator = generator
        self.max_queries = max_queries
        vocab = model.ae_model.config.vocab_size
        self.decode_slice = max(1, max_elements // (num_samples * self.patch_size * vocab))
        self.cache = None
        self.forward_calls = 0
        # The certified argmax decoder (bf16 screen, exact rescoring of the few contenders) returns exactly
        # decode_latents' tokens without most of its full-vocabulary float32 projections.
        self.decoder = ArgmaxDecoder(model) if screened_decode else None

    def _samples(self, hidden: torch.Tensor, num: int) -> torch.Tensor:
        """Hidden (B, M, d) -> decoded samples (B, M, num, K), decoding in slices to bound the logits."""
        latents = self.model.sample_latents(hidden, num_samples=num, generator=self.generator)
        out = []
        for start in range(0, latents.shape[2], self.decode_slice):
            part = latents[:, :, start : start + self.decode_slice]
            decode = self.decoder if self.decoder is not None else self.model.decode_latents
            out.append(decode(part).view(*part.shape[:3], self.patch_size))
        return torch.cat(out, dim=2).permute(1, 2, 0, 3)

    def _needed_samples(self, hidden: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        """`_samples` for one-chunk n-grams (K >= N_GRAMS), decoding only the tokens an estimate can read:
        position j of a sample matters only while its first j tokens equal the truth's (B, M, K) or another
        sample's; elsewhere every running product is already 0, so -1 fills in and the estimates are
        those of decoding everything. The decoder's per-position layers run only there too, and
        positions past N_GRAMS never."""
        decoder = self.decoder
        latents = self.model.sample_latents(hidden, num_samples=self.num_samples, generator=self.generator)
        trunk = decoder_trunk(decoder.decoder, latents.permute(1, 2, 0, 3).to(decoder.weight.dtype))  # (B, M, S, K, d)
        out = torch.full(trunk.shape[:-1], -1, dtype=torch.long, device=hidden.device)
        need = torch.ones(out.shape[:-1], dtype=torch.bool, device=hidden.device)
        others = ~torch.eye(self.num_samples, dtype=torch.bool, device=hidden.device)
        for pos in range(N_GRAMS):
            idx = need.nonzero(as_tuple=True)
            if len(idx[0]) == 0:
                break
            out[idx + (pos,)] = decoder.tokens_from_hidden(decoder_tail(decoder.decoder, trunk[..., pos, :][idx]))
            seen = out[..., : pos + 1]
            hit = (seen == truth[:, :, None, : pos + 1]).all(-1)
            same = ((seen[:, :, :, None] == seen[:, :, None, :]).all(-1) & others).any(-1)
            need &= hit | same
        return out

    @torch.no_grad()
    def teacher(self, input_ids: torch.Tensor) -> torch.Tensor:
        cache = DynamicCache(config=self.model.config)
        hidden, _ = self.model.backbone(self.model.chunk_embeddings(input_ids), past_key_values=cache, use_cache=True)
        self.cache = BranchCache(cache)
        self.forward_calls += 1
        if self.decoder is not None and self.decoder.split and self.patch_size >= N_GRAMS:
            chunks = input_ids.view(input_ids.shape[0], -1, self.patch_size)
            truth = torch.nn.functional.pad(chunks[:, 1:], (0, 0, 0, 1), value=-1)  # the last step has none
            return self._needed_samples(hidden, truth)
        return self._samples(hidden, self.num_samples)

    @torch.no_grad()
    def branch(self, chunks, position_ids, prefix_len, prev_cols):
        embeds = self.model.chunk_embeddings(chunks.flatten(1))
        hidden, cols = branch_forward(
            self.model.transformer, self.cache, embeds, position_ids, prefix_len, prev_cols, self.max_queries
        )
        self.forward_calls += -(-chunks.shape[1] // self.max_queries)
        return self._samples(hidden, 2), cols


def _cumulative(eq: torch.Tensor) -> torch.Tensor:
    """First N_GRAMS columns of the running AND over token positions, as float64."""
    return eq[..., :N_GRAMS].to(torch.int8).cumprod(-1).double()


@torch.no_grad()
def calm_brier_block(
    sampler: ChunkSampler, input_ids: torch.Tensor, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """Brier-1..4 estimates (N, 4) for a right-padded batch of blocks (B, L), L and lengths multiples of K."""
    k = sampler.patch_size
    bsz, length = input_ids.shape
    if length % k:
        raise ValueError(f"block length {length} is not a multiple of patch_size {k}")
    device = input_ids.device
    lengths = torch.full((bsz,), length, device=device) if lengths is None else lengths.to(device)
    if bool((lengths % k).any()):
        raise ValueError(f"block lengths {lengths.tolist()} must be multiples of patch_size {k}")
    steps, depth_max = length // k, math.ceil(N_GRAMS / k)
    chunks = input_ids.view(bsz, steps, k)
    samples = sampler.teacher(input_ids)  # (B, T, S, K): samples[:, t] predicts chunk t+1
    num = samples.shape[2]
    if num > 2 and depth_max > 1:
        raise ValueError(f"{num} samples per position need K >= {N_GRAMS} (K = {k} uses two and branches)")
    valid = torch.arange(steps, device=device)[None, :] <= (lengths[:, None] // k - 1 - depth_max)

    # Chunks t+1 .. t+D of the truth and of each sample stream, laid out token by token.
    truth = torch.nn.functional.pad(chunks, (0, 0, 0, depth_max + 1))
    streams = torch.nn.functional.pad(samples, (0, 0, 0, 0, 0, depth_max))
    target = torch.cat([truth[:, 1 + d : 1 + d + steps] for d in range(depth_max)], dim=-1)
    acc = sum(
        _cumulative(torch.cat([streams[:, d : d + steps, a] for d in range(depth_max)], dim=-1) == target)
        for a in range(num)
    ) * (2 / num)
    if num > 2:  # one chunk holds every n-gram: the collisions are all among the teacher-forced samples
        pairs = torch.triu_indices(num, num, offset=1).T.tolist()
        collisions = sum(_cumulative(samples[:, :, a] == samples[:, :, b]) for a, b in pairs) / len(pairs)
        return (acc - collisions)[valid]

    agree = torch.zeros(bsz, steps, depth_max * k, dtype=torch.bool, device=device)
    agree[..., :k] = samples[:, :, 0] == samples[:, :, 1]
    pos = torch.arange(steps, device=device).expand(bsz, steps)
    active = valid & agree[..., :k].all(-1)
    fed = samples[:, :, 0]
    prev_cols = torch.zeros(bsz, steps, 0, dtype=torch.long, device=device)
    rows = torch.arange(bsz, device=device)[:, None]
    for depth in range(1, depth_max):
        active, (pos, fed, prev_cols) = compact(active, pos, fed, prev_cols)
        if active.shape[1] == 0:
            break
        pair, cols = sampler.branch(fed, pos + depth, torch.where(active, pos + 1, 1), prev_cols)
        same = pair[:, :, 0] == pair[:, :, 1]
        idx = (rows.expand_as(pos)[active], pos[active])
        agree[..., depth * k : (depth + 1) * k].index_put_(idx, same[active])
        active = active & same.all(-1)
        fed = pair[:, :, 0]
        prev_cols = torch.cat([prev_cols, cols[..., None]], dim=-1)
    est = acc - _cumulative(agree)
    return est[valid]


def calm_brier(sampler: ChunkSampler, input_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> BlockEstimates:
    """`calm_brier_block` with the sampler's forward-call count (real samplers only)."""
    before = getattr(sampler, "forward_calls", 0)
    est = calm_brier_block(sampler, input_ids, lengths)
    return BlockEstimates(est, getattr(sampler, "forward_calls", 0) - before)
