"""What one `python -m evaluation --model X` will do, settled and checked before any model is evaluated.

Every `--model` is planned first (directory kind, context, positions, tokenizer, data compatibility),
so a bad entry in a list fails before a result is written for the good ones. The context defaults to
the block length the model was trained on (the export's `training.json`, else its run's data
manifest); only models without such a record (e.g. converted released checkpoints) fall back to the
paper's protocol, 2048 tokens (CALM: 2048 steps of K tokens), and the result says which. A context
past the model's positions is refused unless `--allow-long-context`, which marks the result.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from data_prep.manifest import check_compatible, read_manifest
from data_prep.sources import sha256_file as file_sha256
from pretrain.stages import stage_of_model_type

PAPER_STEPS = 2048


@dataclass
class Plan:
    path: str
    export: Path
    run_dir: Path | None
    stage: str
    k: int
    """Tokens per backbone position: K for CALM and the autoencoder, 1 for the baseline."""
    context: int
    """Block length in tokens."""
    context_source: str
    """'argument', 'trained' (the training block length) or 'paper' (2048 positions)."""
    positions: int | None
    """The longest block the model reads, in tokens (None: the context-free autoencoder)."""
    data: dict = field(default_factory=dict)
    """What the result records about the data: source, kind, split, sha256, tokenizer sha256, protocol."""


def resolve_model_dir(path: str) -> tuple[Path, Path | None, str]:
    """(export dir, run dir or None, stage) for a run or export directory."""
    root = Path(path)
    if (root / "export" / "config.json").is_file():
        export, run_dir = root / "export", root
    elif (root / "config.json").is_file():
        export = root
        run_dir = root.parent if (root.parent / "metrics.jsonl").is_file() else None
    else:
        raise FileNotFoundError(f"{root}: neither an exported model (config.json) nor a run directory with export/")
    model_type = json.loads((export / "config.json").read_text()).get("model_type")
    try:
        return export, run_dir, stage_of_model_type(model_type).name
    except ValueError as exc:
        raise ValueError(f"{export}/config.json: {exc}") from exc


def training_record(export: Path) -> dict:
    record = export / "training.json"
    return json.loads(record.read_text()) if record.is_file() else {}


def trained_block_len(export: Path, run_dir: Path | None) -> int | None:
    """The training block length: from the export's training.json, else from the run's data manifest."""
    block = training_record(export).get("block_len")
    if block:
        return int(block)
    config = run_dir / "config.yaml" if run_dir is not None else None
    if config is not None and config.is_file():
        data = (yaml.safe_load(config.read_text()) or {}).get("data", {}).get("path")
        if data and (Path(data) / "manifest.json").is_file():
            return int(read_manifest(data)["block_len"])
    return None


def _data_identity(args, export: Path, stage: str, vocab: int) -> dict:
    from data_prep.remote import is_url

    remote = is_url(args.data)  # shards served from object storage or HTTP, read through the verified cache
    data = args.data if remote else Path(args.data)
    if remote or data.is_dir():
        manifest = read_manifest(data)
        if args.split not in manifest["splits"]:
            raise ValueError(f"{data}: no split {args.split!r} (it has {sorted(manifest['splits'])})")
        check_compatible(manifest, vocab_size=vocab, tokenizer_sha256=training_record(export).get(
            "data_tokenizer", {}).get("sha256"), model=f"the model at {export}")
        shards = sorted(s["sha256"] for s in manifest["splits"][args.split]["shards"])
        return {"source": str(data), "kind": "shards", "split": args.split, "protocol": "shards",
                "sha256": hashlib.sha256("".join(shards).encode()).hexdigest(),
                "tokenizer_sha256": manifest["tokenizer"]["sha256"], "block_len": manifest["block_len"]}
    if not data.is_file():
        raise FileNotFoundError(f"evaluation data {data} does not exist")
    return {"source": str(data), "kind": "documents", "split": None, "protocol": args.protocol,
            "sha256": file_sha256(data)}


def plan_model(args, path: str) -> Plan:
    """Everything about evaluating one --model that can be checked without loading its weights."""
    export, run_dir, stage = resolve_model_dir(path)
    config = json.loads((export / "config.json").read_text())
    k = int(config.get("patch_size", 1)) if stage != "baseline" else 1
    positions = None if stage == "autoencoder" else int(config["max_position_embeddings"]) * k
    trained = trained_block_len(export, run_dir)
    if args.context:
        context, source = args.context, "argument"
    elif trained:
        context, source = trained, "trained"
    else:
        context, source = (PAPER_STEPS * k if stage == "calm" else PAPER_STEPS), "paper"
    data = _data_identity(args, export, stage, int(config["vocab_size"]))
    if data["kind"] == "shards" and context > data["block_len"]:
        if args.context:
            raise ValueError(f"--context {context} is longer than the shards' blocks ({data['block_len']} tokens, "
                             f"{args.data}): a shard block is never longer; use --context {data['block_len']} or less")
        context, source = data["block_len"], "shards"
    if context % k:
        raise ValueError(f"context {context} is not a multiple of the model's K={k} ({export})")
    if positions is not None and context > positions and not args.allow_long_context:
        raise ValueError(f"context {context} tokens is past the {positions} tokens the model at {export} can "
                         f"read (max_position_embeddings{f' x K={k}' if k > 1 else ''}); its scores would be "
                         "meaningless: use a shorter --context, or --allow-long-context to measure it anyway")
    data.update(context=context, context_source=source, trained_block_len=trained,
                beyond_positions=bool(positions is not None and context > positions))
    return Plan(path, export, run_dir, stage, k, context, source, positions, data)
