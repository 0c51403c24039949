"""Fine-tuning data: prompt/response records -> shards of (token ids, loss mask) blocks + manifest.json.

    python -m data_prep --finetune --input data/toy_sft.jsonl --tokenizer runs/quickstart/data \
        --block-len 64 --patch-size 4 --val-fraction 0.05 --output data/toy_sft
    python -m data_prep --finetune --pack --block-len 256 ...   # several records per block

Records are read by `data_prep.records` (prompt/response pairs, or chats whose assistant turns are
the responses). By default every pair becomes ONE block of `block_len` tokens; the block is

    [PAD]*p  EOS  prompt-tokens | response-tokens  EOS  [PAD]*rest
    \\------ prompt, mask 0 -----/ \\----- mask 1 -----/  \\- mask 0 -/

With --pack, records are laid out the same way but end after their EOS, padded only up to the next
multiple of K, and follow each other in file order inside a block until the next one would not fit
(next-fit, so the order and the split are those of the unpacked set; PAD fills the rest). Each sample
then carries a third row, position ids that restart at 0 at every record (and at the filler): the
models pass them to transformers' Llama, which turns restarting positions into a block-diagonal
causal mask, so a record attends only to itself and scores as it would alone in a block
(docs/method.md §10).

The EOS in front is the document separator the pretraining shards put before every document (a
prompt is read as the start of a document, as at generation). `p` left-pads the prompt with the pad
token to a multiple of K = --patch-size (`left_pad`), so the response starts on a chunk boundary: a
CALM with patch size K then reads the prompt as whole chunks and predicts the response chunk by
chunk, and generation aligns a prompt with the same rule (`CALM.generate(prompt_alignment=
"left_pad")`, `python -m evaluation.generate --prompt-alignment left_pad`). The padding belongs to the
prompt and is never scored; the pad tokens after the final EOS are not scored either. The baseline
trains on the same shards (the left padding is context for it too, and it is aligned the same way at
generation). A record longer than the block is skipped and reported with file and line
(`too_long`), or cut at the block's end with --truncate (counted as `truncated`); a record whose
aligned prompt alone fills the block is always skipped.

The tokenizer must be an existing one, the pretrained model's: --tokenizer names its directory or a
prepared data directory holding it. Its files are copied unchanged, so the manifest's tokenizer hash
equals the pretraining data's and `data_prep.manifest.check_compatible` accepts the pair.

Each sample is one `KEY.npy` of shape (2, block_len): row 0 token ids, row 1 the loss mask (1 =
scored), and with --pack (3, block_len), row 2 the position ids; the manifest says so with
`"loss_mask": true` (and `"finetune": {"packed": true}`). Pretraining shards are untouched by this
module. Train/validation is split by record (all turns of one chat together), as documents are.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data_prep import shards, sources
from data_prep import tokenizer as toks
from data_prep.manifest import write_manifest
from data_prep.records import RecordOptions, new_bad_input, read_pairs
from data_prep.sources import DataError

SAMPLE_FORMAT = ("webdataset tar; member KEY.npy = array (2, block_len): row 0 token ids, row 1 loss mask "
                 "(1 = scored response token, 0 = prompt, alignment padding or right padding)")
PACKED_SAMPLE_FORMAT = ("webdataset tar; member KEY.npy = array (3, block_len): row 0 token ids, row 1 loss "
                        "mask (as unpacked), row 2 position ids, restarting at 0 where each record (or the "
                        "final filler) begins")


def left_pad(ids: list[int], k: int, pad: int) -> list[int]:
    """THE prompt alignment rule (docs/method.md §10): `pad` on the left up to a multiple of `k` tokens.

    `pretrain.models.generation.left_pad` is a copy (that package may not import data_prep, since it
    travels with exported models); tests/data_prep/test_finetune.py checks that the two agree."""
    return [pad] * (-len(ids) % k) + list(ids)


@dataclass(frozen=True)
class FinetuneOptions:
    """The fine-tuning flags of `python -m data_prep` (see the module docstring)."""

    records: RecordOptions = field(default_factory=RecordOptions)
    truncate: bool = False
    pack: bool = False


def build_segment(prompt: list[int], response: list[int], eos: int, pad: int, k: int, block_len: int,
                  truncate: bool) -> tuple[list[int], list[int], bool] | str:
    """(ids, mask, truncated) of one record, up to its final EOS (module docstring), or the reason it
    cannot fit in a block."""
    head = left_pad([eos, *prompt], k, pad)
    tail = [*response, eos]
    if len(head) >= block_len:
        return f"its aligned prompt is {len(head)} tokens, no room for a response in a block of {block_len}"
    cut = len(head) + len(tail) > block_len
    if cut and not truncate:
        return (f"{len(head) + len(tail)} tokens (aligned prompt {len(head)} + response and EOS {len(tail)}) exceed "
                f"the block of {block_len}; raise --block-len or pass --truncate to cut the response")
    tail = tail[: block_len - len(head)]
    return head + tail, [0] * len(head) + [1] * len(tail), cut


def one_block(segment: tuple[list[int], list[int]], block_len: int, pad: int) -> np.ndarray:
    """(2, block_len) ids and mask of one record in its own block, right-padded (module docstring)."""
    ids, mask = segment
    rest = block_len - len(ids)
    return np.array([ids + [pad] * rest, mask + [0] * rest], dtype=np.int64)


def pack_segments(segments: list[tuple[list[int], list[int]]], block_len: int, k: int, pad: int) -> list[np.ndarray]:
    """(3, block_len) blocks of ids, mask and restarting position ids holding the records in order
    (module docstring: --pack)."""
    blocks, ids, mask, pos = [], [], [], []

    def close() -> None:
        rest = block_len - len(ids)
        blocks.append(np.array([ids + [pad] * rest, mask + [0] * rest, pos + list(range(rest))], dtype=np.int64))

    for seg_ids, seg_mask in segments:
        width = len(seg_ids) + (-len(seg_ids) % k)
        if len(ids) + width > block_len:
            close()
            ids, mask, pos = [], [], []
        ids += seg_ids + [pad] * (width - len(seg_ids))
        mask += seg_mask + [0] * (width - len(seg_ids))
        pos += list(range(width))
    if ids:
        close()
    return blocks


def tokenizer_dir(spec: str) -> Path:
    """The tokenizer directory named by --tokenizer: itself, or DIR/tokenizer of a prepared data directory."""
    path = Path(spec).expanduser()
    if (path / "manifest.json").is_file() and (path / "tokenizer").is_dir():
        path = path / "tokenizer"
    if not path.is_dir():
        raise DataError(f"--tokenizer {spec}: fine-tuning data must use the pretrained model's tokenizer; give its "
                        "directory (e.g. runs/quickstart/data/tokenizer) or the prepared data directory holding it")
    return path


def _save_tokenizer(source: Path, output: Path) -> tuple[object, dict]:
    tok = toks.load_pretrained(str(source))
    target = output / "tokenizer"
    if target.exists():
        shutil.rmtree(target)
    # Copied byte for byte (not re-saved), so the sha256 is the pretraining data's.
    shutil.copytree(source, target)
    return tok, toks.describe(tok, target, str(source))


def _prepare_output(output: Path, overwrite: bool) -> None:
    for split in shards.SPLITS:
        if (output / split).is_dir() and any((output / split).iterdir()) or (output / "manifest.json").exists():
            if not overwrite:
                raise DataError(f"{output} already holds prepared data; use another --output or --overwrite")
            break
    for name in ("train", "validation", "tokenizer", "manifest.json"):
        target = output / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    for split in shards.SPLITS:
        (output / split).mkdir(parents=True, exist_ok=True)


def _blocks(cfg, files: list[Path], tok, tok_entry: dict, bad) -> tuple[dict, dict]:
    """The blocks of every split (one per record, or packed) and the per-split counts."""
    opts, eos, pad = cfg.finetune, tok_entry["eos_token_id"], tok_entry["pad_token_id"]
    out = {s: [] for s in shards.SPLITS}
    counts = {s: {"documents": 0, "document_tokens": 0, "scored_tokens": 0, "truncated": 0} for s in shards.SPLITS}
    index, last = -1, None  # record index: all turns of one chat share it (and so their split)
    for where, prompt, response in (pair for path in files for pair in read_pairs(path, opts.records, tok, bad)):
        index += where != last
        last = where
        if cfg.max_docs is not None and index >= cfg.max_docs:
            break
        ids = [tok(text, add_special_tokens=False)["input_ids"] for text in (prompt, response)]
        segment = build_segment(ids[0], ids[1], eos, pad, cfg.patch_size, cfg.block_len, opts.truncate)
        if isinstance(segment, str):
            bad.report("too_long", where, segment)
            continue
        split = shards.doc_split(cfg.seed, index, cfg.val_fraction)
        out[split].append(segment[:2])
        c = counts[split]
        c["documents"] += 1
        c["document_tokens"] += len(ids[0]) + len(ids[1]) + 2
        c["scored_tokens"] += sum(segment[1])
        c["truncated"] += int(segment[2])
        if segment[2]:
            print(f"[data_prep] truncated {where}: response cut at the block's end", file=sys.stderr)
    if opts.pack:
        return {s: pack_segments(segs, cfg.block_len, cfg.patch_size, pad) for s, segs in out.items()}, counts
    return {s: [one_block(seg, cfg.block_len, pad) for seg in segs] for s, segs in out.items()}, counts


def _write_split(cfg, split: str, blocks: list[np.ndarray], dtype: str) -> list[dict]:
    rows = 3 if cfg.finetune.pack else 2
    per_shard = max(1, int(cfg.shard_mb * 1e6) // (rows * cfg.block_len * np.dtype(dtype).itemsize))
    entries = []
    for chunk, start in enumerate(range(0, len(blocks), per_shard)):
        part = np.stack(blocks[start: start + per_shard]).astype(dtype)
        data = shards.tar_bytes(part, chunk)
        rel = f"{split}/{shards.shard_name(chunk)}"
        shards.write_atomic(cfg.output / rel, data)
        entries.append({"path": rel, "samples": len(part), "tokens": int(part[:, 0].size), "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest()})
    return entries


def run(cfg, argv: list[str]) -> dict:
    """The fine-tuning data_prep run (module docstring); `cfg` is a `pipeline.PrepConfig` with `finetune` set."""
    if cfg.tokenizer is None or cfg.train_tokenizer:
        raise DataError("--finetune needs --tokenizer DIR, the pretrained model's tokenizer (not --train-tokenizer)")
    bad = new_bad_input(cfg.fail_fast)
    files = []
    for s in sources.resolve_inputs(cfg.inputs, bad):
        if s["kind"] == "file" and s["format"] == "jsonl":
            files.append(s["path"])
        else:
            bad.report("unknown_format", s["spec"], "--finetune reads JSONL records (.jsonl, .jsonl.gz) only")
    if not files:
        raise DataError(f"--finetune reads JSONL files (.jsonl, .jsonl.gz); none among {cfg.inputs}")
    _prepare_output(cfg.output, cfg.overwrite)
    tok, tok_entry = _save_tokenizer(tokenizer_dir(cfg.tokenizer), cfg.output)
    blocks, counts = _blocks(cfg, files, tok, tok_entry, bad)
    if not blocks["train"]:
        raise DataError(f"no usable record in {cfg.inputs} for the train split (bad input: "
                        f"{ {k: v for k, v in bad.summary()['counts'].items() if v} })")
    dtype = "uint16" if tok_entry["vocab_size"] <= 1 << 16 else "uint32"
    splits = {}
    for split in shards.SPLITS:
        entries = _write_split(cfg, split, blocks[split], dtype)
        splits[split] = {"shards": entries, "samples": sum(e["samples"] for e in entries),
                         "tokens": sum(e["tokens"] for e in entries), "dropped_tokens": 0, "plain_cuts": 0,
                         **counts[split]}
    manifest = _manifest(cfg, argv, files, tok_entry, dtype, splits, bad)
    write_manifest(cfg.output, manifest)
    for split, s in splits.items():
        layout = f"packed in {s['samples']} blocks of {cfg.block_len}" if cfg.finetune.pack else \
            f"one block of {cfg.block_len} each"
        print(f"[data_prep] {split}: {s['documents']} records, {layout} ({s['scored_tokens']} "
              f"scored response tokens, {s['truncated']} truncated)", file=sys.stderr)
    print(f"[data_prep] bad input skipped: { {k: v for k, v in bad.counts.items() if v} or 'none'}; manifest: "
          f"{cfg.output / 'manifest.json'}", file=sys.stderr)
    return manifest


def _manifest(cfg, argv, files, tok_entry, dtype, splits, bad) -> dict:
    from data_prep.pipeline import manifest_head  # pipeline hands fine-tuning runs to this module

    return {
        **manifest_head(cfg, argv, tok_entry, dtype),
        "loss_mask": True,
        "sample_format": PACKED_SAMPLE_FORMAT if cfg.finetune.pack else SAMPLE_FORMAT,
        "document_separator": "eos_token_id before every prompt and after every response",
        "finetune": {"alignment": "left_pad", "patch_size": cfg.patch_size, "packed": cfg.finetune.pack,
                     "packing": "records in order, next-fit, position ids restart at each (attention stays inside a "
                                "record)" if cfg.finetune.pack else "one record per block",
                     "truncate": cfg.finetune.truncate, **asdict(cfg.finetune.records)},
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
        "split_rule": "validation iff blake2b_64(f'{seed}:{record_index}') < val_fraction * 2**64",
        "shard_mb": cfg.shard_mb,
        "sources": [{"input": str(f), "kind": "file", "path": str(f), "bytes": f.stat().st_size,
                     "sha256": sources.sha256_file(f)} for f in files],
        "bad_input": bad.summary(),
        "splits": splits,
    }
