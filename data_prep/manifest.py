"""manifest.json: the one description of a prepared data directory, read by the loader and training.

`read_manifest` checks the keys the rest of the pipeline relies on; `check_compatible` is the one
rule, used by training and evaluation, that refuses a model whose vocabulary is not the tokenizer's,
whose patch size K does not divide the block length, or that was trained on another tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

FORMAT = "calm-token-shards/1"
REQUIRED = ("format", "tokenizer", "block_len", "dtype", "splits")
TOKENIZER_KEYS = ("name", "path", "vocab_size", "sha256", "eos_token_id", "pad_token_id")


class ManifestError(ValueError):
    """A data directory or its manifest is missing, malformed or incompatible; the message says which."""


def read_manifest(data_dir) -> dict:
    from data_prep.remote import is_url, local_mirror

    if is_url(data_dir):  # s3://, gs://, https://, hf://: read the cached copy of its manifest
        data_dir = local_mirror(data_dir)
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise ManifestError(f"{path} not found: prepare the data first (python -m data_prep --output {data_dir} ...)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path} is not valid JSON: {e}") from e
    missing = [k for k in REQUIRED if k not in manifest] + \
        [f"tokenizer.{k}" for k in TOKENIZER_KEYS if k not in manifest.get("tokenizer", {})]
    if missing:
        raise ManifestError(f"{path} lacks {', '.join(missing)}")
    if manifest["format"] != FORMAT:
        raise ManifestError(f"{path} has format {manifest['format']!r}; this code reads {FORMAT!r}")
    _check_counts(path, manifest)
    return manifest


def _check_counts(path: Path, manifest: dict) -> None:
    """Split totals agree with their shards, and every shard holds whole blocks: a manifest edited
    by hand (or damaged) is refused instead of being half believed."""
    block_len = manifest["block_len"]
    if not isinstance(block_len, int) or block_len <= 0 or not isinstance(manifest["splits"], dict):
        raise ManifestError(f"{path}: block_len must be a positive integer and splits a mapping of split names")
    for name, split in manifest["splits"].items():
        shards = split.get("shards") if isinstance(split, dict) else None
        if not isinstance(shards, list) or not all(isinstance(s, dict) and "samples" in s for s in shards):
            raise ManifestError(f"{path}: splits.{name}.shards must be a list of shard entries with 'samples'")
        for i, shard in enumerate(shards):
            if "tokens" in shard and shard["tokens"] != shard["samples"] * block_len:
                raise ManifestError(f"{path}: splits.{name}.shards[{i}] has {shard['tokens']} tokens, not samples x "
                                    f"block_len = {shard['samples'] * block_len}: the manifest was edited or is "
                                    "damaged; re-run data_prep")
        for key in ("samples", "tokens"):
            total = sum(s.get(key, 0) for s in shards)
            if key in split and split[key] != total:
                raise ManifestError(f"{path}: splits.{name}.{key} is {split[key]} but its shards hold {total}: the "
                                    "manifest was edited or is damaged; re-run data_prep")


def check_vocab(tokenizer_vocab: int, vocab_size: int, tokenizer: str, model: str) -> None:
    """A model reads and writes exactly its tokenizer's ids: the two vocabulary sizes must be equal.

    (A larger model vocabulary would train rows no token ever uses and sample ids that decode to
    nothing; a smaller one cannot embed the tokenizer's last ids.)"""
    if vocab_size != tokenizer_vocab:
        raise ManifestError(f"{model} has vocab_size {vocab_size} but the tokenizer {tokenizer} has {tokenizer_vocab} "
                            f"tokens: they were not made for each other (set model.vocab_size={tokenizer_vocab}, "
                            "or use the data/tokenizer the model was trained with)")


def check_compatible(manifest: dict, vocab_size: int | None = None, patch_size: int | None = None,
                     tokenizer_sha256: str | None = None, model: str = "the model") -> None:
    """The one compatibility rule between prepared shards and a model, for training and evaluation alike.

    Raises ManifestError unless: the vocabularies are equal (`check_vocab`), K divides the block
    length, and (where the model records the tokenizer it was trained on) the shards were made with
    that same tokenizer file."""
    tok = manifest["tokenizer"]
    if vocab_size is not None:
        check_vocab(tok["vocab_size"], vocab_size, f"{tok['name']!r} of these shards", model)
    block_len = manifest["block_len"]
    if patch_size is not None and (patch_size <= 0 or block_len % patch_size):
        raise ManifestError(f"block_len {block_len} of the data is not a multiple of {model}'s patch size K={patch_size}; "
                            f"re-run data_prep with --block-len a multiple of {patch_size}")
    if tokenizer_sha256 is not None and tokenizer_sha256 != tok["sha256"]:
        raise ManifestError(f"{model} was trained on shards of another tokenizer (sha256 {tokenizer_sha256[:12]}…) than "
                            f"these ({tok['sha256'][:12]}…)")


def write_manifest(output: Path, manifest: dict) -> None:
    from data_prep.shards import write_atomic

    write_atomic(output / "manifest.json", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
