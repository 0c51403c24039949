"""The DeepSpeed training loop shared by the three stages (autoencoder, CALM, baseline).

Every stage runs through ZeRO (stage 3 by default) on CPU (gloo, fp32) or GPU (NCCL, bf16). The
model is built while an `HfDeepSpeedConfig` is alive so that large models are partitioned as they
are constructed. For CALM the frozen autoencoder is taken out of the engine's module tree: ZeRO-3
would otherwise partition it too (its weights would be empty outside its own submodules' forward
calls), put it in the optimizer's bookkeeping and in every checkpoint. It stays a whole, eval-mode,
gradient-free copy on every rank, loaded from `ae_path`, so the target latents are exact.

The learning rate is a pure function of the step (`lr_at`), so resuming needs no scheduler state,
and a step DeepSpeed skips (non-finite gradient norm) does not shift the schedule.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data_prep.manifest import ManifestError, check_compatible
from pretrain import checkpoint, distributed, init_from
from pretrain.config import REPO_ROOT, ConfigError, TrainConfig, save_config
from pretrain.data import check_tokenizer
from pretrain.ds_config import build_ds_config, offloads_optimizer
from pretrain.finetune import check_data as check_finetune_data
from pretrain.metrics import MetricsLogger, memory_stats, peak_tflops
from pretrain.stages import build_model, describe_kind, get_stage
from pretrain.state import TrainState, seed_everything

EXIT_NONFINITE = 3
EXIT_PEER_LOST = 4
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
"""Signals that stop a run after the current step with a checkpoint; the exit code is 128 + the signal."""
EXIT_SIGINT = 128 + signal.SIGINT


class TrainingError(RuntimeError):
    """Training stopped for a reason the message explains."""


def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then constant or cosine."""
    optim = config.optim
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    span = max(1, config.max_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    return optim.lr * (optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only; biases and norm gains (1-D tensors) are not decayed. Frozen weights are left out."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        # Under ZeRO-3 a partitioned parameter is empty; ds_shape is its real shape.
        shape = getattr(param, "ds_shape", param.shape)
        (decay if len(shape) >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def resolve_precision(config: TrainConfig, device: torch.device) -> str:
    """'auto' is bf16 on a GPU that has it (compute capability >= 8.0), fp32 elsewhere; bf16 asked
    for on a GPU without it (V100, T4) is refused rather than emulated at a fraction of the speed."""
    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False)
    if config.precision == "auto":
        return "bf16" if device.type == "cuda" and bf16_ok else "fp32"
    if config.precision == "bf16" and not bf16_ok:
        raise ConfigError(f"precision=bf16 but {torch.cuda.get_device_name(device)} has no bf16 support; "
                          "use precision=fp32 (fp16 is not supported)")
    return config.precision


def check_compatibility(config: TrainConfig, model_config, manifest: dict) -> None:
    """Everything that would make training meaningless, checked before any step is taken: the one
    data/tokenizer/model rule (`data_prep.manifest.check_compatible`) and, for CALM, its autoencoder."""
    try:
        check_compatible(manifest, vocab_size=model_config.vocab_size,
                         patch_size=getattr(model_config, "patch_size", None),
                         model=f"the {config.stage} model (model.vocab_size / model.patch_size)")
    except ManifestError as exc:
        raise ConfigError(f"{config.data.path}: {exc}") from exc
    if config.stage == "calm":
        check_autoencoder(config.ae_path, model_config, manifest)
    elif config.ae_path:
        raise ConfigError(f"ae_path is only used by the calm stage, not {config.stage!r}")


def check_autoencoder(ae_path: str | None, calm_config, manifest: dict | None = None) -> None:
    """`ae_path` holds an exported autoencoder that fits this CALM (and, given the shards' manifest,
    was trained on their tokenizer); a ConfigError naming the mismatch otherwise."""
    if not ae_path:
        raise ConfigError("the calm stage needs ae_path=DIR, the export of a trained autoencoder "
                          "(run_dir/export of an autoencoder run)")
    path = Path(ae_path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"ae_path={ae_path}: no config.json there; expected the export directory "
                          "of an autoencoder run (run_dir/export)")
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except json.JSONDecodeError as exc:
        raise ConfigError(f"ae_path={ae_path}: config.json is not valid JSON ({exc})") from exc
    if model_type != "autoencoder":
        raise ConfigError(f"ae_path={ae_path} holds {describe_kind(model_type)}, not an autoencoder "
                          "(point it at the export/ directory of an autoencoder run)")
    ae = get_stage("autoencoder").config_class.from_pretrained(str(path))
    problems = [f"{name}: autoencoder {getattr(ae, name)} vs calm {getattr(calm_config, name)}"
                for name in ("vocab_size", "patch_size", "latent_size") if getattr(ae, name) != getattr(calm_config, name)]
    if problems:
        raise ConfigError(f"autoencoder at {ae_path} does not fit this CALM model: " + "; ".join(problems))
    trained_on = path / "training.json"
    if trained_on.is_file() and manifest is not None:
        try:
            check_compatible(manifest, tokenizer_sha256=json.loads(trained_on.read_text())["data_tokenizer"]["sha256"],
                             model=f"the autoencoder at {ae_path}")
        except ManifestError as exc:
            raise ConfigError(str(exc)) from exc


def check_export_weights(export_dir: str) -> None:
    """Every safetensors file of an export is whole (its header covers the file), checked before the
    model is built from it; a ConfigError naming the file otherwise. (The authors' `.bin` layout is
    read, and so checked, when the model is built.)"""
    from safetensors import SafetensorError, safe_open

    files = sorted(Path(export_dir).glob("*.safetensors"))
    if not files and list(Path(export_dir).glob("pytorch_model*.bin")):
        return
    if not files:
        raise ConfigError(f"ae_path={export_dir}: no *.safetensors weights there; re-export the autoencoder run "
                          "(python -m pretrain.export AE_RUN_DIR)")
    for file in files:
        try:
            with safe_open(str(file), "pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise ConfigError(f"ae_path={export_dir}: {file.name} is damaged ({exc}); re-export the autoencoder "
                              "run (python -m pretrain.export AE_RUN_DIR)") from exc


def _register_tied_weights(model: torch.nn.Module) -> None:
    """Under ZeRO-3, a weight used by a module that does not own it must be registered as external.

    The autoencoder's decoder multiplies by the encoder's embedding matrix inside its own forward.
    """
    import deepspeed

    encoder = getattr(model, "encoder", None)
    if encoder is not None and hasattr(encoder, "embed_tokens") and hasattr(model, "decode"):
        deepspeed.zero.register_external_parameter(model, encoder.embed_tokens.weight)


def dtype_of(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def optimizer_class(ds_config: dict):
    """torch's AdamW, or DeepSpeed's CPU Adam (in AdamW mode) when the optimizer is offloaded.

    torch's AdamW compiles no extension ops, which is why it is the default; but offloaded, it would
    run the update on the CPU with plain per-tensor loops, many times slower than DeepSpeed's
    vectorised CPU Adam (which JIT-compiles once, ~40 s, and needs a C++ compiler).
    """
    if offloads_optimizer(ds_config):
        from functools import partial

        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return partial(DeepSpeedCPUAdam, adamw_mode=True)
    return torch.optim.AdamW


def build_engine(config: TrainConfig, model_config, ds_config: dict, device: torch.device, precision: str,
                 init_source=None, is_main: bool = True):
    """(engine, optimizer): the stage's model under DeepSpeed with AdamW, partitioned at construction
    under ZeRO-3, CALM's autoencoder kept whole, frozen and outside the engine; its weights random
    (from `config.seed`) or those of `init_source` (`pretrain.init_from`)."""
    import deepspeed

    zero3 = ds_config["zero_optimization"]["stage"] == 3
    torch.manual_seed(config.seed)  # the same initial weights on every rank and in every run of this seed
    model = build_model(config.stage, model_config, device=device, dtype=dtype_of(precision),
                        zero3_config=ds_config if zero3 else None, frozen_ae_outside=True,
                        activation_checkpointing=config.activation_checkpointing)
    if init_source is not None:
        init_from.check_autoencoder_weights(model, init_source, config.ae_path)
        count = init_from.load_weights(model, init_source, zero3, is_main)
        if is_main:
            print(f"initialised {count} tensors from {init_source.path}; optimizer, schedule and data start "
                  "at step 0", flush=True)
    optimizer = optimizer_class(ds_config)(param_groups(model, config.optim.weight_decay), lr=lr_at(config, 0),
                                           betas=(config.optim.beta1, config.optim.beta2), eps=config.optim.eps)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if zero3:
        _register_tied_weights(engine.module)
    return engine, optimizer


def steps_for_flops(budget: float, per_step: float) -> int:
    """The fewest optimizer steps of `per_step` FLOPs whose sum reaches `budget` (at least one)."""
    return max(1, math.ceil(budget / per_step))


def apply_flops_budget(config: TrainConfig, model_config, block_len: int, world: distributed.World) -> int:
    """Set `config.max_steps` to the fewest optimizer steps whose training FLOPs reach
    `config.max_train_flops` (so the logged train_flops end within one step above the budget)."""
    per_step = get_stage(config.stage).train_flops_per_token(model_config, block_len) * (
        config.micro_batch_size * config.grad_accum_steps * world.world_size * block_len)
    config.max_steps = steps_for_flops(config.max_train_flops, per_step)
    if world.is_main:
        print(f"training FLOPs budget {config.max_train_flops:.4g}: {config.max_steps} steps of "
              f"{per_step:.4g} FLOPs", flush=True)
    return config.max_steps


def forward(engine, stage: str, batch: torch.Tensor, **options):
    """The stage's training objective on one batch (a model output with .loss); `options` are the
    objective's (`metrics`, `ce_chunk_rows`: see `pretrain.stages.Stage`)."""
    return get_stage(stage).objective(engine, batch, **options)


AUX_METRICS = ("ce", "kl", "accuracy", "fidelity", "diversity")
"""Per-micro-batch extras of a model output that are logged beside the loss when present."""


@dataclass
class StepResult:
    """What one optimizer step produced. Tensors stay on the device until they are logged."""

    losses: torch.Tensor
    """(grad_accum_steps,) this rank's micro-batch losses."""
    aux: dict[str, torch.Tensor]
    """name -> (grad_accum_steps,) per-micro-batch means of AUX_METRICS."""
    finite: bool
    """Loss finite on every rank and the global gradient norm finite."""
    applied: bool
    """The engine updated the weights (it skips a step whose gradient norm is not finite)."""
    stop_signal: int
    """The stop signal (`STOP_SIGNALS`) some rank received, the same on every rank; 0 for none."""


class Trainer:
    """One training run: `Trainer(config, world, resume).run()` returns the process exit code."""

    def __init__(self, config: TrainConfig, world: distributed.World, resume: bool = False):
        from pretrain.mixture import train_loader, val_loaders

        self.config = config
        self.world = world
        self.resume = resume
        self.loader = train_loader(config, world)  # data.path, or the weighted mixture of data.sources
        self.stage = get_stage(config.stage)
        self.init_source = init_from.prepare(config)  # completes config.model from the checkpoint's
        model_config = self.stage.build_config(config.model, config.ae_path)
        check_compatibility(config, model_config, self.loader.manifest)
        self.masked = check_finetune_data(config, model_config, self.loader)  # loss masks: response-only loss
        for source in getattr(self.loader, "sources", [self.loader]):
            check_tokenizer(source.data_dir, source.manifest)
        if self.init_source is not None:
            init_from.check_tokenizer(self.init_source, self.loader.manifest, source.data_dir)
        if config.stage == "calm":
            check_export_weights(config.ae_path)
        if config.eval_every:
            # One validation loader for the whole run, rewound before each validation.
            # By metric prefix: "" the whole data, "NAME/" each source of a mixture.
            self.val_loaders = val_loaders(config, world)
            self.val_starts = {prefix: loader.state_dict() for prefix, loader in self.val_loaders.items()}
        # Every shard the run will read is checksummed now, not when it is first opened (hours in);
        # remote shards are checked by their cache as they arrive instead (not all downloaded here).
        for loader in (self.loader, *getattr(self, "val_loaders", {}).values()):
            if not getattr(loader, "is_remote", False):
                loader.verify_all()
        self.block_len = self.loader.block_len
        if config.max_train_flops:
            apply_flops_budget(config, model_config, self.block_len, world)
        self.precision = resolve_precision(config, world.device)
        self.ds_config = build_ds_config(config, world.world_size, self.precision, REPO_ROOT)
        if resume:
            universal = bool(self.ds_config.get("checkpoint", {}).get("load_universal", False))
            self.resume_tag = checkpoint.select(config, world, universal)
            checkpoint.check_world_size(config, world, universal, self.resume_tag)
            checkpoint.check_model(config, self.resume_tag)
        # Resuming: the checkpoint's weights replace whatever init_from would have given.
        self.engine, self.optimizer = build_engine(config, model_config, self.ds_config, world.device, self.precision,
                                                   None if resume else self.init_source, world.is_main)
        self.dtype = dtype_of(self.precision)
        self.tokens_per_step = self.engine.train_batch_size() * self.block_len
        self.flops_per_token = self.stage.train_flops_per_token(model_config, self.block_len)
        self.peak = peak_tflops(world.device)
        self._stop_signal = 0
        self.logger = self._progress = None

    def _on_signal(self, signum, frame) -> None:
        """SIGTERM or Ctrl-C: finish the step, checkpoint, exit. A second Ctrl-C exits at once."""
        if signum == signal.SIGINT and self._stop_signal == signal.SIGINT:
            # os.write, not print: the handler may interrupt a print to the same stream.
            os.write(2, b"\nsecond Ctrl-C: exiting now without a checkpoint; the next run resumes from the newest "
                        b"complete one\n")
            os._exit(EXIT_SIGINT)
        if signum == signal.SIGINT and self.world.is_main:
            os.write(2, b"\nCtrl-C: saving a checkpoint after this step (Ctrl-C again to exit at once)\n")
        self._stop_signal = self._stop_signal or signum

    def _set_lr(self, step: int) -> float:
        lr = lr_at(self.config, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _save(self, state: TrainState) -> Path:
        try:
            return checkpoint.save(self.engine, self.config, self.world, state)
        except checkpoint.NonFiniteWeightsError as exc:
            raise TrainingError(str(exc)) from exc

    def _start(self) -> TrainState:
        """The state to continue from: the selected checkpoint's, or step 0 with per-rank noise streams."""
        if self.resume:
            state = checkpoint.load(self.engine, self.config, self.world, self.resume_tag)
            if self.world.is_main:
                where = checkpoint.checkpoint_root(self.config.run_dir) / self.resume_tag
                print(f"resuming from step {state.step} (checkpoint {where})", flush=True)
            return state
        # Same weights everywhere (built from `seed`), but per-rank dropout/noise streams.
        seed_everything(self.config.seed + self.world.rank)
        return TrainState()

    def run(self) -> int:
        config, world = self.config, self.world
        Path(config.run_dir).mkdir(parents=True, exist_ok=True)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        try:
            state = self._start()
            if state.loader is not None:
                self.loader.load_state_dict(state.loader)
            if world.is_main:
                save_config(config, Path(config.run_dir) / "config.yaml")
            self.logger = MetricsLogger(config.run_dir, world.is_main, config.wandb, config.to_dict(),
                                        state.wandb_run_id, resume_step=state.step)
            state.wandb_run_id = self.logger.run_id if world.is_main else None
            return self.train(state)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self._progress is not None:
                self._progress.close()
            if self.logger is not None:
                self.logger.close()

    def train_step(self, data, metrics: bool = True) -> StepResult:
        """One optimizer step: forward/backward over `grad_accum_steps` micro-batches, the engine's
        step (it accumulates, clips and applies at the last one), then one host sync for all ranks'
        verdicts (finite loss and gradient norm, a stop signal). `metrics=False` (a step that is not logged)
        skips the per-step extras such as the autoencoder's accuracy."""
        engine, device = self.engine, self.world.device
        skipped_before = engine.skipped_steps
        losses, aux = [], {}
        for _ in range(self.config.grad_accum_steps):
            out = forward(engine, self.config.stage, next(data).to(device, non_blocking=True), metrics=metrics,
                          ce_chunk_rows=self.config.ce_chunk_rows)
            engine.backward(out.loss)
            engine.step()
            losses.append(out.loss.detach().float())
            for name in AUX_METRICS:
                value = getattr(out, name, None)
                if value is not None:
                    aux.setdefault(name, []).append(value.detach().float().mean())
            del out  # the output's tensors need not live into the next micro-batch
        losses = torch.stack(losses)
        norm = engine.get_global_grad_norm()
        norm_finite = torch.isfinite(torch.as_tensor(0.0 if norm is None else norm, device=device))
        flags = torch.stack([~torch.isfinite(losses).all(), ~norm_finite]).float()
        flags = torch.cat([flags, torch.tensor([float(self._stop_signal)], device=device)])
        bad_loss, bad_norm, stop = distributed.all_reduce(flags, op="max").tolist()
        applied = engine.skipped_steps == skipped_before
        if bad_norm and applied:
            # The engine applied a non-finite update (DeepSpeed skips such steps in 0.19.8; this guards
            # any version or path that does not): the weights are poisoned, so nothing may be saved.
            raise TrainingError("the engine applied a step with a non-finite gradient norm; the weights "
                                f"are no longer finite and were not saved ({self.config.run_dir}/checkpoints "
                                "holds the last good state)")
        return StepResult(losses, {k: torch.stack(v) for k, v in aux.items()}, not (bad_loss or bad_norm),
                          applied, int(stop))

    def train(self, state: TrainState) -> int:
        """Steps until `max_steps` (or a stop signal): log, validate and checkpoint on their schedules."""
        from tqdm import tqdm

        config, world = self.config, self.world
        data = iter(self.loader)
        # closed by run() too, so that an error message does not land on the bar's line
        progress = self._progress = tqdm(total=config.max_steps, initial=state.step, disable=not world.is_main,
                                         desc=config.stage, dynamic_ncols=True)
        if state.step == 0 and config.init_from and config.eval_every:
            self.validate(0, 0)  # the starting point's validation metrics: what fine-tuning improves on
        window = Window()
        self.engine.train()
        skipped_in_a_row = 0
        while state.step < config.max_steps:
            before = state.capture(self.loader)
            lr = self._set_lr(state.step)
            result = self.train_step(data, metrics=self._logged(state.step + 1))
            if config.nan_policy == "stop" and not (result.finite and result.applied):
                self._save(before)
                raise TrainingError(
                    f"non-finite {'gradient norm' if result.applied else 'loss or gradient norm'} at step "
                    f"{state.step + 1}; saved the last good state (after step {state.step}) to "
                    f"{config.run_dir}/checkpoints. Lower optim.lr, raise warmup, or set nan_policy=skip")
            state.step += 1
            state.tokens_seen += self.tokens_per_step
            window.add(result, self.tokens_per_step)
            progress.update(1)
            skipped_in_a_row = 0 if result.finite and result.applied else skipped_in_a_row + 1
            give_up = skipped_in_a_row >= config.nan_skip_limit
            if self._after_step(state, lr, window, result.stop_signal, progress, save=give_up):
                progress.close()
                return 128 + result.stop_signal
            if give_up:
                first = state.step - skipped_in_a_row + 1
                raise TrainingError(
                    f"nan_policy=skip gave up: steps {first}-{state.step} all had a non-finite loss or gradient "
                    f"norm and were skipped (nan_skip_limit={config.nan_skip_limit} in a row); the weights are "
                    f"still those of step {first - 1}, checkpointed as step {state.step} in {config.run_dir}/"
                    "checkpoints. Lower optim.lr or raise optim.warmup_steps")
        progress.close()
        return 0

    def _logged(self, step: int) -> bool:
        """Whether the training record is written after optimizer step `step` (1-based)."""
        return step % self.config.log_every == 0 or step == self.config.max_steps

    def _after_step(self, state: TrainState, lr: float, window: "Window", stop: int, progress,
                    save: bool = False) -> bool:
        """Logging, validation and checkpoints due after `state.step` (`save` forces one); True when
        the run must stop (`stop` is the stop signal, 0 for none)."""
        config = self.config
        logged = self._logged(state.step)
        if logged:
            record = self._train_record(state, lr, window)
            progress.set_postfix(loss=f"{record['loss']:.4f}")
        if config.eval_every and (state.step % config.eval_every == 0 or state.step == config.max_steps):
            self.validate(state.step, state.tokens_seen)
        due = config.save_every and state.step % config.save_every == 0
        if stop or due or save or state.step == config.max_steps:
            self._save(state.capture(self.loader))
        if stop and self.world.is_main:
            name = "SIGTERM" if stop == signal.SIGTERM else "Ctrl-C (SIGINT)"
            progress.write(f"{name}: saved checkpoint at step {state.step} in {config.run_dir}/checkpoints; "
                           f"run the same command again to resume (exit code {128 + stop})")
        if logged:
            # Validation and checkpoint time stay out of the next window's tokens/s.
            window.reset()
        return stop

    def _train_record(self, state: TrainState, lr: float, window: "Window") -> dict[str, Any]:
        elapsed = time.perf_counter() - window.start
        loss, aux = window.means(self.config.grad_accum_steps)
        # Averaged over the window's applied steps and over all ranks.
        means = distributed.all_reduce(torch.tensor([loss, *aux.values()], dtype=torch.float64))
        means = (means / self.world.world_size).tolist()
        tokens_per_s = window.tokens / elapsed
        grad_norm = self.engine.get_global_grad_norm()
        record = {"split": "train", "step": state.step, "tokens_seen": state.tokens_seen, "loss": means[0],
                  **dict(zip(aux, means[1:])), "lr": lr,
                  "grad_norm": None if grad_norm is None else float(grad_norm), "skipped_steps": window.skipped,
                  "tokens_per_s": tokens_per_s, "step_time_s": elapsed / max(1, window.steps + window.skipped),
                  "train_flops": self.flops_per_token * state.tokens_seen,
                  "tflops": self.flops_per_token * tokens_per_s / 1e12}
        if self.peak is not None:
            record["mfu"] = record["tflops"] / (self.peak * self.world.world_size)
        record.update(memory_stats(self.world.device))
        if hasattr(self.loader, "proportions"):  # a mixture: the realised share of each source so far
            record.update({f"mix/{name}": share for name, share in self.loader.proportions().items()})
        self.logger.log(record)
        return record

    @torch.no_grad()
    def validate(self, step: int, tokens_seen: int) -> dict[str, Any]:
        """Mean validation metrics over `eval_batches` batches per rank (same count on every rank,
        since every ZeRO-3 forward is collective), with a fixed seed so steps are comparable."""
        config, world, engine = self.config, self.world, self.engine
        plain_ae = self._plain_autoencoder() if config.stage == "autoencoder" else None
        engine.eval()
        sums: dict[str, torch.Tensor] = {}
        for prefix, loader in self.val_loaders.items():
            loader.load_state_dict(self.val_starts[prefix])
            with torch.random.fork_rng(devices=[world.device] if world.device.type == "cuda" else []):
                torch.manual_seed(config.seed)
                for _, batch in zip(range(config.eval_batches), loader):
                    for name, value in self._eval_batch(batch.to(world.device), plain_ae).items():
                        sums[prefix + name] = sums.get(prefix + name, 0.0) + value.detach().double()
        names = sorted(sums)
        totals = distributed.all_reduce(torch.stack([sums[n] for n in names]))
        record = {"split": "validation", "step": step, "tokens_seen": tokens_seen,
                  **{n: v / (config.eval_batches * world.world_size) for n, v in zip(names, totals.tolist())}}
        record.update(self._brier_probe())
        engine.train()
        self.logger.log(record)
        return record

    def _brier_probe(self) -> dict[str, float]:
        """BrierLM on the first `eval_brier_blocks` validation blocks of each rank (pretrain.brier.probe)."""
        config = self.config
        if not config.eval_brier_blocks or config.stage == "autoencoder" or self.masked:
            return {}  # fine-tuning data: BrierLM over prompts and padding would mean little
        from pretrain.brier.probe import brier_probe

        loader = next(iter(self.val_loaders.values()))
        loader.load_state_dict(next(iter(self.val_starts.values())))
        blocks = torch.cat([batch for _, batch in zip(range(config.eval_brier_blocks), loader)])[:config.eval_brier_blocks]
        zero3 = self.ds_config["zero_optimization"]["stage"] == 3
        with torch.random.fork_rng(devices=[self.world.device] if self.world.device.type == "cuda" else []):
            return brier_probe(self.engine.module, config.stage, blocks.to(self.world.device),
                               config.seed + self.world.rank, zero3)

    def _eval_batch(self, batch: torch.Tensor, plain_ae) -> dict[str, torch.Tensor]:
        if plain_ae is not None:
            out = plain_ae(input_ids=batch, ce_chunk_rows=self.config.ce_chunk_rows)
            return {"loss": out.loss, "ce": out.ce, "accuracy_mean_latent": out.accuracy,
                    "reconstruction_accuracy": plain_ae.reconstruction_accuracy(batch, sample=True)}
        out = forward(self.engine, self.config.stage, batch, ce_chunk_rows=self.config.ce_chunk_rows)
        return {"loss": out.loss, self.stage.validation_metric: out.loss}

    def _plain_autoencoder(self):
        """A whole copy of the autoencoder being trained, for reconstruction_accuracy, which is not a
        forward call and so would find its weights partitioned under ZeRO-3 (the model is small)."""
        import deepspeed

        module = self.engine.module
        zero3 = self.ds_config["zero_optimization"]["stage"] == 3
        with deepspeed.zero.GatheredParameters(list(module.parameters())) if zero3 else nullcontext():
            state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        plain = self.stage.model_class(module.config).to(self.world.device)
        plain.load_state_dict(state)
        return plain.to(self.dtype).eval()


class Window:
    """Training metrics between two log lines, kept as device tensors until they are logged."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.aux: dict[str, list[torch.Tensor]] = {}
        self.steps = self.skipped = self.tokens = 0
        self.start = time.perf_counter()

    def add(self, result: StepResult, tokens: int) -> None:
        self.tokens += tokens
        if not result.applied:
            self.skipped += 1
            return
        self.steps += 1
        self.losses.append(result.losses)
        for name, values in result.aux.items():
            self.aux.setdefault(name, []).append(values)

    def means(self, accum: int) -> tuple[float, dict[str, float]]:
        """(mean loss, {name: mean}) over the applied steps; NaN loss when none was applied."""
        if not self.steps:
            return math.nan, {name: math.nan for name in self.aux}
        loss = 0.0
        for row in torch.stack(self.losses).tolist():
            # Summed in this order, in Python floats, so logged losses stay bit-identical across refactors.
            step_loss = 0.0
            for value in row:
                step_loss += value / accum
            loss += step_loss
        # Per name over the micro-batches that reported it (the autoencoder's accuracy: logged steps only).
        aux = {name: float(torch.stack(v).double().sum()) / torch.stack(v).numel() for name, v in self.aux.items()}
        return loss / self.steps, aux
