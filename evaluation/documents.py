"""Evaluation data: documents -> token blocks -> padded batches, sharded over ranks.

Two sources:
- document files (`read_documents`): `.jsonl` (one JSON object per line, text under `text_key`, e.g.
  the WikiText-103 test documents) or any other file read as one plain-text document. Each document
  is tokenised on its own as `[eos] + tokens(text)` — the EOS stands in for the separator that
  precedes every document in the packed training shards, so the first word is predicted from the
  context it had in training — and cut into consecutive blocks of at most `context` tokens, the
  last one trimmed to a multiple of `multiple` (K for CALM). Blocks never cross documents
  (`--protocol documents`, the default); `--protocol stream` is the authors' protocol instead
  (`stream_blocks`: one stream of all documents, fixed blocks that cross them, remainder dropped).
- the validation split of a data_prep directory (`shard_blocks`): its fixed-length packed blocks
  through `pretrain.data.ShardLoader` (one pass, no shuffle), each cut into `context`-token pieces.

Blocks are dealt round-robin to ranks (`rank::world_size`) and batched longest-first with right
padding; every estimator takes the true lengths, and causal attention makes padding invisible.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from evaluation.results import read_jsonl


def read_documents(path: str | Path, text_key: str = "text") -> list[str]:
    """Documents of one file; a malformed line raises an error naming file, line and key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation data {path} does not exist")
    if path.suffix != ".jsonl":
        return [path.read_text(encoding="utf-8")]
    docs = []
    for lineno, record in read_jsonl(path):
        if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
            raise ValueError(f"{path}:{lineno}: expected an object with a string field {text_key!r}")
        docs.append(record[text_key])
    if not docs:
        raise ValueError(f"{path}: no documents")
    return docs


def tokenize_documents(tokenizer, texts: list[str]) -> list[list[int]]:
    """`[eos] + ids` per document (see the module docstring for why the EOS)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer defines no eos_token; it is needed as the document separator")
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [[eos] + ids for ids in encoded]


def split_blocks(token_lists: list[list[int]], context: int, multiple: int = 1) -> list[torch.Tensor]:
    """Consecutive blocks of at most `context` tokens per document, lengths multiples of `multiple`."""
    if context <= 0 or context % multiple:
        raise ValueError(f"context {context} must be a positive multiple of {multiple}")
    blocks = []
    for ids in token_lists:
        for start in range(0, len(ids), context):
            piece = ids[start : start + context]
            piece = piece[: len(piece) - len(piece) % multiple]
            if piece:
                blocks.append(torch.tensor(piece, dtype=torch.long))
    return blocks


def stream_blocks(token_lists: list[list[int]], context: int, multiple: int = 1) -> list[torch.Tensor]:
    """The authors' protocol: every document (with its EOS separator in front) concatenated into one
    stream, cut into blocks of exactly `context` tokens that cross document boundaries, the remainder
    dropped. All blocks have one length, so pooling positions equals averaging per-block means."""
    if context <= 0 or context % multiple:
        raise ValueError(f"context {context} must be a positive multiple of {multiple}")
    stream = torch.tensor([t for ids in token_lists for t in ids], dtype=torch.long)
    whole = stream.numel() // context
    if whole == 0:
        raise ValueError(f"the documents hold {stream.numel()} tokens, fewer than one block of {context}")
    return list(stream[: whole * context].view(whole, context).clone())


PROTOCOLS = {"documents": split_blocks, "stream": stream_blocks}
"""How document files become blocks: each document on its own (ours, the default) or one stream."""


def shard_blocks(data_dir: str | Path, split: str, context: int, multiple: int = 1) -> list[torch.Tensor]:
    """All blocks of a data_prep split, each cut into `context`-token pieces (one pass, file order)."""
    from pretrain.data import ShardLoader

    loader = ShardLoader(str(data_dir), split, batch_size=1, shuffle=False, epochs=1, drop_last=False)
    if loader.masked:
        raise ValueError(f"{data_dir} holds fine-tuning data (prompt/response blocks with loss masks), not documents "
                         "to score; use python -m evaluation.answer_match --data on it")
    if loader.block_len % context and context < loader.block_len:
        raise ValueError(f"context {context} must divide the shards' block_len {loader.block_len}")
    blocks = []
    for batch in loader:
        row = batch[0]
        for start in range(0, row.numel(), context):
            piece = row[start : start + context]
            blocks.append(piece[: piece.numel() - piece.numel() % multiple].clone())
    return [b for b in blocks if b.numel()]


def batches(
    blocks: list[torch.Tensor], batch_size: int, rank: int = 0, world_size: int = 1, pad_id: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's blocks as (input_ids (B, L) right-padded with `pad_id`, lengths (B,)), longest first."""
    mine = sorted(blocks[rank::world_size], key=lambda b: -b.numel())
    for start in range(0, len(mine), batch_size):
        group = mine[start : start + batch_size]
        lengths = torch.tensor([b.numel() for b in group])
        ids = torch.full((len(group), int(lengths.max())), pad_id, dtype=torch.long)
        for i, b in enumerate(group):
            ids[i, : b.numel()] = b
        yield ids, lengths
