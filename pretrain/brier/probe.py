"""BrierLM while training: the same estimators as `python -m evaluation`, on a fixed validation subsample.

BrierLM is the one number that compares CALM with the baseline as they train (their losses are of
different kinds). At each validation the trainer scores the first `eval_brier_blocks` validation
blocks of every rank, each cut to PROBE_TOKENS tokens (a few hundred positions: cheap, with a
standard error that says how far to trust it), with a fixed seed so that steps are comparable.
Under ZeRO-3 the weights are gathered for the probe, since the estimators read them outside the
modules' own forward calls; every rank takes part (the gather is collective).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from pretrain.brier.brier_stats import BrierAccumulator
from pretrain.brier.brierlm import baseline_brier_batched
from pretrain.brier.calm_brier import CALMSampler, calm_brier

PROBE_TOKENS = 128


@torch.no_grad()
def brier_probe(module, stage: str, blocks: torch.Tensor, seed: int, zero3: bool) -> dict:
    """BrierLM summary (all ranks together) of `module` on `blocks` (B, L) of this rank."""
    import deepspeed

    k = getattr(module.config, "patch_size", 1) if stage == "calm" else 1
    length = min(blocks.shape[1], PROBE_TOKENS) // k * k
    ids = blocks[:, :length]
    gather = deepspeed.zero.GatheredParameters(list(module.parameters())) if zero3 else nullcontext()
    acc = BrierAccumulator()
    # the estimators switch flash-attention to SDPA (they need custom masks); training switches back
    attention = getattr(module.config, "_attn_implementation", None)
    with gather:
        if stage == "calm":
            sampler = CALMSampler(module, torch.Generator(device=ids.device).manual_seed(seed))
            acc.add(calm_brier(sampler, ids).estimates)
        else:
            generator = torch.Generator().manual_seed(seed)
            acc.add(baseline_brier_batched(module, ids, torch.full((ids.shape[0],), length), generator).estimates)
    if attention is not None and module.config._attn_implementation != attention:
        module.set_attn_implementation(attention)
    acc.all_reduce()
    summary = acc.summary()
    return {"brierlm": summary["brierlm"], "brierlm_se": summary["brierlm_se"],
            **{f"brier_{n + 1}": v for n, v in enumerate(summary["brier_n"])}, "brier_positions": summary["positions"]}
