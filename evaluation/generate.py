"""Text generation from an exported CALM or baseline model, streamed to the terminal.

    python -m evaluation.generate --model runs/calm-tiny/export --prompt "Once upon a time" \
        [--prompt "..."] [--max-new-tokens 64] [--temperature 0.5] [--sampler exact|batch] [--seed 0]
    bash run.sh generate --model DIR --prompt "..."        (same arguments; one process, one node)

The kind of model is read from DIR/config.json (model_type "energy" = CALM, "llama" = baseline); the
tokenizer is looked for in DIR, DIR/tokenizer, then DIR/.. (or --tokenizer). One prompt streams its
text as it is generated; several prompts run as one batch and print when done. The baseline goes
through transformers' `generate` (pure temperature sampling: no top-k, no top-p); CALM through
`calm_generate`, which samples chunks at temperature T without likelihoods (evaluation/sampling.py).

Every prompt is read as the start of a document: the document separator (EOS; the data packs
documents as `doc <eos> doc <eos>`) is put in front of it for both kinds of model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache

from evaluation.argmax_decode import ArgmaxDecoder, StreamMemory
from evaluation.sampling import batch_sample, exact_sample

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


@torch.no_grad()
def calm_generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    sampler: str = "exact",
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    seed: int = 0,
    num_candidates: int = 200,
    max_draws: int = 1000,
    first_round: int | None = None,
    screened_decode: bool = True,
    on_tokens: TokenCallback | None = None,
) -> GenerationOutput:
    """Sample up to `max_new_tokens` tokens after each prompt (lists of ids, any lengths) from a CALM.

    Each backbone step reads one chunk vector (KV cache: transformers DynamicCache) and yields K
    tokens: the energy head draws latents, the autoencoder decodes them (argmax), and the chosen
    sampler turns draws into a chunk at `temperature` ('exact': exact for any T in (0, 1], capped at
    `max_draws` draws per chunk, `first_round` draws in its first call; 'batch': `num_candidates`
    draws, approximate). Draws are decoded to tokens by `ArgmaxDecoder.decode_draws` (bf16 screen,
    and for most draws a certificate against a screened draw of the same row, kept over the chunk's
    calls in a `StreamMemory`, instead of the full-vocabulary projection; at T = 1/2 the exact
    sampler asks `ArgmaxDecoder.decode_pairs` for the first equal pair of draws instead, which leaves
    most unequal draws undecoded; exact either way; `screened_decode=False` uses `model.decode_latents`).

    Prompts whose length is not a multiple of K: the whole chunks are the context (rows of different
    lengths are left-padded by whole chunks that the attention mask hides, with positions counted
    from each row's first real chunk), and the r < K leftover tokens are a *constraint on the first
    sampled chunk*: draws that do not begin with them are rejected, which samples the model's
    distribution conditioned on the prompt exactly; the first chunk fed back therefore starts with
    the prompt's own tokens and no padding token ever enters the context. (If the cap is hit without
    a matching draw, the leftover tokens overwrite the start of the fallback chunk.)

    EOS: a row stops at its first EOS; later positions hold `pad_token_id`. `on_tokens` receives, after
    every step, each row's newly generated tokens (empty for finished rows).
    """
    if sampler not in ("exact", "batch"):
        raise ValueError(f"sampler must be 'exact' or 'batch', got {sampler!r}")
    if not 0.0 < temperature <= 1.0:
        raise ValueError(f"CALM temperature must be in (0, 1] (likelihood-free sampling sharpens only), got {temperature}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts:
        raise ValueError("no prompts given")
    eos = eos_token_id if eos_token_id is not None else model.config.eos_token_id
    pad = pad_token_id if pad_token_id is not None else (eos if eos is not None else 0)
    k = model.patch_size
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    decoder = ArgmaxDecoder(model) if screened_decode else None

    ids, mask, prefix, prefix_len = (t.to(device) for t in _prepare_context(prompts, k, pad if eos is None else eos))
    b = ids.shape[0]
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    hidden, cache = model.backbone(model.chunk_embeddings(ids), past_key_values=cache, use_cache=True,
                                   attention_mask=mask, position_ids=positions)
    backbone_calls, steps, draws, capped, decoded, calls = 1, 0, 0, 0, 0, 0
    h = hidden[:, -1]
    generated: list[list[int]] = [[] for _ in range(b)]
    finished = [False] * b
    done = torch.zeros(b, dtype=torch.bool, device=device)
    first = True
    while True:
        active = (~done).nonzero().squeeze(-1)
        h_act = h[active]
        memory = StreamMemory(decoder, b) if decoder is not None else None  # references live for one chunk

        def sample_fn(rows: torch.Tensor, num: int) -> torch.Tensor:
            latents = model.sample_latents(h_act[rows], num_samples=num, generator=gen).transpose(0, 1)  # (R, num, l)
            if decoder is None:  # the AE decoder reads the num draws as num time steps
                return model.decode_latents(latents).view(len(rows), num, k)
            return decoder.decode_draws(latents, memory, active[rows])

        def pair_fn(rows: torch.Tensor, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
            latents = model.sample_latents(h_act[rows], num_samples=2 * pairs, generator=gen).transpose(0, 1)
            return decoder.decode_pairs(latents, memory, active[rows])

        constrain = first and bool(prefix_len.any())
        kwargs = dict(generator=gen, device=device,
                      prefix=prefix[active] if constrain else None,
                      prefix_len=prefix_len[active] if constrain else None)
        if sampler == "exact":
            result = exact_sample(sample_fn, len(active), temperature, max_draws=max_draws,
                                  first_round=first_round, pair_fn=pair_fn if decoder is not None else None,
                                  **kwargs)
        else:
            result = batch_sample(sample_fn, len(active), temperature, num_candidates=num_candidates, **kwargs)
        steps += 1
        draws += int(result.draws.sum())
        capped += int(result.capped.sum())
        decoded += result.decoded
        calls += result.calls
        chunk = torch.full((b, k), pad, dtype=torch.long, device=device)
        chunk[active] = result.tokens
        if first:
            keep = torch.arange(k, device=device)[None, :] < prefix_len[:, None]
            chunk = torch.where(keep, prefix, chunk)
        new_tokens = [[] for _ in range(b)]
        skip = prefix_len.tolist() if first else [0] * b
        for row, tokens in zip(active.tolist(), chunk[active].tolist()):
            take = tokens[skip[row]:][: max_new_tokens - len(generated[row])]
            if eos in take:
                take = take[: take.index(eos) + 1]
                finished[row] = True
            generated[row] += take
            new_tokens[row] = take
            if len(generated[row]) == max_new_tokens:
                finished[row] = True
        done = torch.tensor(finished, device=device)
        if on_tokens is not None:
            on_tokens(new_tokens)
        first = False
        if done.all():
            break
        mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
        positions = positions[:, -1:] + 1
        hidden, cache = model.backbone(model.chunk_embeddings(chunk), past_key_values=cache, use_cache=True,
                                       attention_mask=mask, position_ids=positions)
        backbone_calls += 1
        h = hidden[:, -1]
    out = torch.full((b, max_new_tokens), pad, dtype=torch.long)
    for row, tokens in enumerate(generated):
        out[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    lengths = torch.tensor([len(tokens) for tokens in generated])
    return GenerationOutput(sequences=out.to(device), lengths=lengths.to(device), backbone_calls=backbone_calls,
                            steps=steps, draws=draws, capped=capped, decoded=decoded, calls=calls,
                            projected=decoder.projected if decoder is not None else decoded * k)


@torch.no_grad()
def baseline_generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    seed: int = 0,
    streamer=None,
) -> GenerationOutput:
    """Temperature sampling from a `LlamaForCausalLM` through transformers' `generate` (left padding,
    no top-k/top-p, so it samples P^(1/T)/Z like the CALM samplers). One forward pass per token."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    eos = eos_token_id if eos_token_id is not None else model.config.eos_token_id
    pad = pad_token_id if pad_token_id is not None else (eos if eos is not None else 0)
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        attention[row, width - len(p):] = 1
    torch.manual_seed(seed)
    generated = model.generate(
        input_ids=ids.to(device), attention_mask=attention.to(device), max_new_tokens=max_new_tokens,
        do_sample=True, temperature=temperature, top_k=0, top_p=1.0, eos_token_id=eos, pad_token_id=pad,
        streamer=streamer,
    )[:, width:]
    out = torch.full((len(prompts), max_new_tokens), pad, dtype=torch.long, device=device)
    out[:, : generated.shape[1]] = generated
    is_eos = out == eos if eos is not None else torch.zeros_like(out, dtype=torch.bool)
    first_eos = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, generated.shape[1])
    return GenerationOutput(sequences=out, lengths=first_eos, backbone_calls=generated.shape[1],
                            steps=generated.shape[1], draws=0, capped=0)


def find_tokenizer(model_dir: Path, explicit: str | None = None):
    """The tokenizer saved with an export: DIR, DIR/tokenizer or DIR/.. (or an explicit path)."""
    from transformers import AutoTokenizer

    candidates = [Path(explicit)] if explicit else [model_dir, model_dir / "tokenizer", model_dir.parent / "tokenizer",
                                                    model_dir.parent]
    for path in candidates:
        if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(path)
    raise FileNotFoundError(f"no tokenizer (tokenizer.json) in {', '.join(map(str, candidates))}; pass --tokenizer DIR")


def load_generator(model_dir: str | Path, ae_path: str | None = None, device: str = "cpu"):
    """(model, kind) for an exported directory; kind is 'calm' or 'baseline' from its config.json."""
    import pretrain.models  # noqa: F401  (registers the CALM and autoencoder Auto classes)
    from pretrain.models import CALM
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: --model must be an exported model directory")
    model_type = json.loads(config_path.read_text()).get("model_type")
    if model_type == "energy":
        kwargs = {"ae_path": ae_path} if ae_path else {}
        model, kind = CALM.from_pretrained(model_dir, **kwargs), "calm"
    elif model_type == "llama":
        model, kind = AutoModelForCausalLM.from_pretrained(model_dir), "baseline"
    else:
        raise ValueError(f"{config_path}: model_type {model_type!r} is neither a CALM ('energy') nor a baseline ('llama')")
    return model.to(device).eval(), kind


class _TerminalStream:
    """Prints one row's text as tokens arrive: the decoded prompt first, then whatever the decoded
    prompt + generated tokens add to it (re-decoding keeps word boundaries and multi-byte characters
    right). Called by `calm_generate`, and by transformers' `generate` as a streamer (put/end)."""

    def __init__(self, tokenizer, prompt: list[int]):
        self.tokenizer, self.tokens = tokenizer, list(prompt)
        self.printed = tokenizer.decode(self.tokens, skip_special_tokens=True)
        self.prompt_seen = False
        sys.stdout.write(self.printed)
        sys.stdout.flush()

    def __call__(self, new_tokens: list[list[int]]) -> None:
        self.tokens += new_tokens[0]
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # transformers passes the prompt first
            self.prompt_seen = True
            return
        self([value.flatten().tolist()])

    def end(self) -> None:
        sys.stdout.write("\n")
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="exported model directory (CALM or baseline)")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--sampler", choices=("exact", "batch"), default="exact", help="CALM only")
    parser.add_argument("--num-candidates", type=int, default=200, help="CALM batch sampler: draws per chunk")
    parser.add_argument("--max-draws", type=int, default=1000, help="CALM exact sampler: draw cap per chunk")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", help="tokenizer directory if not saved with the model")
    parser.add_argument("--ae-path", help="CALM: autoencoder directory for checkpoints whose config lacks ae_config")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    model_dir = Path(args.model)
    model, kind = load_generator(model_dir, args.ae_path, args.device)
    tokenizer = find_tokenizer(model_dir, args.tokenizer)
    eos = tokenizer.eos_token_id
    boundary = [eos] if eos is not None else []
    prompts = [boundary + tokenizer(p, add_special_tokens=False)["input_ids"] for p in args.prompt]
    stream = _TerminalStream(tokenizer, prompts[0]) if len(prompts) == 1 else None
    start = time.perf_counter()
    if kind == "calm":
        out = calm_generate(model, prompts, args.max_new_tokens, args.temperature, args.sampler, eos,
                            tokenizer.pad_token_id, args.seed, args.num_candidates, args.max_draws, on_tokens=stream)
        if stream is not None:
            stream.end()
    else:
        out = baseline_generate(model, prompts, args.max_new_tokens, args.temperature, eos,
                                tokenizer.pad_token_id, args.seed, streamer=stream)
    seconds = time.perf_counter() - start
    if stream is None:
        for prompt, row, n in zip(prompts, out.sequences, out.lengths):
            print(tokenizer.decode(prompt + row[: int(n)].tolist(), skip_special_tokens=True))
            print("-" * 40)
    total = int(out.lengths.sum())
    extra = f", {out.draws} head draws, {out.capped} capped chunks" if kind == "calm" else ""
    print(f"[{kind}] {total} tokens in {seconds:.2f}s ({total / max(seconds, 1e-9):.1f} tok/s), "
          f"{out.backbone_calls} backbone passes{extra}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
