"""One work unit: a chunk of documents -> token blocks -> one train and one validation tar shard.

Each chunk is packed on its own (documents joined by EOS, cut into `block_len` blocks; the
remainder, under one block per split, is counted as `dropped_tokens`), so chunks run in parallel
and a rerun can skip finished ones. Tars are built in memory with fixed metadata (mtime, owner,
mode) so equal input gives byte-identical files, and land with an atomic `os.replace`.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLITS = ("train", "validation")
_tokenizer = None  # per worker process, loaded once


@dataclass(frozen=True)
class PackSpec:
    """Everything a worker needs besides the documents."""

    output: str
    tokenizer_file: str
    eos_token_id: int
    block_len: int
    dtype: str
    seed: int
    val_fraction: float


def init_worker() -> None:
    # One process per core already; the tokenizer's own thread pool would oversubscribe them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def doc_split(seed: int, doc_index: int, val_fraction: float) -> str:
    """Train/validation by document, from a hash of (seed, index): independent of chunking and workers."""
    digest = hashlib.blake2b(f"{seed}:{doc_index}".encode(), digest_size=8).digest()
    return "validation" if int.from_bytes(digest, "little") < val_fraction * 2.0**64 else "train"


def shard_name(chunk: int) -> str:
    return f"shard-{chunk:06d}.tar"


def _encode(spec: PackSpec, texts: list[str]) -> list[list[int]]:
    global _tokenizer
    if _tokenizer is None or _tokenizer[0] != spec.tokenizer_file:
        from tokenizers import Tokenizer

        _tokenizer = (spec.tokenizer_file, Tokenizer.from_file(spec.tokenizer_file))
    return [e.ids for e in _tokenizer[1].encode_batch_fast(texts, add_special_tokens=False)]


def pack(token_lists: list[list[int]], eos: int, block_len: int, dtype: str) -> tuple[np.ndarray, int, int]:
    """Joins documents with EOS after each; returns (blocks, document tokens, dropped tokens)."""
    lengths = [len(ids) + 1 for ids in token_lists]
    total = sum(lengths)
    flat = np.empty(total, dtype=np.int64)
    pos = 0
    for ids, n in zip(token_lists, lengths):
        flat[pos : pos + n - 1] = ids
        flat[pos + n - 1] = eos
        pos += n
    n_blocks = total // block_len
    blocks = flat[: n_blocks * block_len].reshape(n_blocks, block_len).astype(dtype)
    return blocks, total, total - n_blocks * block_len


def tar_bytes(blocks: np.ndarray, chunk: int) -> bytes:
    """A webdataset tar: one `KEY.npy` member per block, with fixed metadata for reproducibility."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for j, block in enumerate(blocks):
            payload = io.BytesIO()
            np.save(payload, block, allow_pickle=False)
            info = tarfile.TarInfo(f"{chunk:06d}-{j:07d}.npy")
            info.size = payload.tell()
            info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0o644, 0, 0, "", ""
            payload.seek(0)
            tar.addfile(info, payload)
    return out.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    """Readers see either no file or the whole file, even if this process is killed mid-write."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def process_chunk(spec: PackSpec, chunk: int, docs: list[tuple[int, str]]) -> dict:
    """Tokenizes, packs and writes one chunk; returns its record (counts and shard hashes)."""
    by_split = {s: [] for s in SPLITS}
    for doc_index, text in docs:
        by_split[doc_split(spec.seed, doc_index, spec.val_fraction)].append(text)
    record = {"chunk": chunk, "splits": {}}
    for split, texts in by_split.items():
        blocks, doc_tokens, dropped = pack(_encode(spec, texts), spec.eos_token_id, spec.block_len, spec.dtype) \
            if texts else (np.empty((0, spec.block_len), spec.dtype), 0, 0)
        entry = {"documents": len(texts), "document_tokens": doc_tokens, "dropped_tokens": dropped, "shard": None}
        if len(blocks):
            data = tar_bytes(blocks, chunk)
            rel = f"{split}/{shard_name(chunk)}"
            write_atomic(Path(spec.output) / rel, data)
            entry["shard"] = {"path": rel, "samples": len(blocks), "tokens": int(blocks.size),
                              "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        record["splits"][split] = entry
    return record
