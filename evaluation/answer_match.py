"""Exact-match answers of a fine-tuned model on the held-out records of fine-tuning shards.

    python -m evaluation.answer_match --model runs/finetune/calm/export --data data/toy_sft \
        [--split validation] [--limit 200] [--temperature 1.0] [--seed 0]

Each record of the split (`python -m data_prep --finetune`, packed or not) is read back from its
block: the prompt is everything of the record before its first scored token, already aligned as in
training (left padding, EOS, prompt), and the answer is the scored tokens (the response and its
EOS). The model samples up to the longest answer's length after each prompt (CALM: its exact
sampler; baseline: pure temperature), and a record counts as matched when the generated tokens up
to and including the first EOS are exactly its answer; `answer_prefix` counts the records whose
generated tokens merely begin with the answer less its EOS (for a model that writes the right
answer but cannot stop: the quick start's tiny autoencoder never reconstructs EOS, so its CALM
cannot end a text). Prints one JSON line: model, kind, split, records, temperature, exact_match,
answer_prefix. A cheap task-level check beside the response-only loss that training logs; at
temperature 1 it measures samples, not the mode.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from evaluation.baseline_generation import baseline_generate
from evaluation.export_dir import load_generator
from pretrain.data import ManifestError, ShardError, ShardLoader
from pretrain.models.generation import calm_generate


def records(data: str, split: str, limit: int) -> list[tuple[list[int], list[int]]]:
    """(aligned prompt ids, answer ids) of the first `limit` records of a masked split."""
    loader = ShardLoader(data, split, 1, shuffle=False, epochs=1, drop_last=False)
    if not loader.masked:
        raise ManifestError(f"{data} holds pretraining shards; answer_match reads fine-tuning data (data_prep --finetune)")
    out = []
    for batch in loader:
        ids, mask, pos = batch.input_ids[0], batch.loss_mask[0], batch.positions()[0]
        bounds = [*(pos == 0).nonzero().flatten().tolist(), len(ids)]  # records of a packed block
        for a, b in zip(bounds, bounds[1:]):
            if not mask[a:b].any():  # the filler after a packed block's last record
                continue
            start = a + int(mask[a:b].int().argmax())
            out.append((ids[a:start].tolist(), ids[a:b][mask[a:b]].tolist()))
            if len(out) == limit:
                return out
    return out


def exact_match(generated: list[list[int]], answers: list[list[int]], eos: int) -> float:
    """Share of rows whose tokens up to and including the first EOS equal the answer."""
    hits = 0
    for row, answer in zip(generated, answers):
        hits += (row[: row.index(eos) + 1] if eos in row else row) == answer
    return hits / len(answers)


def answer_prefix(generated: list[list[int]], answers: list[list[int]]) -> float:
    """Share of rows that begin with their answer less its closing EOS (whatever follows)."""
    return sum(row[: len(answer) - 1] == answer[:-1] for row, answer in zip(generated, answers)) / len(answers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluation.answer_match", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported CALM or baseline directory")
    p.add_argument("--data", required=True, help="fine-tuning data directory (data_prep --finetune)")
    p.add_argument("--split", default="validation")
    p.add_argument("--limit", type=int, default=200, help="records to score (the first ones of the split)")
    p.add_argument("--temperature", type=float, default=1.0, help="CALM: in (0, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ae-path", help="CALM: autoencoder directory for checkpoints whose config lacks ae_config")
    a = p.parse_args(argv)
    try:
        pairs = records(a.data, a.split, a.limit)
        model, kind = load_generator(a.model, a.ae_path)
        eos, pad = model.config.eos_token_id, model.config.pad_token_id
        prompts, answers = [q for q, _ in pairs], [r for _, r in pairs]
        run = calm_generate if kind == "calm" else baseline_generate
        with torch.no_grad():
            out = run(model, prompts, max(map(len, answers)), temperature=a.temperature, eos_token_id=eos,
                      pad_token_id=pad, seed=a.seed)
    except (ManifestError, ShardError, FileNotFoundError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"model": a.model, "kind": kind, "split": a.split, "records": len(pairs),
                      "temperature": a.temperature, "exact_match": exact_match(out.sequences.tolist(), answers, eos),
                      "answer_prefix": answer_prefix(out.sequences.tolist(), answers)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
