"""The generation algorithms: `calm_generate` (a CALM, K tokens per backbone step) and
`baseline_generate` (a Llama baseline through transformers' `generate`), both returning a
`GenerationOutput` with the generated ids and what they cost.

Apart from the command line (evaluation/generate.py) because evaluation's speed measurement,
bench/generate.py and the tests run them on models already in memory.

CALM prompts whose length is not a multiple of K: the whole chunks are the context (rows of
different lengths are left-padded by whole chunks that the attention mask hides, with positions
counted from each row's first real chunk), and the r < K leftover tokens are a *constraint on the
first sampled chunk*: draws that do not begin with them are rejected, which samples the model's
distribution conditioned on the prompt exactly; the first chunk fed back therefore starts with the
prompt's own tokens and no padding token ever enters the context. (If the cap is hit without a
matching draw, the leftover tokens overwrite the start of the fallback chunk.)

Models fine-tuned on prompt/response data (data_prep/finetune.py) saw every prompt left-padded with
the pad token to a multiple of K; `prompt_alignment="left_pad"` aligns prompts the same way
(`left_pad`) before the rule above, which then finds no leftover tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .argmax_decode import ArgmaxDecoder, StreamMemory
from .sampling import SampleResult, batch_sample, exact_sample

TokenCallback = Callable[[list[list[int]]], None]


@dataclass
class GenerationOutput:
    sequences: torch.Tensor
    """(B, max_new_tokens) generated ids; `pad_token_id` after a row's EOS or end."""
    lengths: torch.Tensor
    """(B,) generated tokens per row, EOS included."""
    backbone_calls: int
    """Forward passes of the backbone (the prompt's prefill counts as one)."""
    steps: int
    """Chunks sampled (backbone steps after the prefill)."""
    draws: int
    """Head samples decoded in total (over all rows and steps)."""
    capped: int
    """Chunks where the exact sampler hit its draw cap and used the batch rule instead."""
    decoded: int = 0
    """Head samples decoded to tokens (≥ draws: a round's draws after a row's acceptance are wasted)."""
    calls: int = 0
    """Head + decoder calls (each one batched over the rows still sampling)."""
    projected: int = 0
    """Chunk positions decoded through the full-vocabulary projection (the rest were certified cheaply)."""


PROMPT_ALIGNMENTS = ("constrain", "left_pad")


def left_pad(ids: list[int], k: int, pad: int) -> list[int]:
    """The prompt alignment of fine-tuning data: `pad` on the left up to a multiple of `k` tokens.

    A copy of `data_prep.finetune.left_pad` (this file travels with exported models and may import
    nothing of the repository); tests/data_prep/test_finetune.py checks that the two agree."""
    return [pad] * (-len(ids) % k) + list(ids)


def align_prompts(prompts: list[list[int]], alignment: str, k: int, pad: int, eos: int | None = None) -> list[list[int]]:
    """`prompts` as the model reads them under `alignment` (one of PROMPT_ALIGNMENTS). "left_pad" also
    puts the EOS that fine-tuning blocks carry before every prompt (the document separator) in front
    of a prompt that does not begin with it, so a plain-text prompt is read exactly as in training."""
    if alignment not in PROMPT_ALIGNMENTS:
        raise ValueError(f"prompt_alignment must be one of {PROMPT_ALIGNMENTS}, got {alignment!r}")
    if alignment != "left_pad":
        return prompts
    starts = [p if eos is None or p[:1] == [eos] else [eos, *p] for p in prompts]
    return [left_pad(p, k, pad) for p in starts]


def special_ids(model, eos_token_id: int | None, pad_token_id: int | None) -> tuple[int | None, int]:
    """(eos, pad): EOS defaults to the model config's; padding to EOS, or 0 without one."""
    eos = eos_token_id if eos_token_id is not None else model.config.eos_token_id
    pad = pad_token_id if pad_token_id is not None else (eos if eos is not None else 0)
    return eos, pad


def _check_calm_args(prompts: list[list[int]], max_new_tokens: int, temperature: float, sampler: str) -> None:
    if sampler not in ("exact", "batch"):
        raise ValueError(f"sampler must be 'exact' or 'batch', got {sampler!r}")
    if not 0.0 < temperature <= 1.0:
        raise ValueError(f"CALM temperature must be in (0, 1] (likelihood-free sampling sharpens only), got {temperature}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts:
        raise ValueError("no prompts given")


def _prepare_context(prompts: list[list[int]], k: int, filler: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split each prompt into whole chunks and a remainder of r < K tokens.

    Returns (ids (B, Q*K) whole chunks right-aligned, chunk mask (B, Q) with 0 for padding chunks,
    prefix (B, K) holding each remainder, prefix_len (B,) = r). Prompts shorter than K get `filler`
    tokens (the document separator) in front: the backbone needs one whole chunk to read.
    """
    rows = [p if len(p) >= k else [filler] * (k - len(p)) + p for p in prompts]
    whole = [len(p) // k for p in rows]
    q = max(whole)
    ids = torch.full((len(rows), q * k), filler, dtype=torch.long)
    mask = torch.zeros(len(rows), q, dtype=torch.long)
    prefix = torch.full((len(rows), k), filler, dtype=torch.long)
    prefix_len = torch.zeros(len(rows), dtype=torch.long)
    for b, (p, n) in enumerate(zip(rows, whole)):
        if n:
            ids[b, (q - n) * k:] = torch.tensor(p[: n * k])
            mask[b, q - n:] = 1
        r = len(p) - n * k
        if r:
            prefix[b, :r] = torch.tensor(p[n * k:])
        prefix_len[b] = r
    return ids, mask, prefix, prefix_len


def _read_chunks(model, ids: torch.Tensor, cache: DynamicCache, mask: torch.Tensor,
                 positions: torch.Tensor) -> tuple[torch.Tensor, DynamicCache]:
    """One backbone pass over the chunks `ids` (B, n·K) after those in `cache`; returns (the last
    position's hidden state (B, H), the cache)."""
    hidden, cache = model.backbone(model.chunk_embeddings(ids), past_key_values=cache, use_cache=True,
                                   attention_mask=mask, position_ids=positions)
    return hidden[:, -1], cache


class _ChunkSampler:
    """One K-token chunk for each active row from the hidden states: the energy head draws latents,
    they are decoded to tokens (argmax), and the chosen sampler turns draws into a chunk at the
    temperature.

    Decoding goes through `ArgmaxDecoder.decode_draws` (bf16 screen, and for most draws a certificate
    against a screened draw of the same row, kept over the chunk's calls in a `StreamMemory`, instead
    of the full-vocabulary projection); at T = 1/2 the exact sampler asks `ArgmaxDecoder.decode_pairs`
    for the first equal pair of draws instead, which leaves most unequal draws undecoded. Exact
    either way; without a decoder (`screened_decode=False`) `model.decode_latents` decodes every draw.
    """

    def __init__(self, model, batch_size: int, sampler: str, temperature: float, generator: torch.Generator,
                 decoder: ArgmaxDecoder | None, num_candidates: int, max_draws: int, first_round: int | None):
        self.model, self.batch_size, self.sampler, self.temperature = model, batch_size, sampler, temperature
        self.generator, self.decoder = generator, decoder
        self.num_candidates, self.max_draws, self.first_round = num_candidates, max_draws, first_round
        self.device = next(model.parameters()).device

    def __call__(self, h_act: torch.Tensor, active: torch.Tensor, prefix: torch.Tensor | None,
                 prefix_len: torch.Tensor | None) -> SampleResult:
        model, gen, decoder, k = self.model, self.generator, self.decoder, self.model.patch_size
        # references live for one chunk
        memory = StreamMemory(decoder, self.batch_size) if decoder is not None else None

        def sample_fn(rows: torch.Tensor, num: int) -> torch.Tensor:
            latents = model.sample_latents(h_act[rows], num_samples=num, generator=gen).transpose(0, 1)  # (R, num, l)
            if decoder is None:  # the AE decoder reads the num draws as num time steps
                return model.decode_latents(latents).view(len(rows), num, k)
            return decoder.decode_draws(latents, memory, active[rows])

        def pair_fn(rows: torch.Tensor, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
            latents = model.sample_latents(h_act[rows], num_samples=2 * pairs, generator=gen).transpose(0, 1)
            return decoder.decode_pairs(latents, memory, active[rows])

        def distinct_fn(rows: torch.Tensor, num: int):
            latents = model.sample_latents(h_act[rows], num_samples=num, generator=gen).transpose(0, 1)
            return decoder.decode_distinct(latents, memory, active[rows])

        kwargs = dict(generator=gen, device=self.device, prefix=prefix, prefix_len=prefix_len)
        if self.sampler == "exact":
            return exact_sample(sample_fn, len(active), self.temperature, max_draws=self.max_draws,
                                first_round=self.first_round, pair_fn=pair_fn if decoder is not None else None,
                                distinct_fn=distinct_fn if decoder is not None else None, **kwargs)
        return batch_sample(sample_fn, len(active), self.temperature, num_candidates=self.num_candidates, **kwargs)


@dataclass
class _Cost:
    """The running counts that end up in `GenerationOutput`."""

    backbone_calls: int = 1  # the prefill
    steps: int = 0
    draws: int = 0
    capped: int = 0
    decoded: int = 0
    calls: int = 0

    def add(self, result: SampleResult) -> None:
        self.steps += 1
        self.draws += int(result.draws.sum())
        self.capped += int(result.capped.sum())
        self.decoded += result.decoded
        self.calls += result.calls


def _fed_back_chunk(tokens: torch.Tensor, active: torch.Tensor, batch_size: int, pad: int,
                    prefix: torch.Tensor | None, prefix_len: torch.Tensor) -> torch.Tensor:
    """(B, K) the chunk the backbone reads next: the sampled chunks of the active rows, `pad` for
    finished rows; on the first step (`prefix` given) each prompt remainder overwrites the start."""
    k, device = tokens.shape[-1], prefix_len.device
    chunk = torch.full((batch_size, k), pad, dtype=torch.long, device=device)
    chunk[active] = tokens
    if prefix is not None:
        keep = torch.arange(k, device=device)[None, :] < prefix_len[:, None]
        chunk = torch.where(keep, prefix, chunk)
    return chunk


def _append_new_tokens(chunk: torch.Tensor, active: torch.Tensor, skip: list[int], generated: list[list[int]],
                       finished: list[bool], eos: int | None, max_new_tokens: int) -> list[list[int]]:
    """Adds each active row's chunk, less its first `skip[row]` tokens (the prompt's remainder), to
    `generated`, up to its first EOS and `max_new_tokens`, and marks rows that end so in `finished`.
    Returns each row's newly generated tokens (empty for finished rows)."""
    new_tokens = [[] for _ in range(len(generated))]
    for row, tokens in zip(active.tolist(), chunk[active].tolist()):
        take = tokens[skip[row]:][: max_new_tokens - len(generated[row])]
        if eos in take:
            take = take[: take.index(eos) + 1]
            finished[row] = True
        generated[row] += take
        new_tokens[row] = take
        if len(generated[row]) == max_new_tokens:
            finished[row] = True
    return new_tokens


def _padded(generated: list[list[int]], max_new_tokens: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequences (B, max_new_tokens) filled up with `pad`, lengths (B,))."""
    out = torch.full((len(generated), max_new_tokens), pad, dtype=torch.long)
    for row, tokens in enumerate(generated):
        out[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return out, torch.tensor([len(tokens) for tokens in generated])


@torch.no_grad()
def calm_generate(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                  sampler: str = "exact", eos_token_id: int | None = None, pad_token_id: int | None = None,
                  seed: int = 0, num_candidates: int = 200, max_draws: int = 1000, first_round: int | None = None,
                  screened_decode: bool = True, on_tokens: TokenCallback | None = None,
                  prompt_alignment: str = "constrain") -> GenerationOutput:
    """Sample up to `max_new_tokens` tokens after each prompt (lists of ids, any lengths) from a CALM.

    Each backbone step reads one chunk vector (KV cache: transformers DynamicCache) and yields K
    tokens (`_ChunkSampler`) at `temperature` ('exact': exact for any T in (0, 1], capped at
    `max_draws` draws per chunk, `first_round` draws in its first call; 'batch': `num_candidates`
    draws, approximate). Prompt remainders shorter than K: see the module docstring.

    EOS: a row stops at its first EOS; later positions hold `pad_token_id`. `on_tokens` receives, after
    every step, each row's newly generated tokens (empty for finished rows). `prompt_alignment=
    "left_pad"`: prompts are first left-padded with `pad_token_id` to a multiple of K, as fine-tuning
    data is (module docstring).
    """
    _check_calm_args(prompts, max_new_tokens, temperature, sampler)
    eos, pad = special_ids(model, eos_token_id, pad_token_id)
    prompts = align_prompts(prompts, prompt_alignment, model.patch_size, pad, eos)
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    decoder = ArgmaxDecoder(model) if screened_decode else None

    ids, mask, prefix, prefix_len = (t.to(device) for t in _prepare_context(prompts, model.patch_size,
                                                                            pad if eos is None else eos))
    b = ids.shape[0]
    sample_chunk = _ChunkSampler(model, b, sampler, temperature, gen, decoder, num_candidates, max_draws, first_round)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    h, cache = _read_chunks(model, ids, DynamicCache(config=model.config), mask, positions)
    cost = _Cost()
    generated: list[list[int]] = [[] for _ in range(b)]
    finished = [False] * b
    done = torch.zeros(b, dtype=torch.bool, device=device)
    first = True
    while True:
        active = (~done).nonzero().squeeze(-1)
        constrain = first and bool(prefix_len.any())
        result = sample_chunk(h[active], active, prefix[active] if constrain else None,
                              prefix_len[active] if constrain else None)
        cost.add(result)
        chunk = _fed_back_chunk(result.tokens, active, b, pad, prefix if first else None, prefix_len)
        skip = prefix_len.tolist() if first else [0] * b
        new_tokens = _append_new_tokens(chunk, active, skip, generated, finished, eos, max_new_tokens)
        done = torch.tensor(finished, device=device)
        if on_tokens is not None:
            on_tokens(new_tokens)
        first = False
        if done.all():
            break
        mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
        positions = positions[:, -1:] + 1
        h, cache = _read_chunks(model, chunk, cache, mask, positions)
        cost.backbone_calls += 1
    out, lengths = _padded(generated, max_new_tokens, pad)
    return GenerationOutput(sequences=out.to(device), lengths=lengths.to(device), backbone_calls=cost.backbone_calls,
                            steps=cost.steps, draws=cost.draws, capped=cost.capped, decoded=cost.decoded,
                            calls=cost.calls,
                            projected=decoder.projected if decoder is not None else cost.decoded * model.patch_size)
