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
import signal
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
    # Ctrl-C reaches the whole process group: the main process stops the pool, with one message.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def doc_split(seed: int, doc_index: int, val_fraction: float) -> str:
    """Train/validation by document, from a hash of (seed, index): independent of chunking and workers."""
    digest = hashlib.blake2b(f"{seed}:{doc_index}".encode(), digest_size=8).digest()
    return "validation" if int.from_bytes(digest, "little") < val_fraction * 2.0**64 else "train"


def shard_name(chunk: int) -> str:
    return f"shard-{chunk:06d}.tar"


def _load_tokenizer(spec: PackSpec):
    global _tokenizer
    if _tokenizer is None or _tokenizer[0] != spec.tokenizer_file:
        from tokenizers import Tokenizer

        _tokenizer = (spec.tokenizer_file, Tokenizer.from_file(spec.tokenizer_file))
    return _tokenizer[1]


NEUTRAL_WINDOW = 256
"""Characters each side of a cut that `_neutral` tokenizes both whole and cut."""


def _neutral(tok, text: str, cut: int) -> bool:
    """Cutting `text` at `cut` changes no token id around it (the ids of a window across the cut equal
    the ids of its two halves), so a text encoded in pieces gets the ids of the whole."""
    lo = max(0, cut - NEUTRAL_WINDOW)
    window = text[lo : cut + NEUTRAL_WINDOW]
    left, whole, right = tok.encode_batch_fast([window[: cut - lo], window, window[cut - lo :]],
                                               add_special_tokens=False)
    return whole.ids == left.ids + right.ids


def _encode(spec: PackSpec, texts: list[str], plain_cuts: list[int] | None = None) -> list[np.ndarray]:
    """Token ids of each text, encoded in batches of about `PIECE_CHARS` characters and a longer text
    in pieces (`tokenizer.pieces`, which notes plain cuts in `plain_cuts`), so the tokenizer's working
    memory is bounded on any document."""
    from data_prep.tokenizer import PIECE_CHARS, pieces

    tok = _load_tokenizer(spec)

    def encode(batch: list[str]) -> list[np.ndarray]:
        return [np.array(e.ids, dtype=np.int64) for e in tok.encode_batch_fast(batch, add_special_tokens=False)]

    out, batch, chars = [], [], 0
    for text in texts:
        if len(text) > PIECE_CHARS:
            out += encode(batch)
            batch, chars = [], 0
            parts = pieces(text, PIECE_CHARS, lambda t, cut: _neutral(tok, t, cut), plain_cuts)
            out.append(np.concatenate([encode([part])[0] for part in parts]))
            continue
        batch.append(text)
        chars += len(text)
        if chars >= PIECE_CHARS:
            out += encode(batch)
            batch, chars = [], 0
    return out + encode(batch)


def pack(token_lists: list, eos: int, block_len: int, dtype: str) -> tuple[np.ndarray, int, int]:
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
        plain_cuts: list[int] = []
        blocks, doc_tokens, dropped = pack(_encode(spec, texts, plain_cuts), spec.eos_token_id, spec.block_len,
                                           spec.dtype) if texts else (np.empty((0, spec.block_len), spec.dtype), 0, 0)
        entry = {"documents": len(texts), "document_tokens": doc_tokens, "dropped_tokens": dropped,
                 "plain_cuts": len(plain_cuts), "shard": None}
        if len(blocks):
            data = tar_bytes(blocks, chunk)
            rel = f"{split}/{shard_name(chunk)}"
            write_atomic(Path(spec.output) / rel, data)
            entry["shard"] = {"path": rel, "samples": len(blocks), "tokens": int(blocks.size),
                              "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        record["splits"][split] = entry
    return record
