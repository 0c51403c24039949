"""Training throughput per stage through the real training engine: tokens/s, TFLOP/s and (GPU) MFU.

    # CPU, tiny presets (seconds); allocator settings as run.sh sets them
    MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 OMP_NUM_THREADS=2 \
        python -m bench.train_throughput --presets ae-tiny calm-tiny baseline-tiny --block-len 64
    # one GPU, paper sizes with FlashAttention and bf16 (CALM-M at 2048 steps = 8192 tokens, as the paper)
    python -m bench.train_throughput --presets calm-m transformer-s --block-len 8192 2048 --micro-batch 4
    # 8 GPUs: torchrun --nproc_per_node 8 -m bench.train_throughput --presets calm-m ...

Each preset is built exactly as training builds it (`pretrain.train.build_engine`: ZeRO-3 from the
preset's ds_config, HfDeepSpeedConfig partitioning, torch AdamW) and trained for --warmup + --steps
optimizer steps on random token blocks of the preset's vocabulary (throughput does not depend on
the text). CALM needs an autoencoder: a randomly initialised one of --ae-preset's shape is exported
to a temporary directory (its weights do not change the cost). FLOPs per token come from
evaluation.flops (docs/method.md §7); MFU divides achieved FLOP/s by the device's peak bf16 FLOP/s
(pretrain.metrics.PEAK_BF16_TFLOPS) and is printed only on a known GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from pretrain import distributed
from pretrain.config import REPO_ROOT, load_config
from pretrain.ds_config import build_ds_config
from pretrain.metrics import memory_stats, peak_tflops
from pretrain.stages import get_stage
from pretrain.train import build_engine, forward, resolve_precision


def _random_autoencoder(ae_preset: str, calm_model: dict, out: Path, world) -> str:
    """Written by rank 0 (transformers saves on rank 0 only) into a directory every rank can read."""
    from pretrain.models import Autoencoder, AutoencoderConfig

    if world.is_main:
        ae = load_config(ae_preset).model
        ae.update(vocab_size=calm_model.get("vocab_size", ae.get("vocab_size")),
                  patch_size=calm_model.get("patch_size", 4), latent_size=calm_model.get("latent_size", 128))
        torch.manual_seed(0)
        Autoencoder(AutoencoderConfig(**ae)).save_pretrained(out)
    distributed.barrier()
    return str(out)


def bench_preset(preset: str, block_len: int, args, world, scratch: Path) -> dict:
    overrides = [f"micro_batch_size={args.micro_batch}"] if args.micro_batch else []
    config = load_config(preset, overrides + list(args.overrides))
    if config.stage == "calm":
        config.ae_path = _random_autoencoder(args.ae_preset or ("ae-tiny" if "tiny" in preset else "ae"),
                                             config.model, scratch / f"ae-{preset}", world)
    precision = resolve_precision(config, world.device)
    ds_config = build_ds_config(config, world.world_size, precision, REPO_ROOT)
    stage = get_stage(config.stage)
    engine, _ = build_engine(config, stage.build_config(config.model, config.ae_path), ds_config, world.device,
                             precision)
    vocab = engine.module.config.vocab_size
    generator = torch.Generator().manual_seed(world.rank)
    batches = [torch.randint(vocab, (config.micro_batch_size, block_len), generator=generator).to(world.device)
               for _ in range(4)]
    cuda = world.device.type == "cuda"
    engine.train()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            distributed.barrier()
            start = time.perf_counter()
        for micro in range(config.grad_accum_steps):
            # As a training step that is not logged, with the run's output-layer setting.
            loss = forward(engine, config.stage, batches[(step + micro) % len(batches)], metrics=False,
                           ce_chunk_rows=config.ce_chunk_rows).loss
            engine.backward(loss)
            engine.step()
    if cuda:
        torch.cuda.synchronize()
    distributed.barrier()
    elapsed = time.perf_counter() - start
    tokens = args.steps * engine.train_batch_size() * block_len
    per_token = stage.train_flops_per_token(engine.module.config, block_len)
    tokens_per_s = tokens / elapsed
    tflops = per_token * tokens_per_s / 1e12
    peak = peak_tflops(world.device)
    row = {"preset": preset, "stage": config.stage, "precision": precision,
           "params_M": sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()) / 1e6,
           "block_len": block_len, "global_batch": engine.train_batch_size(),
           "step_ms": 1000 * elapsed / args.steps, "tokens_per_s": tokens_per_s, "tflops": tflops,
           "mfu": tflops / (peak * world.world_size) if peak else None, **memory_stats(world.device),
           # The process's peak resident set so far (CPU figures: one preset per process to compare them).
           "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    engine.destroy()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train_throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["ae-tiny", "calm-tiny", "baseline-tiny"])
    parser.add_argument("--block-len", nargs="+", type=int, default=[64],
                        help="tokens per sequence, one value for all presets or one per preset")
    parser.add_argument("--micro-batch", type=int, default=None, help="override the presets' micro_batch_size")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    parser.add_argument("--ae-preset", default=None, help="autoencoder shape for CALM (default ae, or ae-tiny)")
    parser.add_argument("--scratch", default=None, help="parent of the temporary CALM autoencoder directory "
                        "(default: the system's; give a shared path for multi-node runs)")
    parser.add_argument("--json", default=None, help="also write the rows (a JSON list) to this file (rank 0)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every preset")
    args = parser.parse_args(argv)
    lengths = args.block_len * len(args.presets) if len(args.block_len) == 1 else args.block_len
    if len(lengths) != len(args.presets):
        parser.error("--block-len takes one value or one per preset")
    world = distributed.init(args.local_rank)
    rows = []
    # Rank 0's scratch directory, shared with the other ranks (one node, or a shared --scratch).
    with tempfile.TemporaryDirectory(dir=args.scratch) as mine:
        shared = [mine]
        torch.distributed.broadcast_object_list(shared, src=0)
        for preset, block_len in zip(args.presets, lengths):
            rows.append(bench_preset(preset, block_len, args, world, Path(shared[0])))
        distributed.barrier()
    if world.is_main:
        device = torch.cuda.get_device_name(world.device) if world.device.type == "cuda" else "CPU"
        print(f"device: {device} x{world.world_size}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; "
              f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_')}; "
              f"LD_PRELOAD={os.environ.get('LD_PRELOAD')}; steps={args.steps} after {args.warmup} warm-up")
        print(f"{'preset':<14}{'stage':<12}{'prec':<6}{'params(M)':>10}{'block':>7}{'batch':>6}{'step ms':>10}"
              f"{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}")
        for r in rows:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
            print(f"{r['preset']:<14}{r['stage']:<12}{r['precision']:<6}{r['params_M']:>10.2f}{r['block_len']:>7}"
                  f"{r['global_batch']:>6}{r['step_ms']:>10.1f}{r['tokens_per_s']:>12.0f}{r['tflops']:>10.4f}{mfu:>8}")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        base = {r["stage"]: r for r in rows}
        if "calm" in base and "baseline" in base:
            print(f"calm / baseline tokens/s: {base['calm']['tokens_per_s'] / base['baseline']['tokens_per_s']:.2f}x")
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
