"""The evaluation-result JSON that `python -m evaluation` writes and `python -m evaluation.report` reads.

One file per (model, data, context), by default `RUN_DIR/eval/<data>-ctx<context>.json`:

    {
      "schema": "calm-eval/1",
      "created": "2026-01-01T00:00:00+00:00",      ISO time (UTC)
      "command": ["python", "-m", "evaluation", ...],
      "model": {
        "name": "calm-m",                          run directory name
        "path": "runs/calm-m/export",              the exported HF directory evaluated
        "run_dir": "runs/calm-m" | null,           where metrics.jsonl lives, if known
        "stage": "calm" | "baseline" | "autoencoder",
        "patch_size": 4,                            K (1 for the baseline)
        "params": 371000000,                        evaluation.flops.param_count (CALM: without its AE)
        "inference_flops_per_token": 2.9e8,         evaluation.flops, at a 2048-step context
        "train_flops_per_token": 1.1e9              evaluation.flops at the evaluated context
      },
      "data": {
        "source": "wikitext103_test_documents.jsonl",
        "kind": "documents" | "shards",
        "split": "validation" | null,               shards only
        "documents": 62 | null,                     documents only
        "blocks": 70, "tokens": 280000,             after tokenisation / splitting (all ranks)
        "context": 8192,                            block length in tokens
        "max_blocks": null | int                    when the run was cut short on purpose
      },
      "brierlm": null | {                          CALM and baseline only
        "brierlm": 5.7, "brierlm_se": 0.1,          100 x geometric mean of Brier-1..4, floored at 0
        "brier_n": [b1, b2, b3, b4], "brier_n_se": [...],
        "positions": 270000,                        evaluated positions (same set for every n)
        "seed": 0, "world_size": 1, "forward_calls": 280, "seconds": 12.3, "device": "cuda", "dtype": "float32"
      },
      "reconstruction": null | {                   autoencoder only
        "accuracy": 0.9991,                         z sampled from the posterior
        "accuracy_mean": 0.9995,                    z = mu
        "tokens": 280000,
        "robustness": [{"noise_std": 0.0, "accuracy": 0.9991}, ...],
        "seed": 0, "seconds": 1.2
      },
      "generation": null | {"tokens_per_second": 198.0, ...}   filled by whoever measures it
    }

`read_result` checks the schema tag and the keys the report needs and names the file and key when
something is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

SCHEMA = "calm-eval/1"
_REQUIRED = {
    "model": ("name", "path", "stage", "params", "inference_flops_per_token"),
    "data": ("source", "kind", "context", "blocks", "tokens"),
}


def read_jsonl(path: str | Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of every non-blank line; a malformed line names file and line."""
    path = Path(path)
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None


def write_result(path: str | Path, result: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)
    return path


def read_result(path: str | Path) -> dict:
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(result, dict) or result.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not an evaluation result (expected \"schema\": \"{SCHEMA}\")")
    for section, keys in _REQUIRED.items():
        if not isinstance(result.get(section), dict):
            raise ValueError(f"{path}: missing section {section!r}")
        for key in keys:
            if key not in result[section]:
                raise ValueError(f"{path}: missing key {section}.{key}")
    for section in ("brierlm", "reconstruction", "generation"):
        result.setdefault(section, None)
    return result
