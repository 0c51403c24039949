"""gpu-check step 2e: packed fine-tuning records stay apart under the attention kernel the models pick.

Packed blocks (`data_prep --finetune --pack`) rely on transformers reading position ids that restart
at every record; its flash-attention path does so only for a batch of one row, which is how the
models feed such batches there (`pretrain.models.attention.packs_in_one_row`). On the CPU the tests
prove that layout under SDPA; this step proves it with the GPU's own kernel in bf16: the baseline's
logits and CALM's backbone states for each record of a packed batch against the same record run
alone, rel_rms <= 2e-2 (bf16 rounding; a record that sees the ones before it is off by far more,
which the `leaky` value shows: the same comparison without the position ids).
"""

from __future__ import annotations

import torch

from bench.gpu_check_numerics import BF16_TOL, rel_rms


def packed_rows(length: int, k: int) -> tuple[list[list[int]], torch.Tensor]:
    """Record lengths of two rows (multiples of k, each >= 2k, filling the row) and their position ids."""
    quarter = max(2 * k, length // 4 // k * k)
    layouts = [[quarter, length - 3 * quarter, 2 * quarter], [2 * quarter, quarter, length - 3 * quarter]]
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in layouts])
    return layouts, positions


def _baseline_logits(model, ids, positions):
    from pretrain.models.attention import as_one_row, packs_in_one_row

    if positions is not None and packs_in_one_row(model.config):  # as pretrain.stages feeds packed batches
        out = model(*as_one_row(ids), position_ids=as_one_row(positions)[0], use_cache=False)
        return out.logits.reshape(*ids.shape, -1)
    return model(input_ids=ids, position_ids=positions, use_cache=False).logits


def _calm_states(model, ids, positions):
    """The backbone state before each chunk from the second on (CALM.forward's own layout logic)."""
    return model(input_ids=ids, loss_mask=torch.ones_like(ids), position_ids=positions).last_hidden_state


@torch.no_grad()
def step_packing(model_kwargs: dict, device: torch.device, seq: int) -> list[dict]:
    from pretrain.stages import build_model

    rows = []
    for name, run, unit in (("baseline", _baseline_logits, 1), ("calm", _calm_states, None)):
        torch.manual_seed(0)
        with torch.device(device):
            model = build_model(name, dict(model_kwargs[name], num_hidden_layers=2), device=device,
                                dtype=torch.bfloat16).eval()
        if name == "calm":
            model.ae_model.float()
        k = unit or model.config.patch_size
        layouts, positions = packed_rows(seq, k)
        ids = torch.randint(0, model.config.vocab_size, positions.shape, generator=torch.Generator().manual_seed(0))
        ids, positions = ids.to(device), positions.to(device)
        packed, leaky, alone = run(model, ids, positions), run(model, ids, None), []
        got, bad = [], []
        for r, lengths in enumerate(layouts):
            start = 0
            for n in lengths:
                alone.append(run(model, ids[r:r + 1, start:start + n], None)[0].float())
                # CALM: states of chunks start/k .. (start+n)/k - 2 predict the record's own chunks
                span = slice(start, start + n) if name == "baseline" else slice(start // k, (start + n) // k - 1)
                got.append(packed[r, span].float())
                bad.append(leaky[r, span].float())
                start += n
        err, leak = rel_rms(torch.cat(got), torch.cat(alone)), rel_rms(torch.cat(bad), torch.cat(alone))
        rows.append({"check": f"packed records {name} bf16", "value": f"rel_rms {err:.1e} (leaky {leak:.1e})",
                     "ok": err <= BF16_TOL and leak > err, "detail": {
                         "rel_rms": err, "leaky_rel_rms": leak, "tolerance": BF16_TOL, "layouts": layouts,
                         "attn_implementation": model.config._attn_implementation}})
        del model
    return rows
