"""manifest.json: the one description of a prepared data directory, read by the loader and training.

`read_manifest` checks the keys the rest of the pipeline relies on; `check_compatible` is what
training calls to refuse a model whose patch size K does not divide the block length or whose
vocabulary is smaller than the tokenizer's.
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
    return manifest


def check_compatible(manifest: dict, patch_size: int | None = None, vocab_size: int | None = None) -> None:
    """Raises ManifestError when the shards cannot feed a model with this patch size / vocabulary."""
    block_len = manifest["block_len"]
    if patch_size is not None and (patch_size <= 0 or block_len % patch_size):
        raise ManifestError(f"block_len {block_len} of the data is not a multiple of patch_size K={patch_size}; "
                            f"re-run data_prep with --block-len a multiple of {patch_size}")
    tok_vocab = manifest["tokenizer"]["vocab_size"]
    if vocab_size is not None and vocab_size < tok_vocab:
        raise ManifestError(f"model vocab_size {vocab_size} is smaller than the tokenizer's {tok_vocab} "
                            f"({manifest['tokenizer']['name']}); set model.vocab_size >= {tok_vocab}")


def write_manifest(output: Path, manifest: dict) -> None:
    from data_prep.shards import write_atomic

    write_atomic(output / "manifest.json", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
