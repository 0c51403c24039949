"""Train one stage of the pipeline (autoencoder, calm or baseline) with DeepSpeed ZeRO.

    python -m pretrain --stage STAGE --config PRESET [--resume] [key=value ...]

PRESET is a name in configs/ or a YAML path; key=value pairs override it (`optim.lr=1e-3`,
`model.num_hidden_layers=4`, `run_dir=runs/x`, `ds_config=ds_configs/zero2.json`). `--stage` must
agree with the preset's `stage` (it is there so a command line says what it trains). A run directory
that already holds a checkpoint is resumed automatically; `--resume` insists on it, `--no-resume`
starts over (refused while checkpoints exist, to protect them).

Single process (CPU or one GPU):
    python -m pretrain --stage autoencoder --config ae run_dir=runs/ae
    bash run.sh train --stage autoencoder --config ae run_dir=runs/ae

NPROC processes on one node (GPUs, or CPU ranks over gloo):
    torchrun --nproc_per_node 8 -m pretrain --stage calm --config calm-m ae_path=runs/ae/export run_dir=runs/calm-m
    NPROC=8 bash run.sh train --stage calm --config calm-m ae_path=runs/ae/export run_dir=runs/calm-m

Multi-node with torchrun (run on every node, NODE_RANK 0..NNODES-1; run_dir on a shared filesystem):
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr node0 --master_port 29500 \
        -m pretrain --stage baseline --config transformer-s run_dir=/nfs/runs/ts
    NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 NPROC=8 \
        bash run.sh train --stage baseline --config transformer-s run_dir=/nfs/runs/ts

Multi-node with the deepspeed launcher and a hostfile (lines `node0 slots=8`), one command per node:
    deepspeed --hostfile hosts --no_ssh --node_rank 0 --master_addr node0 --master_port 29500 \
        --num_gpus 8 --module pretrain --stage baseline --config transformer-s run_dir=/nfs/runs/ts
    LAUNCHER=deepspeed HOSTFILE=hosts NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NPROC=8 \
        bash run.sh train --stage baseline --config transformer-s run_dir=/nfs/runs/ts

SLURM (inside an sbatch script with --nodes N --ntasks-per-node 1; one torchrun per node via srun):
    LAUNCHER=slurm NPROC=8 bash run.sh train --stage calm --config calm-m ae_path=runs/ae/export \
        run_dir=/nfs/runs/calm-m

Dry run (any of the forms above with --dry-run): resolve and validate the config, build the model on
PyTorch's meta device (no memory, no weights) to count its parameters, fill the DeepSpeed JSON for
the launcher's world size (WORLD_SIZE, 1 without a launcher) and print all three. It reads no data
and starts no engine, so paper-size commands can be checked on any machine before they are queued:
    python -m pretrain --stage calm --config calm-m ae_path=runs/ae/export --dry-run

Exit codes: 0 done; 2 bad configuration, data or checkpoint (refused before any step; or the export
after training failed); 3 non-finite loss (the last good step is checkpointed) or nan_policy=skip
giving up after nan_skip_limit skipped steps in a row; 4 another rank died (on the ranks left; the
launcher names the one that failed); 130 Ctrl-C (SIGINT) and 143 SIGTERM (the step
in progress is finished and checkpointed; run the same command again to resume; a second Ctrl-C
exits at once without a checkpoint, and the next run resumes from the newest complete one).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from pathlib import Path

from pretrain.config import REPO_ROOT, ConfigError, TrainConfig, load_config
from pretrain.metrics import run_train_flops


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", required=True, choices=("autoencoder", "calm", "baseline"))
    parser.add_argument("--config", required=True, help="preset name in configs/ or a YAML file")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", dest="resume", action="store_true", default=None,
                        help="continue from run_dir/checkpoints/latest (error if there is none)")
    resume.add_argument("--no-resume", dest="resume", action="store_false",
                        help="start from scratch even though run_dir has checkpoints")
    # The deepspeed launcher passes --local_rank=N (torchrun sets LOCAL_RANK instead).
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config, count the model's parameters on the meta device and print the "
                             "filled DeepSpeed JSON; no data is read and nothing is trained or written")
    parser.add_argument("--match-flops", metavar="RUN_DIR",
                        help="train until this run's training FLOPs are reached (max_train_flops = the last "
                             "train_flops in RUN_DIR/metrics.jsonl): a baseline compute-matched to a CALM run")
    parser.add_argument("--with-ae-flops", action="store_true",
                        help="with --match-flops on a CALM run: also count the training FLOPs of its autoencoder "
                             "(the run at its ae_path), so the baseline gets CALM's whole pipeline budget")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser.parse_intermixed_args(argv)


def dry_run(config: TrainConfig, world_size: int) -> int:
    """Print the resolved config, the model's parameter and FLOP counts and the DeepSpeed JSON for `world_size`."""
    import torch
    import yaml

    from pretrain.ds_config import build_ds_config
    from pretrain.models import AutoencoderConfig
    from pretrain.stages import build_model, get_stage
    from pretrain.train import check_autoencoder, resolve_precision

    stage = get_stage(config.stage)
    model_config = stage.build_config(config.model, config.ae_path)
    if config.stage == "calm" and not (config.ae_path and (Path(config.ae_path) / "config.json").is_file()):
        # The autoencoder is usually trained after this check is wanted; its size only adds frozen weights.
        print(f"warning: ae_path={config.ae_path} holds no exported autoencoder yet; counting the frozen "
              "autoencoder as the paper's (AutoencoderConfig defaults)", file=sys.stderr)
        model_config.ae_path = None
        model_config.ae_config = AutoencoderConfig(vocab_size=model_config.vocab_size,
                                                   patch_size=model_config.patch_size,
                                                   latent_size=model_config.latent_size)
    elif config.stage == "calm":
        check_autoencoder(config.ae_path, model_config)
    try:
        with torch.device("meta"):
            model = build_model(config.stage, model_config)
    except ValueError as exc:  # an autoencoder at ae_path whose K or latent size does not fit
        raise ConfigError(str(exc)) from exc
    frozen = sum(p.numel() for name, p in model.named_parameters() if name.startswith("ae_model."))
    trained = sum(p.numel() for p in model.parameters()) - frozen
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(config, device)
    ds_config = build_ds_config(config, world_size, precision, REPO_ROOT)
    block_len, where = _block_len(config, model_config)
    per_token = stage.train_flops_per_token(model_config, block_len)
    tokens_per_step = ds_config["train_batch_size"] * block_len
    if os.environ.get("RANK", "0") == "0":
        print(f"# resolved config\n{yaml.safe_dump(config.to_dict(), sort_keys=False)}")
        print(f"# model: {type(model).__name__}, {trained:,} trained parameters"
              + (f" + {frozen:,} frozen (autoencoder)" if frozen else ""))
        print(f"# training FLOPs: {per_token:.4g} per token, {per_token * tokens_per_step:.4g} per optimizer step "
              f"({tokens_per_step:,} tokens at block length {block_len}, {where})")
        if config.max_train_flops:
            steps = max(1, math.ceil(config.max_train_flops / (per_token * tokens_per_step)))
            print(f"# budget max_train_flops={config.max_train_flops:.4g}: {steps} optimizer steps (replaces max_steps)")
        print(f"# DeepSpeed config ({config.ds_config}; world size {world_size}, {precision} on {device.type})")
        print(json.dumps(ds_config, indent=2))
    return 0


def _block_len(config: TrainConfig, model_config) -> tuple[int, str]:
    """The shards' block length when data.path is prepared, else the longest the model takes."""
    from pretrain.mixture import data_dirs

    manifest = Path(data_dirs(config.data)[0]) / "manifest.json"  # a mixture's sources share the block length
    if manifest.is_file():
        return int(json.loads(manifest.read_text())["block_len"]), f"from {manifest}"
    positions = model_config.max_position_embeddings if hasattr(model_config, "max_position_embeddings") else 2048
    k = getattr(model_config, "patch_size", 1) if config.stage == "calm" else 1
    return positions * k, "the model's maximum, as data.path has no manifest.json yet"


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Outside the training steps (start-up, export): nothing was lost that a checkpoint held.
        print("interrupted (Ctrl-C) outside the training steps; run the same command again to resume from "
              "the newest complete checkpoint", file=sys.stderr)
        return 128 + signal.SIGINT


def _main(argv: list[str] | None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        overrides = list(args.overrides)
        if args.match_flops:
            budget = run_train_flops(args.match_flops, with_autoencoder=args.with_ae_flops)
            overrides.append(f"max_train_flops={budget!r}")
        elif args.with_ae_flops:
            raise ConfigError("--with-ae-flops goes with --match-flops CALM_RUN_DIR")
        config = load_config(args.config, overrides, stage=args.stage)
        if config.stage != args.stage:
            raise ConfigError(f"--stage {args.stage} but preset {args.config!r} is for stage {config.stage!r}")
        if args.dry_run:
            from pretrain.init_from import prepare

            prepare(config)  # the model fields init_from supplies
            return dry_run(config, int(os.environ.get("WORLD_SIZE", 1)))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from pretrain import checkpoint, distributed
    from pretrain.data import ManifestError, ShardError
    from pretrain.stages import WeightsMismatch
    from pretrain.train import EXIT_NONFINITE, EXIT_PEER_LOST, Trainer, TrainingError

    existing = checkpoint.has_checkpoints(config.run_dir)
    if args.resume is False and existing:
        held = checkpoint.latest_tag(config.run_dir) or "checkpoints"
        print(f"error: --no-resume but {config.run_dir}/checkpoints holds {held}; "
              "choose another run_dir or delete the checkpoints", file=sys.stderr)
        return 2
    resume = bool(existing) if args.resume is None else args.resume
    world = distributed.init(args.local_rank)
    try:
        code = Trainer(config, world, resume).run()
    except (ConfigError, ManifestError, ShardError, checkpoint.ResumeError, WeightsMismatch) as exc:
        print(f"error (rank {world.rank}): {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"error (rank {world.rank}): {exc}", file=sys.stderr)
        return EXIT_NONFINITE
    except RuntimeError as exc:
        if not (reason := distributed.peer_lost(exc)):
            raise
        print(f"error (rank {world.rank}): another rank is gone ({reason}); its launcher's report names it. Run "
              "the same command again to resume from the last checkpoint", file=sys.stderr)
        return EXIT_PEER_LOST
    finally:
        distributed.shutdown()
    if code == 0 and config.export and world.is_main:
        # After the process group is gone: the other ranks have exited instead of waiting in a
        # collective that a long export could time out (NCCL's watchdog), and the export needs no group.
        from pretrain.export import ExportError, export_run

        try:
            export_run(config.run_dir)
        except (ExportError, ManifestError, OSError) as exc:
            print(f"error: training finished and is checkpointed, but the export failed: {exc}; fix that and "
                  f"run python -m pretrain.export {config.run_dir}", file=sys.stderr)
            return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
