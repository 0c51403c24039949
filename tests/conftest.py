"""Shared fixtures. `tiny_data_dir`: a real prepared data directory for any team's tests.

It runs `python -m data_prep` in-process on 16 articles of the built-in Wikipedia excerpt with a
freshly trained byte-level BPE (vocab 512), block_len 64 and K=4, split into several shards, once
per test session (a few seconds).
"""

import pytest

TINY_ARGS = ["--input", "builtin:wiki", "--max-docs", "16", "--train-tokenizer", "--vocab-size", "512",
             "--block-len", "64", "--patch-size", "4", "--val-fraction", "0.2", "--shard-mb", "0.03",
             "--workers", "1", "--no-progress"]


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """Path of a data directory: manifest.json, tokenizer/, train/ and validation/ shards (read-only use)."""
    from data_prep.__main__ import main

    out = tmp_path_factory.mktemp("tiny_data")
    main([*TINY_ARGS, "--output", str(out)])
    return out
