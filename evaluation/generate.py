"""Text generation from an exported CALM or baseline model, streamed to the terminal.

    python -m evaluation.generate --model runs/calm-tiny/export --prompt "Once upon a time" \
        [--prompt "..."] [--max-new-tokens 64] [--temperature 0.5] [--sampler exact|batch] [--seed 0]
    bash run.sh generate --model DIR --prompt "..."        (same arguments; one process, one node)

The kind of model is read from DIR/config.json (model_type "energy" = CALM, "llama" = baseline); the
tokenizer is looked for in DIR, DIR/tokenizer, then DIR/.. (or --tokenizer). One prompt streams its
text as it is generated; several prompts run as one batch and print when done. The baseline goes
through transformers' `generate` (pure temperature sampling: no top-k, no top-p); CALM through its own
`generate()` (the same interface), which samples chunks at temperature T without likelihoods
(pretrain/models/sampling.py): exactly, unless a chunk needs more than --max-draws head draws ("capped"):
that chunk is then chosen by the batch rule among the draws made so far.

Every prompt is read as the start of a document: the document separator (EOS; the data packs
documents as `doc <eos> doc <eos>`) is put in front of it for both kinds of model.

Models fine-tuned on prompt/response data take `--prompt-alignment left_pad`: the prompt (EOS in
front) is left-padded with the pad token to a multiple of K exactly as `data_prep --finetune` aligned
it (`data_prep.finetune.left_pad`); K is a CALM's patch size, and for the baseline `--patch-size`
(the --patch-size its fine-tuning data was prepared with).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from data_prep.finetune import left_pad
from evaluation.export_dir import find_tokenizer_dir, load_generator
from evaluation.terminal_stream import TerminalStream


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="exported model directory (CALM or baseline)")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.5,
                        help="sampling temperature: (0, 1] for CALM (exact), > 0 for the baseline")
    parser.add_argument("--sampler", choices=("exact", "batch"), default="exact",
                        help="CALM only: 'exact' samples P^(1/T) exactly; 'batch' is the authors' approximation")
    parser.add_argument("--num-candidates", type=int, default=200, help="CALM batch sampler: draws per chunk")
    parser.add_argument("--max-draws", type=int, default=1000,
                        help="CALM exact sampler: draws per chunk before it is 'capped', i.e. falls back to the "
                             "batch rule over the draws made so far (counted in the summary line)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", help="tokenizer directory if not saved with the model")
    parser.add_argument("--ae-path", help="CALM: autoencoder directory for checkpoints whose config lacks ae_config")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompt-alignment", choices=("constrain", "left_pad"), default="constrain",
                        help="left_pad: align prompts as fine-tuning data was (data_prep --finetune)")
    parser.add_argument("--patch-size", type=int, default=4,
                        help="baseline with --prompt-alignment left_pad: the K its fine-tuning data was aligned to")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.temperature > 0:
        parser.error(f"--temperature must be > 0 (CALM: in (0, 1]), got {args.temperature}")
    for name in ("num_candidates", "max_draws"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def _batch(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (input_ids, attention_mask), as transformers' generate expects."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids, mask


def generate(model, kind: str, tokenizer, prompts: list[list[int]], args, stream) -> tuple[torch.Tensor, str]:
    """The model's own `generate()` for both kinds; returns (new tokens (B, N), a cost note for CALM)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = _batch(prompts, pad)
    ids, mask = ids.to(args.device), mask.to(args.device)
    common = dict(max_new_tokens=args.max_new_tokens, do_sample=True, temperature=args.temperature,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=pad, streamer=stream)
    if kind == "calm":
        out = model.generate(ids, attention_mask=mask, seed=args.seed, sampler=args.sampler,
                             max_draws=args.max_draws, num_candidates=args.num_candidates,
                             return_dict_in_generate=True, **common)
        return out.new_tokens, f", {out.draws} head draws, {out.capped} capped chunks, {out.backbone_calls} backbone passes"
    limit = model.config.max_position_embeddings
    if ids.shape[1] + args.max_new_tokens > limit:
        raise ValueError(f"a prompt of {ids.shape[1]} tokens plus {args.max_new_tokens} new tokens exceeds the "
                         f"model's {limit} positions: shorten the prompt or --max-new-tokens")
    torch.manual_seed(args.seed)
    out = model.generate(ids, attention_mask=mask, top_k=0, top_p=1.0, **common)
    return out[:, ids.shape[1]:], ""


def _lengths(new: torch.Tensor, eos: int | None) -> list[int]:
    """Tokens up to and including each row's first EOS."""
    rows = new.tolist()
    return [row.index(eos) + 1 if eos in row else len(row) for row in rows]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    try:
        model_dir = Path(args.model)
        model, kind = load_generator(model_dir, args.ae_path, args.device)
        tokenizer = AutoTokenizer.from_pretrained(find_tokenizer_dir(model_dir, args.tokenizer))
        if kind == "calm" and args.temperature > 1:
            raise ValueError(f"CALM samples at temperatures in (0, 1], got --temperature {args.temperature}")
        eos = tokenizer.eos_token_id
        boundary = [eos] if eos is not None else []
        prompts = [boundary + tokenizer(p, add_special_tokens=False)["input_ids"] for p in args.prompt]
        if args.prompt_alignment == "left_pad":
            k = model.config.patch_size if kind == "calm" else args.patch_size
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
            prompts = [left_pad(p, k, pad) for p in prompts]
        stream = TerminalStream(tokenizer, prompts[0]) if len(prompts) == 1 else None
        start = time.perf_counter()
        new, note = generate(model, kind, tokenizer, prompts, args, stream)
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    lengths = _lengths(new, eos)
    if stream is None:
        for prompt, row, n in zip(prompts, new.tolist(), lengths):
            print(tokenizer.decode(prompt + row[:n], skip_special_tokens=True))
            print("-" * 40)
    total = sum(lengths)
    print(f"[{kind}] {total} tokens in {seconds:.2f}s ({total / max(seconds, 1e-9):.1f} tok/s){note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
