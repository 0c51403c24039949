"""Likelihood-free temperature sampling over decoded token chunks (docs/method.md §6).

CALM's head gives samples, not probabilities, so temperature T is realised from repeated draws of
the model distribution P over K-token chunks:

- `exact_sample`: P(x)^(1/T)/Z exactly, any T in (0, 1]. With 1/T = n + α: n identical draws (a
  rejection step for P^n), then a Bernoulli factory accepting with probability P(x)^α (draw; equal
  accepts; otherwise restart with probability α/i). A cap on draws per row ends hopeless rows with a
  flagged fallback (the batch rule on that row's last round of draws).
- `batch_select` / `batch_sample`: the authors' approximation — N candidates, a value seen c times
  is chosen with weight C(c, n) (an unbiased estimate of P^n up to the constant C(N, n)), falling back
  to n−1, n−2, … when no value is seen n times; biased for finite N, exact as N → ∞. For fractional
  α the weight is multiplied by the plug-in (c/N)^α.

Both work on a black box `sample_fn(rows, num) -> LongTensor (len(rows), num, K)` returning `num`
independent decoded chunks for each listed batch row, and are vectorised over the batch: duplicates
are counted by sorting each row's candidates (no Python loop over candidates), and rows that are
done stop drawing.

At T = 1/2 (n = 2, α = 0) the exact sampler's state machine reduces to "accept the first of
consecutive pairs of draws that are equal", so it asks `pair_fn(rows, pairs) -> (first (R,), chunk
(R, K))` for the index of each row's first equal pair (-1 if none) and its chunk: a decoder can answer
that without decoding every draw in full (ArgmaxDecoder.decode_pairs). Without a `pair_fn` it is
built from `sample_fn`.

Chunks may be constrained to start with a given prefix (the tail of a prompt whose length is not a
multiple of K): draws whose first `prefix_len` tokens differ are discarded, which samples the
conditional distribution exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

ROUND = 64
"""Most draws per call of `exact_sample`'s state machine (it consumes a round's draws one by one)."""
PAIR_ROUND = 256
"""Most draws per call at T = 1/2, where a round is settled by vectorised pair comparisons. Not more:
a capped row decodes its whole last round for the fallback (about 236 draws at the default cap of
1000, more than the authors' N = 200), and a larger one costs more than the calls it saves."""

SampleFn = Callable[[torch.Tensor, int], torch.Tensor]
PairFn = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
DistinctFn = Callable[[torch.Tensor, int], tuple[torch.Tensor, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]]


@dataclass
class SampleResult:
    """One chunk per batch row, with what it cost."""

    tokens: torch.Tensor
    """(B, K) chosen chunks."""
    draws: torch.Tensor
    """(B,) samples drawn from the model for each row."""
    calls: int
    """Calls to `sample_fn` (each draws for all rows still running)."""
    capped: torch.Tensor
    """(B,) bool: the exact sampler hit `max_draws`; the chunk came from the batch rule instead."""
    matched: torch.Tensor
    """(B,) bool: the chunk honours the prefix constraint (always true without one)."""
    decoded: int = 0
    """Chunks `sample_fn` produced in total, including draws discarded after a row's acceptance."""


def split_temperature(temperature: float) -> tuple[int, float]:
    """1/T = n + α with n ≥ 1 an integer and α in [0, 1); 1/T within 1e-9 of an integer counts as one."""
    if not 0.0 < temperature <= 1.0:
        raise ValueError(f"temperature must be in (0, 1], got {temperature}")
    inverse = 1.0 / temperature
    n = round(inverse)
    if abs(inverse - n) < 1e-9:
        return n, 0.0
    n = math.floor(inverse)
    return n, inverse - n


def prefix_mask(chunks: torch.Tensor, prefix: torch.Tensor | None, prefix_len: torch.Tensor | None) -> torch.Tensor:
    """(R, M) bool: chunk (R, M, K) starts with the row's first prefix_len tokens of prefix (R, K)."""
    if prefix is None:
        return torch.ones(chunks.shape[:2], dtype=torch.bool, device=chunks.device)
    k = chunks.shape[-1]
    free = torch.arange(k, device=chunks.device)[None, :] >= prefix_len[:, None]
    return ((chunks == prefix[:, None, :]) | free[:, None, :]).all(-1)


def duplicate_counts(chunks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, N) how many valid candidates of the row equal each candidate (0 for invalid ones).

    Exact and O(B·N·K·log N): a lexicographic sort of each row (stable argsort per token column,
    least significant first), run boundaries where neighbours differ, run lengths scattered back.
    """
    b, num, k = chunks.shape
    keys = torch.cat([(~valid).long()[..., None], chunks.long()], dim=-1)
    order = torch.arange(num, device=chunks.device).expand(b, num)
    for col in reversed(range(k + 1)):
        column = keys[..., col].gather(1, order)
        order = order.gather(1, column.argsort(dim=1, stable=True))
    ranked = keys.gather(1, order[..., None].expand(-1, -1, k + 1))
    boundary = (ranked[:, 1:] != ranked[:, :-1]).any(-1)
    run = torch.cat([boundary.new_zeros(b, 1), boundary], dim=1).long().cumsum(1)
    sizes = torch.zeros(b, num, dtype=torch.long, device=chunks.device).scatter_add_(1, run, torch.ones_like(run))
    counts = torch.empty_like(run).scatter_(1, order, sizes.gather(1, run))
    return counts * valid


def batch_select(
    chunks: torch.Tensor,
    temperature: float,
    valid: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one of N candidates per row by the duplicate-count rule.

    chunks (B, N, K); valid (B, N) bool marks usable candidates (rows without any use all).
    Returns (index (B,) into N, level (B,)): level is the n actually used (< n after fallback).
    """
    n, alpha = split_temperature(temperature)
    b, num, _ = chunks.shape
    if valid is None:
        valid = torch.ones(b, num, dtype=torch.bool, device=chunks.device)
    valid = valid | ~valid.any(-1, keepdim=True)
    counts = duplicate_counts(chunks, valid)
    level = counts.max(-1).values.clamp(max=n)
    c = counts.to(torch.float64)
    lv = level[:, None].to(torch.float64)
    # per value C(c, level)·(c/N)^α, shared among its c copies -> per candidate C(c, level)·(c/N)^α / c
    log_w = (
        torch.lgamma(c + 1) - torch.lgamma(lv + 1) - torch.lgamma((c - lv).clamp(min=0) + 1)
        + alpha * torch.log(c / valid.sum(-1, keepdim=True)) - torch.log(c)
    )
    log_w = log_w.masked_fill(counts < level[:, None], -math.inf)
    u = torch.rand(log_w.shape, generator=generator, dtype=torch.float64, device=chunks.device)
    gumbel = -torch.log(-torch.log(u.clamp(min=1e-300)))
    return (log_w + gumbel).argmax(-1), level


def _gather(chunks: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return chunks[torch.arange(chunks.shape[0], device=chunks.device), index]


def batch_sample(
    sample_fn: SampleFn,
    batch_size: int,
    temperature: float,
    num_candidates: int = 200,
    generator: torch.Generator | None = None,
    prefix: torch.Tensor | None = None,
    prefix_len: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> SampleResult:
    """Draw `num_candidates` chunks per row in one call and pick one with `batch_select`.
    At T = 1 without a prefix a single draw is the exact answer, so only one is drawn."""
    rows = torch.arange(batch_size, device=device)
    num = 1 if (temperature == 1.0 and prefix is None) else num_candidates
    chunks = sample_fn(rows, num)
    valid = prefix_mask(chunks, prefix, prefix_len)
    index, _ = batch_select(chunks, temperature, valid, generator)
    return SampleResult(
        tokens=_gather(chunks, index),
        draws=torch.full((batch_size,), num, dtype=torch.long, device=device),
        calls=1,
        capped=torch.zeros(batch_size, dtype=torch.bool, device=device),
        matched=_gather(valid, index) & valid.any(-1),
        decoded=batch_size * num,
    )


def first_equal_pair(chunks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunks (R, P, 2, K) -> (index (R,) of each row's first pair of equal chunks, -1 if none; that
    chunk (R, K), zeros if none)."""
    equal = (chunks[:, :, 0] == chunks[:, :, 1]).all(-1)
    first = torch.where(equal.any(1), equal.long().argmax(1), -1)
    chunk = _gather(chunks[:, :, 0], first.clamp(min=0))
    return first, torch.where((first >= 0)[:, None], chunk, 0)


def _pair_sample(sample_fn: SampleFn, pair_fn: PairFn, batch_size: int, max_draws: int,
                 generator: torch.Generator | None, first_round: int | None, max_round: int,
                 device: torch.device | str, distinct_fn: DistinctFn | None = None) -> SampleResult:
    """`exact_sample` at T = 1/2: rounds of draw pairs (two, then doubling), each row accepting its
    first equal pair.
    A round in which a row would reach `max_draws` decodes every draw (`sample_fn`), or as much of each
    as duplicate counts need (`distinct_fn`: chunks whose undecoded tail is unique to the draw, and a
    function finishing chosen ones): capped rows take `batch_select` over that round."""
    # Two pairs by default: a call's fixed costs (head, decoder, a screening pass over the vocabulary)
    # outweigh a second pair's, and one pair alone is accepted only with probability Σ P(x)².
    pairs = max(1, (first_round or 4) // 2)
    tokens: torch.Tensor | None = None
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)
    draws = torch.zeros(batch_size, dtype=torch.long, device=device)
    capped = torch.zeros(batch_size, dtype=torch.bool, device=device)
    calls = decoded = 0
    while not done.all():
        rows = (~done).nonzero().squeeze(-1)
        room = int((max_draws - draws[rows]).min()) // 2  # whole pairs left before the cap
        num = max(1, min(pairs, room))
        last = num >= room
        if last:
            chunks, finish = (distinct_fn(rows, 2 * num) if distinct_fn is not None
                              else (sample_fn(rows, 2 * num), None))
            first, chunk = first_equal_pair(chunks.unflatten(1, (num, 2)))
        else:
            first, chunk = pair_fn(rows, num)
        calls += 1
        decoded += len(rows) * 2 * num
        if tokens is None:
            tokens = torch.zeros(batch_size, chunk.shape[-1], dtype=chunk.dtype, device=device)
        accept = first >= 0
        draws[rows] += torch.where(accept, 2 * (first + 1), 2 * num)
        tokens[rows[accept]] = chunk[accept]
        done[rows[accept]] = True
        hit = ~accept & last  # the round that reached the cap decoded every draw (`chunks`)
        if hit.any():
            r = rows[hit]
            index, _ = batch_select(chunks[hit], 0.5, generator=generator)
            tokens[r] = finish(hit.nonzero().squeeze(1), index) if finish else _gather(chunks[hit], index)
            capped[r] = done[r] = True
        pairs = min(2 * pairs, max(1, max_round // 2))
    return SampleResult(tokens=tokens, draws=draws, calls=calls, capped=capped,
                        matched=torch.ones(batch_size, dtype=torch.bool, device=device), decoded=decoded)


class _ExactRows:
    """The per-row state of `exact_sample`'s state machine (module docstring) and its outcome.

    Step 1 counts identical draws of a candidate x (`run`); with α > 0, n of them enter the Bernoulli
    factory (`loop_i` = i ≥ 1): a draw equal to x accepts, another restarts with probability α / i.
    Draws that miss the prefix constraint (`usable` false) are counted but change nothing.
    """

    def __init__(self, batch_size: int, prefix: torch.Tensor | None, device: torch.device | str):
        self.device = device
        self.tokens = prefix.clone() if prefix is not None else None
        self.kept: torch.Tensor | None = None  # candidate x per row (B, K)
        self.run = torch.zeros(batch_size, dtype=torch.long, device=device)  # identical draws so far (step 1)
        self.loop_i = torch.zeros(batch_size, dtype=torch.long, device=device)  # factory index i, 0 = step 1
        self.done = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.draws = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.capped = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.matched = torch.ones(batch_size, dtype=torch.bool, device=device)

    def allocate(self, chunks: torch.Tensor) -> None:
        """Sizes the chunk state from the first round of draws (K and the token dtype are known then)."""
        if self.kept is None:
            self.kept = torch.zeros(len(self.done), chunks.shape[-1], dtype=chunks.dtype, device=self.device)
            if self.tokens is None:
                self.tokens = self.kept.clone()

    def consume(self, rows: torch.Tensor, draw: torch.Tensor, usable: torch.Tensor, n: int, alpha: float,
                generator: torch.Generator | None) -> bool:
        """Feeds one draw (R, K) to each of `rows` still running; usable (R,) says it honours the prefix.
        Returns False when none of them was running any more."""
        live = ~self.done[rows]
        if not live.any():
            return False
        r = rows[live]
        d = draw[live]
        ok = usable[live]
        self.draws[r] += 1
        x = self.kept[r]
        same = (d == x).all(-1)
        i = self.loop_i[r]
        c = self.run[r]
        in_factory = i > 0
        # step 1: the first draw of an attempt becomes x; a different one ends the attempt
        start = ok & ~in_factory & (c == 0)
        grow = ok & ~in_factory & (c > 0) & same
        c = torch.where(start | grow, c + 1, torch.where(ok & ~in_factory, 0, c))
        x = torch.where(start[:, None], d, x)
        # step 2: equal accepts; otherwise restart with probability α / i
        u = torch.rand(r.shape, generator=generator, device=self.device)
        restart = ok & in_factory & ~same & (u < alpha / i.clamp(min=1))
        accept = (ok & in_factory & same) | (~in_factory & (c == n) & (alpha == 0))
        enter = ~in_factory & (c == n) & (alpha > 0)
        i = torch.where(enter, 1, torch.where(restart, 0, torch.where(ok & in_factory, i + 1, i)))
        c = torch.where(restart, 0, c)
        self.kept[r], self.run[r], self.loop_i[r] = x, c, i
        self.tokens[r] = torch.where(accept[:, None], x, self.tokens[r])
        self.done[r] |= accept
        return True

    def cap(self, rows: torch.Tensor, chunks: torch.Tensor, usable: torch.Tensor, temperature: float,
            max_draws: int, generator: torch.Generator | None) -> None:
        """Rows of `rows` that reached `max_draws` unaccepted take `batch_select` over this round's draws."""
        hit = ~self.done[rows] & (self.draws[rows] >= max_draws)
        if hit.any():
            r = rows[hit]
            index, _ = batch_select(chunks[hit], temperature, usable[hit], generator)
            self.tokens[r] = _gather(chunks[hit], index)
            self.matched[r] = _gather(usable[hit], index) & usable[hit].any(-1)
            self.capped[r] = True
            self.done[r] = True


def exact_sample(
    sample_fn: SampleFn,
    batch_size: int,
    temperature: float,
    max_draws: int = 1000,
    generator: torch.Generator | None = None,
    prefix: torch.Tensor | None = None,
    prefix_len: torch.Tensor | None = None,
    first_round: int | None = None,
    max_round: int | None = None,
    device: torch.device | str = "cpu",
    pair_fn: PairFn | None = None,
    distinct_fn: DistinctFn | None = None,
) -> SampleResult:
    """Exact temperature sampling, one chunk per row, at most `max_draws` model draws per row.

    Draws come in rounds: each call asks `sample_fn` for m chunks per unfinished row (m starts at
    `first_round`, by default the minimum an acceptance needs, n, +1 when α > 0; always 1 at T = 1
    without a prefix; then doubling up to `max_round`, by default 64, or 256 at T = 1/2, whose rounds
    are compared vectorised: large rounds there amortise each call's fixed cost over many draws, and
    doubling wastes at most about as many draws as it uses), and the
    per-row state machine consumes them in order, so batching draws changes cost, not the
    distribution (draws after a row's acceptance are discarded unseen). Rows reaching `max_draws`
    are `capped` and take `batch_select` over their last round instead. At T = 1/2 without a prefix
    the rounds are of pairs, answered by `pair_fn` (module docstring), and the last round by
    `distinct_fn` where given (`_pair_sample`).
    """
    n, alpha = split_temperature(temperature)
    if n == 2 and alpha == 0 and prefix is None and max_draws >= 2:
        if pair_fn is None:
            def pair_fn(rows: torch.Tensor, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
                return first_equal_pair(sample_fn(rows, 2 * pairs).unflatten(1, (pairs, 2)))
        return _pair_sample(sample_fn, pair_fn, batch_size, max_draws, generator, first_round,
                            max_round or PAIR_ROUND, device, distinct_fn)
    max_round = max_round or ROUND
    m = first_round or (n + (1 if alpha > 0 else 0))
    if n == 1 and alpha == 0 and prefix is None:
        m = 1  # T = 1: the first draw is always accepted
    state = _ExactRows(batch_size, prefix, device)
    calls = decoded = 0
    while not state.done.all():
        rows = (~state.done).nonzero().squeeze(-1)
        room = int((max_draws - state.draws[rows]).min())
        num = max(1, min(m, room))
        chunks = sample_fn(rows, num)
        calls += 1
        decoded += len(rows) * num
        state.allocate(chunks)
        sub_prefix = prefix[rows] if prefix is not None else None
        sub_len = prefix_len[rows] if prefix_len is not None else None
        usable = prefix_mask(chunks, sub_prefix, sub_len)
        for j in range(num):
            if not state.consume(rows, chunks[:, j], usable[:, j], n, alpha, generator):
                break
        state.cap(rows, chunks, usable, temperature, max_draws, generator)
        m = min(2 * m, max_round)
    return SampleResult(tokens=state.tokens, draws=state.draws, calls=calls, capped=state.capped,
                        matched=state.matched, decoded=decoded)
