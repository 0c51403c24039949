"""gpu-check steps 3 and 4: training through the real engine, the non-finite step, evaluation and generation.

Training rows come from `bench.train_throughput.bench_preset` (DeepSpeed ZeRO-3 built exactly as
`python -m pretrain` builds it, NCCL on a GPU, gloo on the CPU); the non-finite check runs the real
`Trainer` on a small prepared data directory with one micro-batch's loss turned into NaN.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
from pathlib import Path

import torch


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def step_training(variants: list[dict], world, scratch: Path, steps: int, warmup: int,
                  deadline: float = float("inf")) -> list[dict]:
    """Step 3a: tokens/s, TFLOP/s, MFU and peak memory of each variant (preset, block, micro-batch,
    overrides); a variant that fails (out of memory, say) is reported and the others still run; those
    that would start after `deadline` (a `time.perf_counter()` value) are skipped."""
    from bench.train_throughput import bench_preset

    rows = []
    for v in variants:
        args = argparse.Namespace(micro_batch=v["micro_batch"], overrides=v["overrides"], ae_preset=v.get("ae_preset"),
                                  steps=steps, warmup=warmup)
        label = f"train {v['preset']} {v['label']}"
        if time.perf_counter() > deadline:
            rows.append({"check": label, "value": "skipped: time budget spent", "ok": False})
            continue
        try:
            r = bench_preset(v["preset"], v["block_len"], args, world, scratch)
        except Exception as exc:  # noqa: BLE001 - one variant's failure must not hide the others
            rows.append({"check": label, "value": f"FAILED {type(exc).__name__}: {str(exc)[:200]}", "ok": False})
            _release(world.device)
            continue
        peak = r.get("mem_allocated_gib", r.get("peak_rss_gib"))
        mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else ""
        rows.append({"check": label, "value": f"{r['tokens_per_s']:.0f} tok/s, {r['tflops']:.3g} TFLOP/s{mfu}, "
                                              f"peak {peak:.1f} GiB", "ok": None, "detail": r})
        _release(world.device)
    return rows


def write_corpus(path: Path, docs: int = 160, seed: int = 0) -> None:
    """A JSONL corpus of pseudo-words: enough text for a 512-token BPE and a few hundred 64-token blocks."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("etaoinshrdlucmfwyp") for _ in range(rng.randint(2, 8))) for _ in range(600)]
    lines = [json.dumps({"text": " ".join(rng.choice(words) for _ in range(120)) + "."}) + "\n" for _ in range(docs)]
    path.write_text("".join(lines))


def prepare_tiny_data(out: Path) -> Path:
    """A real prepared data directory (trained tokenizer, shards, manifest) through `data_prep`."""
    from data_prep.__main__ import main as prep

    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.jsonl"
    write_corpus(corpus)
    data = out / "data"
    prep(["--input", str(corpus), "--train-tokenizer", "--vocab-size", "512", "--block-len", "64",
          "--patch-size", "4", "--val-fraction", "0.2", "--workers", "1", "--no-progress", "--output", str(data)])
    return data


def _poisoned_run(data: Path, run_dir: Path, policy: str, world, precision: str) -> tuple[str, list]:
    """A 4-step baseline-tiny run whose 2nd step has a NaN loss; returns (outcome, skipped_steps per step)."""
    import pretrain.train as train
    from pretrain.config import load_config

    config = load_config("baseline-tiny", [f"data.path={data}", f"run_dir={run_dir}", "max_steps=4", "log_every=1",
                                           "save_every=1", "eval_every=0", "micro_batch_size=4", "grad_accum_steps=2",
                                           f"precision={precision}", f"nan_policy={policy}", "export=false",
                                           "wandb.mode=disabled", "optim.warmup_steps=1"])
    real, calls = train.forward, {"n": 0}

    def poisoned(engine, stage, batch, **options):
        out = real(engine, stage, batch, **options)
        calls["n"] += 1
        if calls["n"] == 4:  # the 2nd micro-batch of step 2
            out.loss = out.loss * float("nan")
        return out

    train.forward = poisoned
    try:
        trainer = train.Trainer(config, world)
        try:
            outcome = f"exit {trainer.run()}"
        except train.TrainingError as exc:
            outcome = f"stopped: {str(exc)[:80]}"
        trainer.engine.destroy()
    finally:
        train.forward = real
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return outcome, [r.get("skipped_steps") for r in records if r["split"] == "train"]


def _saved_checkpoints_finite(run_dir: Path) -> tuple[str, bool]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root = run_dir / "checkpoints"
    tag = (root / "latest").read_text().strip()
    state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    return tag, all(bool(torch.isfinite(t).all()) for t in state.values())


def step_nonfinite(scratch: Path, world, precision: str) -> list[dict]:
    """Step 3b: through the real Trainer, a NaN step is skipped (nan_policy=skip) or stops the run with
    the last good checkpoint (stop); every checkpoint named `latest` afterwards holds finite weights."""
    data = prepare_tiny_data(scratch / "nonfinite")
    rows = []
    for policy, want_tag in (("skip", "step_00000004"), ("stop", "step_00000001")):
        run_dir = scratch / "nonfinite" / policy
        outcome, skipped = _poisoned_run(data, run_dir, policy, world, precision)
        tag, finite = _saved_checkpoints_finite(run_dir)
        refused = skipped[:2] == [0, 1] if policy == "skip" else outcome.startswith("stopped")
        rows.append({"check": f"non-finite step, nan_policy={policy}",
                     "value": f"{outcome}; skipped {skipped}; latest {tag} finite={finite}",
                     "ok": refused and finite and tag == want_tag,
                     "detail": {"outcome": outcome, "skipped_steps": skipped, "latest": tag, "finite": finite}})
        _release(world.device)
    return rows


def _timed(fn, device: torch.device) -> tuple[float, object]:
    fn()  # warm-up: kernel selection, allocator growth
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def step_brierlm(models: dict, device: torch.device, blocks: dict) -> list[dict]:
    """Step 4a: BrierLM positions/s of the baseline (batched estimator; its output matrix sharpened to
    collision 0.4 so branches are taken as for a trained model) and of CALM (2 samples per position)."""
    from bench.brierlm import sharpen
    from pretrain.brier.brierlm import baseline_brier_batched
    from pretrain.brier.calm_brier import CALMSampler, calm_brier

    rows = []
    base = models["baseline"]
    ids = blocks["baseline"].to(device)
    with torch.no_grad():
        sharpen(base, ids, 0.4)
    gen = torch.Generator()  # the baseline estimator draws its uniforms on the CPU
    secs, est = _timed(lambda: baseline_brier_batched(base, ids, generator=gen.manual_seed(0)), device)
    rows.append({"check": "BrierLM baseline", "value": f"{est.estimates.shape[0] / secs:.0f} positions/s",
                 "ok": None, "detail": {"positions": est.estimates.shape[0], "seconds": secs,
                                        "forward_calls": est.forward_calls, "tokens": ids.shape[1]}})
    calm = models["calm"]
    ids = blocks["calm"].to(device)
    gen = torch.Generator(device=device)  # CALM's head draws its noise on the model's device
    secs, est = _timed(lambda: calm_brier(CALMSampler(calm, generator=gen.manual_seed(0)), ids), device)
    rows.append({"check": "BrierLM calm", "value": f"{est.estimates.shape[0] / secs:.0f} positions/s",
                 "ok": None, "detail": {"positions": est.estimates.shape[0], "seconds": secs,
                                        "forward_calls": est.forward_calls, "tokens": ids.shape[1]}})
    return rows


def step_generation(models: dict, device: torch.device, new_tokens: int, prompt_len: int,
                    repeats: int) -> list[dict]:
    """Step 4b: CALM (exact sampler, synthetic head of collision 0.4: see bench.generate) against the
    same-size baseline (transformers' generate), tokens/s at T = 1 and 0.5, batch 1 and 16."""
    from bench.generate import synthetic_head, timed
    from evaluation.baseline_generation import baseline_generate
    from pretrain.models.generation import calm_generate

    calm, base = models["calm"], models["baseline"]
    synthetic_head(calm, 0.4)
    rows = []
    gen = torch.Generator().manual_seed(1)
    for batch in (1, 16):
        prompts = torch.randint(2, base.config.vocab_size, (batch, prompt_len), generator=gen).tolist()
        for temperature in (1.0, 0.5):
            runs = [lambda p=prompts, t=temperature: baseline_generate(base, p, new_tokens, t, eos_token_id=None,
                                                                        pad_token_id=0),
                    lambda p=prompts, t=temperature: calm_generate(calm, p, new_tokens, t, eos_token_id=None)]
            runs[0](), runs[1]()  # warm-up
            (t_base, _), (t_calm, out) = timed(runs, repeats)
            rate_base, rate_calm = batch * new_tokens / t_base, batch * new_tokens / t_calm
            ratio = f"{rate_calm / rate_base:.2f}x"
            rows.append({"check": f"generate batch {batch} T={temperature}",
                         "value": f"calm {rate_calm:.0f} vs baseline {rate_base:.0f} tok/s ({ratio})",
                         "ok": None, "detail": {"calm_tokens_per_s": rate_calm, "baseline_tokens_per_s": rate_base,
                                                "new_tokens": new_tokens, "calm_backbone_calls": out.backbone_calls}})
    return rows
