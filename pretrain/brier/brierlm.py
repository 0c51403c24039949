"""BrierLM estimators for the discrete baseline (docs/method.md §5), batched and per-position.

For a position p of a block y (predicting y_{p+1..p+n}) the Brier-n estimate is

    2 · Π_{j=1..n} P(y_{p+j} | y_<p+j)  −  g_{n−1} · S_n

The accuracy term is exact, from the teacher-forced pass. The collision term Σ_x P(x)² over n-grams
is estimated without bias: two tokens a_s, b_s are sampled per step, the branch continues from a_s
while a_1..a_s = b_1..b_s (indicator g_s, g_0 = 1), and S_n = Σ_x P(x | y_<=p, a_1..a_{n−1})² is the
exact collision probability of the n-th step (S_1 from the teacher-forced pass).

- `baseline_brier_batched`: one teacher-forced pass, then at most three branch passes over *all*
  positions still agreeing at once (`pretrain.brier.branching`; each pass split into slices of
  `max_queries` queries): about 4 passes per block instead of up to 3 extra calls per position.
- `baseline_brier_reference`: the straightforward loop — token-by-token incremental decoding, and
  for every agreeing position up to three more single-token calls on a branch of the cache, cropped
  afterwards. Kept as the independent check of the batched code and as the bench's baseline.

Both draw their randomness up front as uniforms (B, L, 3, 2) from the caller's generator and sample
by inverse CDF, so on the same generator state they make the same draws and agree to numerical
precision, not only in expectation. Evaluated positions are those whose four targets lie inside the
block (p <= length − 5), the same set for every n. Rows of the result follow (block, position) order.
The model is any Llama-style causal LM whose `get_decoder()` takes `inputs_embeds`, `position_ids`
and a custom 4D mask, and whose `get_output_embeddings()` maps hidden states to logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from pretrain.brier.branching import BranchCache, branch_forward, compact, ensure_mask_capable
from pretrain.brier.brier_stats import N_GRAMS

STEPS = N_GRAMS - 1
"""Sampling rounds: two tokens at depths 0..2; depth 3 only needs its exact collision."""


@dataclass
class BlockEstimates:
    """Per-position estimates of one batch of blocks and what they cost."""

    estimates: torch.Tensor
    """(N, 4) float64 Brier-1..4 estimates, one row per evaluated position."""
    forward_calls: int


SAMPLE_BLOCK = 256
"""Vocabulary slice of the two-level inverse CDF: block totals first, then one block's entries."""


def sample_inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Token ids (N, k) from unnormalised non-negative weights (N, V) and uniforms (N, k) in [0, 1).

    Two-level search in float64 (block totals, then the chosen block), so a full-vocabulary float64
    cumulative sum is never formed.
    """
    n, vocab = weights.shape
    blocks = -(-vocab // SAMPLE_BLOCK)
    if vocab % SAMPLE_BLOCK:
        weights = torch.nn.functional.pad(weights, (0, blocks * SAMPLE_BLOCK - vocab))
    grouped = weights.view(n, blocks, SAMPLE_BLOCK)
    cdf = grouped.sum(-1).double().cumsum(-1)
    target = uniforms.double() * cdf[:, -1:]
    block = torch.searchsorted(cdf, target, right=True).clamp_max(blocks - 1)
    before = torch.where(block > 0, cdf.gather(-1, (block - 1).clamp_min(0)), 0.0)
    k = uniforms.shape[1]
    inside = grouped.gather(1, block[..., None].expand(n, k, SAMPLE_BLOCK)).double().cumsum(-1)
    offset = torch.searchsorted(inside, (target - before)[..., None], right=True).squeeze(-1)
    return (block * SAMPLE_BLOCK + offset.clamp_max(SAMPLE_BLOCK - 1)).clamp_max(vocab - 1)


@torch.no_grad()
def head_stats(
    hidden: torch.Tensor,
    lm_head: torch.nn.Linear,
    targets: torch.Tensor | None = None,
    uniforms: torch.Tensor | None = None,
    max_elements: int = 1 << 23,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """From hidden states (N, d): log P(target) (N,), Σ P² (N,) and sampled ids (N, k), in float64.

    Logits are formed in row slices (at least 256 rows, where CPU matrix products run at full speed,
    else `max_elements` / vocab) into one reused buffer, and exponentiated in place.
    """
    n = hidden.shape[0]
    weight, bias = lm_head.weight, lm_head.bias
    if weight.dtype in (torch.float16, torch.bfloat16):
        # Logits rounded to 8 bits of mantissa would tie and shift probabilities: form them in float32.
        hidden, weight = hidden.float(), weight.float()
        bias = None if bias is None else bias.float()
    step = min(n, max(256, max_elements // weight.shape[0]))
    buffer = hidden.new_empty(step, weight.shape[0])
    logq, coll, samples = [], [], []
    for start in range(0, n, step):
        rows = min(step, n - start)
        logits = torch.mm(hidden[start : start + rows], weight.T, out=buffer[:rows])
        if bias is not None:
            logits += bias
        top = logits.amax(-1, keepdim=True)
        if targets is not None:
            picked = logits.gather(-1, targets[start : start + rows, None]) - top
        weights = logits.sub_(top).exp_()
        total = weights.sum(-1).double()
        coll.append(torch.linalg.vector_norm(weights, dim=-1).double().square() / total.square())
        if targets is not None:
            logq.append(picked.squeeze(-1).double() - total.log())
        if uniforms is not None:
            samples.append(sample_inverse_cdf(weights, uniforms[start : start + rows]))
    return (
        torch.cat(logq) if targets is not None else None,
        torch.cat(coll),
        torch.cat(samples) if uniforms is not None else None,
    )


def draw_uniforms(batch: int, length: int, generator: torch.Generator | None) -> torch.Tensor:
    """All randomness of one batch of blocks, drawn on the CPU so results do not depend on the device."""
    return torch.rand(batch, length, STEPS, 2, generator=generator, dtype=torch.float64)


def _valid_positions(lengths: torch.Tensor, length: int) -> torch.Tensor:
    return torch.arange(length, device=lengths.device)[None, :] <= (lengths[:, None] - 1 - N_GRAMS)


def _combine(logq: torch.Tensor, collision: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Brier-n rows from teacher log-probs (B, L) (logq[:, p] = log P(y_{p+1})) and collisions (B, L, 4)."""
    length = logq.shape[1]
    padded = torch.nn.functional.pad(logq.double(), (0, N_GRAMS))
    cum = torch.stack([padded[:, j : j + length] for j in range(N_GRAMS)], dim=-1).cumsum(-1)
    est = 2.0 * cum.exp() - collision.double()
    return est[valid]


@torch.no_grad()
def baseline_brier_batched(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    lengths: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    max_queries: int = 256,
) -> BlockEstimates:
    """Brier-1..4 estimates for a right-padded batch of blocks (B, L) with true `lengths` (B,)."""
    ensure_mask_capable(model)
    bsz, length = input_ids.shape
    device = input_ids.device
    lengths = torch.full((bsz,), length, device=device) if lengths is None else lengths.to(device)
    uniforms = draw_uniforms(bsz, length, generator).to(device)
    backbone, lm_head = model.get_decoder(), model.get_output_embeddings()
    embed = backbone.get_input_embeddings()

    cache = DynamicCache(config=model.config)
    hidden = backbone(input_ids=input_ids, past_key_values=cache, use_cache=True).last_hidden_state
    targets = torch.nn.functional.pad(input_ids[:, 1:], (0, 1))
    logq, coll1, samples = head_stats(
        hidden.flatten(0, 1), lm_head, targets.flatten(), uniforms[:, :, 0].flatten(0, 1)
    )
    logq, samples = logq.view(bsz, length), samples.view(bsz, length, 2)
    cache = BranchCache(cache)
    collision = torch.zeros(bsz, length, N_GRAMS, dtype=torch.float64, device=device)
    collision[..., 0] = coll1.view(bsz, length)
    valid = _valid_positions(lengths, length)
    calls = 1

    pos = torch.arange(length, device=device).expand(bsz, length)
    active = valid & (samples[..., 0] == samples[..., 1])
    tokens = samples[..., 0]
    prev_cols = torch.zeros(bsz, length, 0, dtype=torch.long, device=device)
    rows = torch.arange(bsz, device=device)[:, None]
    for depth in range(1, N_GRAMS):
        active, (pos, tokens, prev_cols) = compact(active, pos, tokens, prev_cols)
        if active.shape[1] == 0:
            break
        calls += -(-active.shape[1] // max_queries)
        hidden, cols = branch_forward(
            backbone, cache, embed(tokens), pos + depth, torch.where(active, pos + 1, 1), prev_cols, max_queries
        )
        u = uniforms[rows, pos, depth].flatten(0, 1) if depth < STEPS else None
        _, coll, samples = head_stats(hidden.flatten(0, 1), lm_head, None, u)
        collision[..., depth].index_put_((rows.expand_as(pos)[active], pos[active]), coll.view(pos.shape)[active].double())
        if samples is None:
            break
        samples = samples.view(*pos.shape, 2)
        active = active & (samples[..., 0] == samples[..., 1])
        tokens = samples[..., 0]
        prev_cols = torch.cat([prev_cols, cols[..., None]], dim=-1)
    return BlockEstimates(_combine(logq, collision, valid), calls)


@torch.no_grad()
def baseline_brier_reference(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    lengths: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> BlockEstimates:
    """The per-position loop; same draws and same result as `baseline_brier_batched`."""
    bsz, length = input_ids.shape
    device = input_ids.device
    lengths = torch.full((bsz,), length, device=device) if lengths is None else lengths.to(device)
    uniforms = draw_uniforms(bsz, length, generator).to(device)
    backbone, lm_head = model.get_decoder(), model.get_output_embeddings()
    logq = torch.zeros(bsz, length, dtype=torch.float64, device=device)
    collision = torch.zeros(bsz, length, N_GRAMS, dtype=torch.float64, device=device)
    valid = _valid_positions(lengths, length)
    calls = 0

    def step(cache: DynamicCache, token: torch.Tensor, position: int) -> torch.Tensor:
        nonlocal calls
        calls += 1
        out = backbone(
            input_ids=token.view(1, 1),
            position_ids=torch.tensor([[position]], device=device),
            past_key_values=cache,
            use_cache=True,
        )
        return out.last_hidden_state[0]

    for b in range(bsz):
        cache = DynamicCache(config=model.config)
        for p in range(int(lengths[b]) - 1):
            hidden = step(cache, input_ids[b, p], p)
            lq, coll, samples = head_stats(hidden, lm_head, input_ids[b, p + 1].view(1), uniforms[b, p, 0].view(1, 2))
            logq[b, p] = lq[0]
            collision[b, p, 0] = coll[0]
            if not valid[b, p]:
                continue
            extra = 0
            for depth in range(1, N_GRAMS):
                if samples[0, 0] != samples[0, 1]:
                    break
                hidden = step(cache, samples[0, 0], p + depth)
                extra += 1
                u = uniforms[b, p, depth].view(1, 2) if depth < STEPS else None
                _, coll, samples = head_stats(hidden, lm_head, None, u)
                collision[b, p, depth] = coll[0]
            if extra:
                cache.crop(-extra)
    return BlockEstimates(_combine(logq, collision, valid), calls)
