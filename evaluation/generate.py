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
import sys
import time
from pathlib import Path

import torch

from evaluation.export_dir import find_tokenizer_dir, load_generator
from evaluation.generation import baseline_generate, calm_generate
from evaluation.terminal_stream import TerminalStream


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
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    model_dir = Path(args.model)
    model, kind = load_generator(model_dir, args.ae_path, args.device)
    tokenizer = AutoTokenizer.from_pretrained(find_tokenizer_dir(model_dir, args.tokenizer))
    eos = tokenizer.eos_token_id
    boundary = [eos] if eos is not None else []
    prompts = [boundary + tokenizer(p, add_special_tokens=False)["input_ids"] for p in args.prompt]
    stream = TerminalStream(tokenizer, prompts[0]) if len(prompts) == 1 else None
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
