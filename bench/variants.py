"""Training-step variants side by side: the same preset through the real engine, one process per variant.

The README's CPU figures (2 threads, glibc thresholds as run.sh sets them):

    # the output layer: whole logits vs chunked cross-entropy (autoencoder, vocabulary 32000, d 512, 8 x 512)
    python -m bench.variants --preset ae --block-len 512 --micro-batch 8 --steps 4 --warmup 1 --repeats 2 \
        --common model.vocab_size=32000 grad_accum_steps=1 --variant whole ce_chunk_rows=0 \
        --variant chunked ce_chunk_rows=auto
    # the same for a 4 x 256 Llama baseline (LLAMA=model.hidden_size=256 model.intermediate_size=688
    # model.num_hidden_layers=4 model.num_attention_heads=4 model.num_key_value_heads=4)
    python -m bench.variants --preset baseline-tiny --block-len 512 --micro-batch 8 --steps 4 --warmup 1 \
        --repeats 2 --common $LLAMA model.vocab_size=32000 model.max_position_embeddings=2048 grad_accum_steps=1 \
        --variant whole ce_chunk_rows=0 --variant chunked ce_chunk_rows=auto
    # bf16 against fp32 on the CPU (AMX); activation checkpointing off / on
    python -m bench.variants --preset calm-tiny --block-len 2048 --micro-batch 8 --steps 3 --warmup 1 --repeats 2 \
        --common $LLAMA grad_accum_steps=1 --variant fp32 precision=fp32 --variant bf16 precision=bf16
    python -m bench.variants --preset calm-tiny --block-len 2048 --micro-batch 8 --steps 3 --warmup 1 --repeats 2 \
        --common $LLAMA grad_accum_steps=1 --variant AC-off --variant AC-on activation_checkpointing=true

Each variant runs `bench.train_throughput` in a fresh process (so the peak resident set, `ru_maxrss`,
is that variant's alone: on CPU peak memory cannot be reset inside a process), with `--common` and
then the variant's `key=value` overrides. With `--repeats R` the variants are run R times,
interleaved (v1 v2 v1 v2 ...), and the fastest run of each is kept, so a shared machine's changing
load hits all alike. Prints tokens/s, step time and peak memory with ratios to the first variant.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_variant(args, overrides: list[str], out: Path) -> dict:
    """One `bench.train_throughput` run in a subprocess; its single row."""
    cmd = [sys.executable, "-m", "bench.train_throughput", "--presets", args.preset, "--block-len",
           str(args.block_len), "--steps", str(args.steps), "--warmup", str(args.warmup), "--json", str(out),
           *(["--micro-batch", str(args.micro_batch)] if args.micro_batch else []),
           "wandb.mode=disabled", *args.common, *overrides]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"variant {overrides} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())[0]


def peak_gib(row: dict) -> float:
    """GPU: peak allocated memory; CPU: the process's peak resident set."""
    return row.get("mem_allocated_gib", row.get("peak_rss_gib", float("nan")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.variants", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--preset", required=True)
    parser.add_argument("--block-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--common", nargs="*", default=[], metavar="key=value", help="overrides for every variant")
    parser.add_argument("--variant", nargs="+", action="append", required=True, metavar="NAME [key=value]",
                        help="a name and its overrides; repeat for each variant")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name, *overrides in args.variant:
                row = run_variant(args, overrides, Path(tmp) / f"{name}-{repeat}.json")
                if name not in best or row["tokens_per_s"] > best[name]["tokens_per_s"]:
                    best[name] = dict(row, variant=name, overrides=overrides)
    rows = list(best.values())
    print(f"{args.preset}, block {args.block_len}, {args.steps} steps after {args.warmup}, best of {args.repeats}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; common: {' '.join(args.common) or '-'}")
    print(f"{'variant':<12}{'prec':<6}{'step ms':>10}{'tokens/s':>11}{'peak GiB':>10}{'speed':>8}{'memory':>8}")
    first = rows[0]
    for r in rows:
        print(f"{r['variant']:<12}{r['precision']:<6}{r['step_ms']:>10.1f}{r['tokens_per_s']:>11.0f}"
              f"{peak_gib(r):>10.2f}{r['tokens_per_s'] / first['tokens_per_s']:>7.2f}x"
              f"{peak_gib(r) / peak_gib(first):>7.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
