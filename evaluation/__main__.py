"""Evaluate exported models on documents or shards: BrierLM (CALM, baseline), AE fidelity (autoencoder).

    python -m evaluation --model runs/baseline-tiny runs/calm-tiny runs/ae-tiny \\
        --data wikitext103_test.jsonl       # WikiText-103 test documents, JSONL of {"text": ...}
    python -m evaluation --model runs/calm-tiny --data data/quickstart --split validation --max-blocks 8 \\
        --gen-tokens 64 --gen-batch 4          # also time sampling (the report's gen tokens/s)
    torchrun --nproc_per_node 8 -m evaluation --model runs/calm-m --data wiki.jsonl         # one node
    torchrun --nnodes 2 --node_rank $R --nproc_per_node 8 --master_addr $HEAD --master_port 29500 \\
        -m evaluation --model runs/calm-m --data wiki.jsonl                                   # two nodes
    bash run.sh eval ...            (NPROC / NNODES / ... pick the launcher, see run.sh)

--model takes run directories (their `export/` is evaluated and `metrics.jsonl` found by the report)
or exported directories. --data is a `.jsonl` file of {"text": ...} documents, any other file (one
plain-text document), or a data_prep output directory (its `--split`). Documents are tokenised with
the model's own tokenizer (saved in every export; `--tokenizer` overrides). The context defaults
to the block length the model was trained on (the paper's 2048 tokens, CALM 2048·K, only for models
without a training record); a context past the model's positions is refused (`--allow-long-context`
measures it anyway and marks the result). Every `--model` is checked before any is evaluated.
Document files are cut per document (`--protocol documents`) or as the authors do, one stream across
documents (`--protocol stream`). The result records the protocol, the context and where it came
from, the data's sha256 and the tokenizer's. Under torchrun each rank takes every world_size-th block and the sums are all-reduced; rank r
draws its randomness from seed + r. One JSON result per model (schema: `evaluation.results`) goes to
`--out` (one model only) or `RUN/eval/<data>-ctx<context>.json`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import torch

from data_prep.manifest import check_vocab
from evaluation.plan import Plan, file_sha256, plan_model
from evaluation import documents as docs
from pretrain.brier.brier_stats import BrierAccumulator
from pretrain.brier.brierlm import baseline_brier_batched
from pretrain.brier.calm_brier import CALMSampler, calm_brier
from evaluation.reconstruction import DEFAULT_NOISE_STDS, reconstruction_eval
from evaluation.results import SCHEMA, write_result
from pretrain import distributed
from pretrain.models.flops import train_flops_per_token
from pretrain.stages import get_stage, load_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__.split("\n")[0])
    p.add_argument("--model", nargs="+", required=True, help="run or export directories")
    p.add_argument("--data", required=True, help=".jsonl / text file of documents, or a data_prep directory")
    p.add_argument("--split", default="validation", help="split of a data_prep directory (default: validation)")
    p.add_argument("--text-key", default="text", help="JSON field holding a document's text (default: text)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the one saved with each model)")
    p.add_argument("--context", type=int,
                   help="block length in tokens (default: the block length the model was trained on; without a "
                        "training record the paper's 2048, CALM 2048*K)")
    p.add_argument("--protocol", choices=sorted(docs.PROTOCOLS), default="documents",
                   help="document files: 'documents' blocks each document on its own (default); 'stream' is the "
                        "authors' protocol, one stream of all documents cut into fixed blocks across them")
    p.add_argument("--allow-long-context", action="store_true",
                   help="evaluate at a context past the model's positions anyway (the result is marked)")
    p.add_argument("--batch-size", type=int, default=1, help="blocks per forward pass (default: 1)")
    p.add_argument("--max-blocks", type=int, help="evaluate only the first N blocks (quick checks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    p.add_argument("--max-queries", type=int, default=256, help="branch queries per forward call (memory bound)")
    p.add_argument("--calm-samples", type=int, default=2,
                   help="CALM head samples per position (default: 2, as in the paper); more lowers the variance "
                        "of CALM's Brier-n, not their expectation (K >= 4 only)")
    p.add_argument("--noise-stds", type=float, nargs="+", default=list(DEFAULT_NOISE_STDS),
                   help="latent noise levels of the autoencoder robustness curve")
    p.add_argument("--gen-tokens", type=int, default=0,
                   help="also time sampling this many tokens after prompts cut from the first blocks (CALM and "
                        "baseline; fills the report's gen tokens/s; default: 0 = off)")
    p.add_argument("--gen-batch", type=int, default=1, help="prompts per generate call when timing (default: 1)")
    p.add_argument("--gen-temperature", type=float, default=1.0, help="temperature when timing (default: 1.0)")
    p.add_argument("--out", help="output JSON (only with a single --model)")
    args = p.parse_args(argv)
    if args.out and len(args.model) > 1:
        p.error("--out needs exactly one --model; without it each result goes to RUN/eval/")
    if args.gen_tokens < 0:
        p.error("--gen-tokens must be >= 0")
    for name in ("batch_size", "max_queries", "gen_batch"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.context is not None and args.context <= 0:
        p.error("--context must be positive")
    if args.max_blocks is not None and args.max_blocks <= 0:
        p.error(f"--max-blocks must be positive, got {args.max_blocks} (leave it out to evaluate every block)")
    return args


def load_blocks(args, plan: Plan, vocab: int) -> tuple[list[torch.Tensor], dict]:
    """The blocks to score, cut as the plan says, and the data record of the result."""
    info = dict(plan.data, max_blocks=args.max_blocks)
    multiple = plan.k
    if info["kind"] == "shards":
        blocks = docs.shard_blocks(args.data, args.split, plan.context, multiple)
        info.update(documents=None)
    else:
        from transformers import AutoTokenizer

        from evaluation.export_dir import find_tokenizer_dir

        tok_dir = find_tokenizer_dir(plan.export, args.tokenizer, look_above=False)
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        check_vocab(len(tokenizer), vocab, str(tokenizer.name_or_path), f"the model at {plan.export}")
        texts = docs.read_documents(args.data, args.text_key)
        cut = docs.PROTOCOLS[args.protocol]
        blocks = cut(docs.tokenize_documents(tokenizer, texts), plan.context, multiple)
        info.update(documents=len(texts), tokenizer_sha256=file_sha256(tok_dir / "tokenizer.json")
                    if (tok_dir / "tokenizer.json").is_file() else None)
    if args.max_blocks is not None:
        blocks = blocks[: args.max_blocks]
    info.update(blocks=len(blocks), tokens=int(sum(b.numel() for b in blocks)))
    return blocks, info


def model_info(model, export: Path, run_dir: Path | None, stage: str, context_steps: int) -> dict:
    spec, config = get_stage(stage), model.config
    return {
        "name": (run_dir or export).name, "path": str(export), "run_dir": str(run_dir) if run_dir else None,
        "stage": stage, "patch_size": getattr(config, "patch_size", 1),
        "params": spec.param_count(config),
        "inference_flops_per_token": spec.inference_flops_per_token(config),
        "train_flops_per_token": float(train_flops_per_token(config, stage, context_steps)),
    }


def _sum_over_ranks(value: float) -> float:
    from pretrain.distributed import all_reduce

    return float(all_reduce(torch.tensor([value], dtype=torch.float64)).item())


GEN_PROMPT_TOKENS = 32


def measure_generation(model, stage: str, blocks: list[torch.Tensor], args) -> dict:
    """Sampling speed: `--gen-tokens` new tokens after the first 32 tokens of each of the first
    `--gen-batch` blocks, at `--gen-temperature` (CALM: exact sampler; baseline: transformers' generate),
    timed on a second identical call."""
    from evaluation.baseline_generation import baseline_generate
    from pretrain.models.generation import calm_generate

    prompts = [b[:GEN_PROMPT_TOKENS].tolist() for b in blocks[: args.gen_batch]]
    if len(prompts) < args.gen_batch:
        raise ValueError(f"--gen-batch {args.gen_batch} needs that many blocks; the data has {len(blocks)}")
    generate = calm_generate if stage == "calm" else baseline_generate
    # untimed first call: one-time setup (kernel selection, allocator growth) cost a tiny model's timed
    # call up to 20x its steady speed
    generate(model, prompts, args.gen_tokens, temperature=args.gen_temperature, seed=args.seed)
    start = time.perf_counter()
    out = generate(model, prompts, args.gen_tokens, temperature=args.gen_temperature, seed=args.seed)
    seconds = time.perf_counter() - start
    tokens = int(out.lengths.sum())
    return {"tokens_per_second": tokens / seconds, "tokens": tokens, "seconds": seconds, "batch": len(prompts),
            "prompt_tokens": GEN_PROMPT_TOKENS, "max_new_tokens": args.gen_tokens,
            "temperature": args.gen_temperature, "backbone_calls_per_token": out.backbone_calls / max(tokens / len(prompts), 1),
            "device": str(next(model.parameters()).device), "dtype": args.dtype}


def evaluate_model(args, plan: Plan, rank: int, world: int, device: torch.device) -> tuple[dict, Path]:
    export, run_dir, stage, k, context = plan.export, plan.run_dir, plan.stage, plan.k, plan.context
    model = load_model(stage, str(export), dtype=DTYPES[args.dtype]).to(device).eval()
    blocks, data = load_blocks(args, plan, model.config.vocab_size)
    result = {
        "schema": SCHEMA, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, "-m", "evaluation", *sys.argv[1:]],
        "model": model_info(model, export, run_dir, stage, context // k), "data": data,
        "brierlm": None, "reconstruction": None, "generation": None,
    }
    start = time.perf_counter()
    batches = ((ids.to(device), lengths) for ids, lengths in docs.batches(blocks, args.batch_size, rank, world))
    if stage == "autoencoder":
        gen = torch.Generator(device=device).manual_seed(args.seed + rank)
        rec = reconstruction_eval(model, batches, tuple(args.noise_stds), gen, device)
        rec.update(seed=args.seed, seconds=time.perf_counter() - start)
        result["reconstruction"] = rec
    else:
        acc, calls = BrierAccumulator(), 0
        if stage == "calm":
            # the head's noise is drawn on the model's device; the baseline's uniforms on the CPU
            sampler = CALMSampler(model, torch.Generator(device=device).manual_seed(args.seed + rank), args.max_queries,
                                  num_samples=args.calm_samples)
        else:
            gen = torch.Generator().manual_seed(args.seed + rank)
        for ids, lengths in batches:
            if stage == "calm":
                out = calm_brier(sampler, ids, lengths)
            else:
                out = baseline_brier_batched(model, ids, lengths, gen, args.max_queries)
            acc.add(out.estimates)
            calls += out.forward_calls
        acc.all_reduce()
        summary = acc.summary()
        if stage == "calm":
            summary.update(samples_per_position=args.calm_samples)
        summary.update(seed=args.seed, world_size=world, forward_calls=int(_sum_over_ranks(calls)),
                       seconds=time.perf_counter() - start, device=device.type, dtype=args.dtype)
        result["brierlm"] = summary
        if args.gen_tokens and rank == 0:
            result["generation"] = measure_generation(model, stage, blocks, args)
    out_path = Path(args.out) if args.out else (run_dir or export) / "eval" / f"{Path(args.data).stem}-ctx{context}.json"
    return result, out_path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        # every --model is checked before any is evaluated, so a bad entry costs nothing
        plans = [plan_model(args, path) for path in args.model]
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    world = distributed.init(device=args.device, deepspeed=False)
    try:
        for plan in plans:
            if plan.context_source == "paper" and world.is_main:
                print(f"note: {plan.export} records no training block length; evaluating at the paper's "
                      f"{plan.context} tokens", file=sys.stderr)
            try:
                result, out_path = evaluate_model(args, plan, world.rank, world.world_size, world.device)
            except (FileNotFoundError, ValueError) as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
            if world.is_main:
                write_result(out_path, result)
                line = result["brierlm"] or result["reconstruction"]
                print(f"{result['model']['name']}: " + ", ".join(
                    f"{k}={v:.4g}" for k, v in line.items() if isinstance(v, float)) + f" -> {out_path}", flush=True)
    finally:
        # The barrier inside: rank 0 is still writing when the others finish; tearing gloo down under
        # it aborted runs ("terminate called without an active exception") about once in five.
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
