"""DeepSpeed checkpoints with everything needed to continue a run exactly.

Layout, one directory per saved step under `run_dir/checkpoints/`:

    checkpoints/latest                 tag of the newest complete checkpoint (written by DeepSpeed)
    checkpoints/step_00000200/
        zero_pp_rank_*_model_states.pt module + client state (DeepSpeed's copy of trainer_state.json)
        zero_pp_rank_*_optim_states.pt partitioned fp32 weights and AdamW moments (one per rank)
        rank_00000.pt ...              RNG states (python, numpy, torch, cuda) of each rank, as lists and
                                       tensors only (loaded with weights_only=True)
        config.yaml                    the resolved TrainConfig of the run
        trainer_state.json             step, tokens_seen, loader state (global position in the data
                                       order), wandb_run_id, world_size: what resume reads (JSON)
        checkpoint.json                written last: every file above with its size and sha256

`engine.save_checkpoint` is collective: every rank calls `save`. Older step directories beyond
`keep_last` are deleted by rank 0 once the new one is complete.

A checkpoint is used only if `checkpoint.json` is there and every file it lists has its size and
sha256 (the ranks share the hashing) and unpickles nothing but tensors, containers and the few
plain DeepSpeed classes in `SAFE_GLOBALS`. `DeepSpeed` writes `latest` before `checkpoint.json`,
so a save cut short leaves a `latest` without one; `select` then falls back to the newest intact
checkpoint and says so, or refuses when there is none. DeepSpeed's own files are read through its
checkpoint engine with `weights_only=True` as well (`load`); its universal-checkpoint loader is not
(see the README).

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
import os
import pickle
import re
import shutil
import sys
from pathlib import Path

import torch

from data_prep.sources import sha256_file
from pretrain import distributed
from pretrain.config import TrainConfig, save_config
from pretrain.state import TrainState, set_rng_state

TAG_RE = re.compile(r"^step_(\d{8})$")
MANIFEST = "checkpoint.json"
SAFE_GLOBALS = ("deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler")
"""The only classes a checkpoint may make the unpickler build: plain DeepSpeed state in its optimizer files."""
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


def step_tags(run_dir: str | Path) -> list[str]:
    """The step directories under run_dir/checkpoints, oldest first."""
    root = checkpoint_root(run_dir)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name)) if root.is_dir() else []


def has_checkpoints(run_dir: str | Path) -> bool:
    """`latest` names a checkpoint, or a complete one exists though `latest` was lost or emptied."""
    root = checkpoint_root(run_dir)
    return bool(latest_tag(run_dir)) or any((root / tag / MANIFEST).is_file() for tag in step_tags(run_dir))


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


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
    shared = {**state.shared(), "world_size": world.world_size}
    ckpt = root / tag
    ckpt.mkdir(parents=True, exist_ok=True)
    if world.is_main:
        # This step may have been saved before (a resumed run passing it again): until the new
        # manifest is written, nothing vouches for the directory.
        (ckpt / MANIFEST).unlink(missing_ok=True)
    distributed.barrier()
    torch.save(state.rng, ckpt / rank_file(world.rank))
    if world.is_main:
        save_config(config, ckpt / "config.yaml")
        (ckpt / "trainer_state.json").write_text(json.dumps(shared, indent=1))
    distributed.barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state={**shared, "config": config.to_dict()})
    distributed.barrier()
    _seal(ckpt, world, state.step)
    if world.is_main:
        _prune(root, config.keep_last)
    distributed.barrier()
    return ckpt


def _prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints and the one `latest` names; a save cut short
    before the newest goes too, so that it never takes the place of an intact one."""
    if keep_last <= 0:
        return
    tags = sorted(p for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name))
    sealed = [p.name for p in tags if (p / MANIFEST).is_file()]
    keep = {*sealed[-keep_last:], (root / "latest").read_text().strip()}
    for old in tags:
        if old.name not in keep and sealed and old.name < sealed[-1]:
            shutil.rmtree(old)


def _share(names: list[str], world: distributed.World) -> list[str]:
    """This rank's part of a file list, so that the ranks hash a checkpoint in parallel."""
    return names[world.rank::world.world_size]


def _seal(ckpt: Path, world: distributed.World, step: int) -> None:
    """Collective: write `checkpoint.json` (every file's size and sha256), atomically and last."""
    names = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)
    mine = [(name, {"bytes": (ckpt / name).stat().st_size, "sha256": sha256_file(ckpt / name)})
            for name in _share(names, world)]
    files = dict(sorted(distributed.gather_lists(mine)))
    if world.is_main:
        tmp = ckpt / f".{MANIFEST}.tmp"
        with open(tmp, "w") as fh:
            json.dump({"step": step, "world_size": world.world_size, "files": files}, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, ckpt / MANIFEST)
    distributed.barrier()


def _file_problem(ckpt: Path, name: str, want: dict) -> str | None:
    path = ckpt / name
    if not path.is_file():
        return f"{name}: missing"
    if path.stat().st_size != want["bytes"]:
        return f"{name}: {path.stat().st_size} bytes, the manifest says {want['bytes']} (truncated or altered)"
    if sha256_file(path) != want["sha256"]:
        return f"{name}: sha256 differs from the manifest's (altered)"
    if path.suffix == ".pt":
        try:
            unsafe = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))) - set(SAFE_GLOBALS))
        except Exception as exc:  # torch raises several types for a file it cannot read
            return f"{name}: not a readable torch file ({type(exc).__name__}: {exc})"
        if unsafe:
            return f"{name}: loading it would unpickle {', '.join(unsafe)} (refused: not plain data)"
    return None


def _problems(ckpt: Path, world: distributed.World) -> list[str]:
    """Collective: what makes `ckpt` unusable for an exact resume (empty when it is intact)."""
    found, files = [], {}
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        files, saved_world = manifest["files"], int(manifest["world_size"])
        needed = ["trainer_state.json", "config.yaml", *(rank_file(r) for r in range(saved_world))]
        found += [f"{name}: not in {MANIFEST}" for name in needed if name not in files]
    except FileNotFoundError:
        found.append(f"no {MANIFEST} (the save was cut short, or an older version wrote it)")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        found.append(f"{MANIFEST} is unreadable ({type(exc).__name__}: {exc})")
    found = found if world.is_main else []  # every rank reads the same manifest; one report is enough
    mine = [_file_problem(ckpt, name, files[name]) for name in _share(sorted(files), world)]
    return distributed.gather_lists(found + [p for p in mine if p])


def select(config: TrainConfig, world: distributed.World, universal: bool) -> str:
    """Collective: the tag to resume from: `latest` when it is intact, else the newest intact
    checkpoint before it (a warning says which and why); ResumeError when none is."""
    root = checkpoint_root(config.run_dir)
    latest, tags = latest_tag(config.run_dir), step_tags(config.run_dir)
    if not (latest or tags):
        raise ResumeError(f"--resume: no checkpoint in {root}")
    if universal and latest:
        # ds_to_universal writes no manifest; the converted directory is loaded as DeepSpeed reads it.
        return latest
    # A `latest` pointed back at an older step by hand is a rewind: never fall forward past it.
    newest_allowed = latest if latest and TAG_RE.match(latest) else None
    older = [t for t in reversed(tags) if t != latest and (newest_allowed is None or t < newest_allowed)]
    rejected = [] if latest else [f"{root / 'latest'} is missing or empty"]
    for tag in [latest, *older] if latest else older:
        problems = _problems(root / tag, world) if (root / tag).is_dir() else [f"{root / tag} does not exist"]
        if not problems:
            if rejected and world.is_main:
                print(f"warning: {'; '.join(rejected)}; resuming from {tag}, the newest intact checkpoint",
                      file=sys.stderr, flush=True)
            return tag
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        rejected.append(f"checkpoint {tag} is unusable: {problems[0]}{more}")
    raise ResumeError(f"no intact checkpoint to resume from in {root}: {'; '.join(rejected)}. Move the "
                      "checkpoints directory away to start over, or restore an intact copy")


def check_world_size(config: TrainConfig, world: distributed.World, universal: bool, tag: str) -> int | None:
    """The world size that wrote checkpoint `tag`; raises ResumeError if it differs and the checkpoint
    is not loaded as universal. Cheap, so it runs before the model is built."""
    root = checkpoint_root(config.run_dir)
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


def check_model(config: TrainConfig, tag: str) -> None:
    """The checkpoint's stage and model settings are this run's (its config.yaml, where it has one);
    ResumeError naming the first difference otherwise, before DeepSpeed meets mismatched tensors."""
    import yaml

    saved_file = checkpoint_root(config.run_dir) / tag / "config.yaml"
    if not saved_file.is_file():
        return
    from pretrain.stages import get_stage

    saved = yaml.safe_load(saved_file.read_text()) or {}
    if saved.get("stage") != config.stage:
        diffs = [f"stage={saved.get('stage')!r}"]
    else:
        # Compared as the model will be built, so a key spelled out at its default is no difference.
        build = get_stage(config.stage).build_config
        theirs, mine = (build(model, config.ae_path).to_dict() for model in (saved.get("model") or {}, config.model))
        diffs = [f"model.{k}={theirs.get(k)!r}" for k in sorted(set(theirs) | set(mine)) if theirs.get(k) != mine.get(k)]
    if diffs:
        raise ResumeError(f"checkpoint {saved_file.parent} was trained with {', '.join(diffs[:3])}, which this run "
                          "sets differently; resume with the same settings, or use another run_dir to start over")


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


def safe_load(path, map_location=None):
    """`torch.load` that builds tensors, containers and `SAFE_GLOBALS` only; ResumeError otherwise."""
    allowed = [_import_global(name) for name in SAFE_GLOBALS]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ResumeError(f"{path} holds objects that loading would have to build by running code; refused "
                          f"({str(exc).splitlines()[0]})") from exc


def _import_global(name: str):
    import importlib

    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _read_deepspeed_files_safely(engine) -> None:
    """DeepSpeed's default checkpoint engine unpickles with weights_only=False; make it use `safe_load`.
    Other engines (opt-in in the DeepSpeed JSON) are left as they are."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        engine.checkpoint_engine.load = safe_load


def load(engine, config: TrainConfig, world: distributed.World, tag: str) -> TrainState:
    """Restore the engine from checkpoint `tag` (chosen and verified by `select`) and return the run's
    TrainState with this rank's RNG streams restored (not for a universal checkpoint, which has none)."""
    root = checkpoint_root(config.run_dir)
    ckpt = root / tag
    universal = engine.load_universal_checkpoint()
    _read_deepspeed_files_safely(engine)
    load_path, client = engine.load_checkpoint(str(root), tag=tag)
    if load_path is None:
        raise ResumeError(f"DeepSpeed could not load checkpoint {ckpt}")
    if universal:
        _repair_universal_optimizer(engine, config)
        # ds_to_universal keeps DeepSpeed's copy of the trainer state only.
        return TrainState.from_shared(client, None)
    shared = json.loads((ckpt / "trainer_state.json").read_text())
    rng = safe_load(ckpt / rank_file(world.rank))
    set_rng_state(rng)
    return TrainState.from_shared(shared, rng)
