"""DeepSpeed checkpoints with everything needed to continue a run exactly.

Layout, one directory per saved step under `run_dir/checkpoints/`:

    checkpoints/latest                 tag of the newest complete checkpoint (written by DeepSpeed)
    checkpoints/step_00000200/
        mp_rank_00_model_states.pt     module + client state: step, tokens_seen, loader state (global
                                       position in the data order), config, wandb_run_id, world_size
        zero_pp_rank_*_optim_states.pt partitioned fp32 weights and AdamW moments (one per rank)
        rank_00000.pt ...              RNG states (python, numpy, torch, cuda) of each rank: DeepSpeed
                                       keeps client state only from rank 0
        config.yaml                    the resolved TrainConfig of the run
        trainer_state.json             step, tokens_seen, world_size (readable without torch)

`engine.save_checkpoint` is collective: every rank calls `save`. Older step directories beyond
`keep_last` are deleted by rank 0 once the new one is complete.

Resuming at another world size is refused: ZeRO's partitioned optimizer state is laid out for the
world that wrote it. Convert the checkpoint first and load it as a universal checkpoint:

    python -m deepspeed.checkpoint.ds_to_universal \
        --input_folder RUN/checkpoints/step_00000200 --output_folder RUN/checkpoints/step_00000200_universal
    echo step_00000200_universal > RUN/checkpoints/latest
    python -m pretrain ... --resume ds_config=ds_configs/zero3_universal.json

(`zero3_universal.json` is zero3.json with `"checkpoint": {"load_universal": true}`.) The loader
continues at the same sample; only the per-rank RNG streams (dropout, noise) start afresh.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from pretrain import distributed
from pretrain.config import TrainConfig, save_config
from pretrain.state import TrainState, set_rng_state

TAG_RE = re.compile(r"^step_(\d{8})$")
UNIVERSAL_HINT = (
    "convert it with `python -m deepspeed.checkpoint.ds_to_universal --input_folder {ckpt} "
    "--output_folder {ckpt}_universal`, write `{tag}_universal` into {latest}, and resume with "
    "ds_config=ds_configs/zero3_universal.json (see pretrain/checkpoint.py)"
)


class ResumeError(RuntimeError):
    """The checkpoint cannot be resumed as asked; the message says why and what to do."""


class NonFiniteWeightsError(RuntimeError):
    """The weights hold NaN/Inf: saving them would overwrite good checkpoints with a poisoned one."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(run_dir: str | Path) -> str | None:
    latest = checkpoint_root(run_dir) / "latest"
    return latest.read_text().strip() if latest.exists() else None


def weights_are_finite(engine) -> bool:
    """Every rank's weights finite (collective). Under ZeRO-3 each rank checks its own partition."""
    finite = True
    for param in engine.module.parameters():
        local = getattr(param, "ds_tensor", param)
        if local.numel() and not torch.isfinite(local).all():
            finite = False
            break
    return distributed.all_true(finite)


def save(engine, config: TrainConfig, world: distributed.World, state: TrainState) -> Path:
    """Collective: every rank must call this with the same `state.step`; `state.rng` is this rank's.

    Refuses (NonFiniteWeightsError, nothing written) when any rank's weights are not finite.
    """
    if not weights_are_finite(engine):
        raise NonFiniteWeightsError(
            f"the weights hold NaN/Inf after step {state.step}; no checkpoint was written, so "
            f"{checkpoint_root(config.run_dir)} still holds only the earlier, finite ones")
    root = checkpoint_root(config.run_dir)
    tag = tag_for(state.step)
    client = {**state.shared(), "config": config.to_dict(), "world_size": world.world_size}
    # DeepSpeed writes `latest` at the end of its save, so a crash mid-save leaves the old one valid;
    # our per-rank files go in first for the same reason.
    ckpt = root / tag
    ckpt.mkdir(parents=True, exist_ok=True)
    torch.save(state.rng, ckpt / f"rank_{world.rank:05d}.pt")
    if world.is_main:
        save_config(config, ckpt / "config.yaml")
        (ckpt / "trainer_state.json").write_text(json.dumps(
            {"step": state.step, "tokens_seen": state.tokens_seen, "world_size": world.world_size}, indent=1))
    distributed.barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state=client)
    distributed.barrier()
    if world.is_main:
        _prune(root, config.keep_last)
    distributed.barrier()
    return ckpt


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    tags = sorted(p for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name))
    current = (root / "latest").read_text().strip()
    for old in tags[:-keep_last]:
        if old.name != current:
            shutil.rmtree(old)


def check_world_size(config: TrainConfig, world: distributed.World, universal: bool) -> int | None:
    """The world size that wrote `latest`; raises ResumeError if it differs and the checkpoint is not
    loaded as universal. Cheap, so it runs before the model is built."""
    root = checkpoint_root(config.run_dir)
    tag = latest_tag(config.run_dir)
    state_file = root / str(tag) / "trainer_state.json"
    if tag is None or not state_file.exists():
        return None
    saved_world = json.loads(state_file.read_text())["world_size"]
    if saved_world != world.world_size and not universal:
        raise ResumeError(
            f"checkpoint {root / tag} was written by {saved_world} ranks but this run has {world.world_size}; "
            "ZeRO optimizer partitions cannot be re-split directly: "
            + UNIVERSAL_HINT.format(ckpt=root / tag, tag=tag, latest=root / "latest"))
    return saved_world


def _repair_universal_optimizer(engine, config: TrainConfig) -> None:
    """Undo two faults of DeepSpeed 0.19.8's ZeRO-3 universal load, so the resumed run continues exactly.

    The loader gives every parameter group the *same* AdamW `step` tensor (so it advances once per
    group per step and the bias correction drifts) and copies group 0's hyperparameters, weight decay
    included, onto the no-decay group. The group order is `train.param_groups`: decay, then no-decay.
    """
    inner = engine.optimizer.optimizer
    for group, weight_decay in zip(inner.param_groups, (config.optim.weight_decay, 0.0)):
        group["weight_decay"] = weight_decay
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def load(engine, config: TrainConfig, world: distributed.World) -> TrainState:
    """Restore the engine from `run_dir/checkpoints/latest` and return the run's TrainState (RNG restored)."""
    root = checkpoint_root(config.run_dir)
    tag = latest_tag(config.run_dir)
    if tag is None:
        raise ResumeError(f"--resume: no checkpoint in {root} (no 'latest' file)")
    ckpt = root / tag
    if not ckpt.is_dir():
        raise ResumeError(f"{root / 'latest'} names {tag!r} but {ckpt} does not exist")
    saved_world = check_world_size(config, world, engine.load_universal_checkpoint())
    load_path, client = engine.load_checkpoint(str(root), tag=tag)
    if load_path is None:
        raise ResumeError(f"DeepSpeed could not load checkpoint {ckpt}")
    if engine.load_universal_checkpoint():
        _repair_universal_optimizer(engine, config)
    rank_file = ckpt / f"rank_{world.rank:05d}.pt"
    rng = None
    if rank_file.exists() and saved_world == world.world_size:
        rng = torch.load(rank_file, weights_only=False)
        set_rng_state(rng)
    return TrainState.from_shared(client, rng)
