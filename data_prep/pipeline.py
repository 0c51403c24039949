"""The data_prep run: inputs -> tokenizer -> chunks of documents tokenized in parallel -> shards + manifest.

The main process reads documents in input order and cuts them into chunks of about `shard_mb` MB of
text; a pool of worker processes turns each chunk into its shards (see shards.py). At most two
chunks per worker are in flight, so memory stays bounded on any corpus size. Resuming: the
settings of a run are kept in OUTPUT/.parts/settings.json and each finished chunk leaves a small
record there; a rerun with the same settings re-reads the text (cheap) but skips every chunk whose
record and shards (checked by sha256) are present.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shlex
import shutil
import signal
import sys
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from data_prep import shards, sources
from data_prep import tokenizer as toks
from data_prep.manifest import FORMAT, write_manifest
from data_prep.sources import BadInput, DataError, SourceOptions


@dataclass
class PrepConfig:
    inputs: list[str]
    output: Path
    tokenizer: str | None = None
    train_tokenizer: bool = False
    vocab_size: int = 32000
    block_len: int = 2048
    patch_size: int = 4
    val_fraction: float = 0.005
    seed: int = 0
    shard_mb: float = 32.0
    max_docs: int | None = None
    workers: int = 0  # 0: all cores
    fail_fast: bool = False
    overwrite: bool = False
    progress: bool = True
    source: SourceOptions = None
    finetune: object = None  # data_prep.finetune.FinetuneOptions: prompt/response records instead of documents

    def validate(self) -> None:
        if self.tokenizer is None and not self.train_tokenizer:
            raise DataError("give --tokenizer NAME_OR_DIR or --train-tokenizer --vocab-size N")
        if self.tokenizer is not None and self.train_tokenizer:
            raise DataError("--tokenizer and --train-tokenizer exclude each other")
        if self.patch_size <= 0 or self.block_len <= 0 or self.block_len % self.patch_size:
            raise DataError(f"--block-len {self.block_len} must be a positive multiple of "
                            f"--patch-size {self.patch_size} (K)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"--val-fraction {self.val_fraction} must be in [0, 1)")
        if self.train_tokenizer and self.vocab_size < toks.MIN_TRAINED_VOCAB:
            raise DataError(f"--vocab-size {self.vocab_size} cannot hold the 256 byte symbols plus EOS and PAD "
                            f"(minimum {toks.MIN_TRAINED_VOCAB}, which is plain bytes without merges)")


def documents(resolved: list[dict], cfg: PrepConfig, bad: BadInput, per_source: list[int]) -> Iterator[tuple[int, str]]:
    """(global document index, text) over all inputs in order, up to --max-docs."""
    index = 0
    for i, source in enumerate(resolved):
        for text in sources.iter_source(source, cfg.source, bad):
            if cfg.max_docs is not None and index >= cfg.max_docs:
                return
            per_source[i] += 1
            yield index, text
            index += 1


def chunked(docs: Iterator[tuple[int, str]], max_chars: int) -> Iterator[list[tuple[int, str]]]:
    chunk, chars = [], 0
    for doc in docs:
        chunk.append(doc)
        chars += len(doc[1])
        if chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _settings(cfg: PrepConfig, resolved: list[dict]) -> dict:
    """What determines the shards' bytes: a rerun must match it to reuse finished chunks."""
    src = []
    for s in resolved:
        entry = {"input": s["spec"], "kind": s["kind"]}
        if s["kind"] in ("file", "builtin"):
            st = s["path"].stat()
            entry.update(bytes=st.st_size, mtime_ns=st.st_mtime_ns)
        src.append(entry)
    keys = ("tokenizer", "train_tokenizer", "vocab_size", "block_len", "val_fraction", "seed", "shard_mb", "max_docs")
    return {"sources": src, "source_options": asdict(cfg.source), **{k: getattr(cfg, k) for k in keys}}


def _prepare_output(cfg: PrepConfig, settings: dict) -> dict | None:
    """Creates the output layout; returns the previous run's settings record when it can be resumed."""
    out, parts = cfg.output, cfg.output / ".parts"
    if cfg.overwrite:
        for name in ("train", "validation", "tokenizer", ".parts", "manifest.json"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    previous = None
    if (parts / "settings.json").exists():
        previous = json.loads((parts / "settings.json").read_text())
        if previous["settings"] != settings:
            raise DataError(f"{out} holds shards made with other settings or inputs; use another --output "
                            f"or --overwrite (previous: {json.dumps(previous['settings'])})")
    elif (out / "manifest.json").exists() or any(out.glob("*/shard-*.tar")):
        raise DataError(f"{out} holds data from an unknown run; use another --output or --overwrite")
    for directory in (out, *(out / split for split in shards.SPLITS), parts):
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(".*.tmp*"):  # left by a killed run; never a finished shard or record
            stale.unlink()
    return previous


def _tokenizer(cfg: PrepConfig, resolved: list[dict], previous: dict | None) -> dict:
    """Reuses the tokenizer of an interrupted run, else loads or trains one and saves it; returns its entry."""
    from transformers import AutoTokenizer

    directory = cfg.output / "tokenizer"
    if previous and directory.is_dir() and toks.tokenizer_sha256(directory) == previous["tokenizer_sha256"]:
        return toks.describe(AutoTokenizer.from_pretrained(str(directory)), directory, previous["tokenizer_name"])
    if cfg.tokenizer is not None:
        tok, name = toks.load_pretrained(cfg.tokenizer), cfg.tokenizer
    else:
        quiet = BadInput(fail_fast=cfg.fail_fast, quiet=True)
        # in pieces, like the encoder: the trainer's memory also grows ~200x the text it is given
        texts = (piece for i, text in documents(resolved, cfg, quiet, [0] * len(resolved))
                 if shards.doc_split(cfg.seed, i, cfg.val_fraction) == "train" for piece in toks.pieces(text))
        print(f"[data_prep] training a byte-level BPE tokenizer (vocab {cfg.vocab_size}) on the train split",
              file=sys.stderr)
        tok, name = toks.train_bpe(texts, cfg.vocab_size), f"byte-level-bpe-{cfg.vocab_size}"
    if directory.exists():
        shutil.rmtree(directory)
    return toks.save(tok, directory, name)


def _finished(cfg: PrepConfig, chunk: int) -> dict | None:
    """The record of a chunk whose shards are all present and intact, else None."""
    path = cfg.output / ".parts" / f"chunk-{chunk:06d}.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    for entry in record["splits"].values():
        shard = entry["shard"]
        if shard and (not (cfg.output / shard["path"]).exists()
                      or sources.sha256_file(cfg.output / shard["path"]) != shard["sha256"]):
            return None
    return record


def _pool(workers: int):
    if workers <= 1:
        return None
    # Workers must ignore Ctrl-C from their first instruction (the main process stops the pool): an
    # ignored signal survives exec, whereas `init_worker` runs only after the worker's imports, and a
    # Ctrl-C during a slow start printed a KeyboardInterrupt traceback from the worker.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return mp.get_context("spawn").Pool(workers, initializer=shards.init_worker)
    finally:
        signal.signal(signal.SIGINT, previous)


def run(cfg: PrepConfig, argv: list[str]) -> dict:
    """The whole run (module docstring): shards, manifest.json and a summary on stderr; returns the manifest."""
    cfg.validate()
    if cfg.finetune is not None:
        from data_prep.finetune import run as run_finetune

        return run_finetune(cfg, argv)
    bad = BadInput(fail_fast=cfg.fail_fast)
    resolved = sources.resolve_inputs(cfg.inputs, bad)
    if not resolved:
        raise DataError(f"no usable input among {cfg.inputs}")
    tok_entry = _start_or_resume(cfg, resolved)
    spec = _pack_spec(cfg, tok_entry)
    per_source = [0] * len(resolved)
    records, skipped = _write_chunks(cfg, spec, documents(resolved, cfg, bad, per_source))
    if not records:
        raise DataError(f"no documents in {cfg.inputs} (bad input: {bad.summary()['counts']})")
    if skipped:
        print(f"[data_prep] resumed: {skipped} finished chunk(s) reused", file=sys.stderr)

    manifest = _manifest(cfg, argv, resolved, per_source, tok_entry, spec.dtype,
                         [records[c] for c in sorted(records)], bad)
    write_manifest(cfg.output, manifest)
    _print_summary(cfg, manifest)
    return manifest


def _start_or_resume(cfg: PrepConfig, resolved: list[dict]) -> dict:
    """Lays out the output and settles the tokenizer (an interrupted run's if it can be resumed), then
    records the settings for the next resume; returns the tokenizer's entry."""
    settings = _settings(cfg, resolved)
    previous = _prepare_output(cfg, settings)
    tok_entry = _tokenizer(cfg, resolved, previous)
    if previous and previous["tokenizer_sha256"] != tok_entry["sha256"]:
        print("[data_prep] the tokenizer changed since the interrupted run; rebuilding all shards", file=sys.stderr)
        for record in (cfg.output / ".parts").glob("chunk-*.json"):
            record.unlink()
    shards.write_atomic(cfg.output / ".parts" / "settings.json", json.dumps(
        {"settings": settings, "tokenizer_sha256": tok_entry["sha256"], "tokenizer_name": tok_entry["name"]},
        indent=2).encode())
    return tok_entry


def _pack_spec(cfg: PrepConfig, tok_entry: dict) -> shards.PackSpec:
    """What the workers need to pack documents into shards; token ids are stored in 16 bits when they fit."""
    dtype = "uint16" if tok_entry["vocab_size"] <= 1 << 16 else "uint32"
    spec = shards.PackSpec(output=str(cfg.output), tokenizer_file=str(cfg.output / "tokenizer" / "tokenizer.json"),
                           eos_token_id=tok_entry["eos_token_id"], block_len=cfg.block_len, dtype=dtype,
                           seed=cfg.seed, val_fraction=cfg.val_fraction)
    if not Path(spec.tokenizer_file).exists():
        raise DataError(f"{spec.tokenizer_file} missing: the tokenizer could not be saved in fast (tokenizer.json) form")
    return spec


def _write_chunks(cfg: PrepConfig, spec: shards.PackSpec,
                  docs_in_order: Iterator[tuple[int, str]]) -> tuple[dict[int, dict], int]:
    """Turns each chunk of documents into its shards (in the worker pool, or here with one worker),
    reusing the chunks an interrupted run finished; returns ({chunk: record}, chunks reused)."""
    workers = cfg.workers or len(os.sched_getaffinity(0))
    records, skipped, tokens_done = {}, 0, 0
    bar = tqdm(unit="doc", desc="data_prep", disable=not cfg.progress, file=sys.stderr)
    pool = _pool(workers)
    pending = deque()

    def collect(record: dict) -> None:
        nonlocal tokens_done
        shards.write_atomic(cfg.output / ".parts" / f"chunk-{record['chunk']:06d}.json",
                            json.dumps(record).encode())
        records[record["chunk"]] = record
        bar.update(sum(e["documents"] for e in record["splits"].values()))
        tokens_done += sum(e["document_tokens"] for e in record["splits"].values())
        bar.set_postfix(tokens=tokens_done)

    try:
        for chunk, docs in enumerate(chunked(docs_in_order, int(cfg.shard_mb * 1e6))):
            done = _finished(cfg, chunk)
            if done is not None:
                records[chunk] = done
                skipped += 1
                bar.update(len(docs))
            elif pool is None:
                collect(shards.process_chunk(spec, chunk, docs))
            else:
                # at most two chunks per worker in flight: memory stays bounded on any corpus size
                pending.append(pool.apply_async(shards.process_chunk, (spec, chunk, docs)))
                while len(pending) >= 2 * workers:
                    collect(pending.popleft().get())
        while pending:
            collect(pending.popleft().get())
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    return records, skipped


def manifest_head(cfg, argv, tok_entry, dtype) -> dict:
    """The entries every manifest begins with (pretraining and fine-tuning data alike)."""
    return {"format": FORMAT, "command": shlex.join(["python", "-m", "data_prep", *argv]), "tokenizer": tok_entry,
            "block_len": cfg.block_len, "patch_size": cfg.patch_size, "dtype": dtype}


def _manifest(cfg, argv, resolved, per_source, tok_entry, dtype, records, bad) -> dict:
    splits = {}
    for split in shards.SPLITS:
        entries = [r["splits"][split] for r in records]
        shard_list = [e["shard"] for e in entries if e["shard"]]
        splits[split] = {
            "shards": shard_list,
            "samples": sum(s["samples"] for s in shard_list),
            "tokens": sum(s["tokens"] for s in shard_list),
            "documents": sum(e["documents"] for e in entries),
            "document_tokens": sum(e["document_tokens"] for e in entries),
            "dropped_tokens": sum(e["dropped_tokens"] for e in entries),
            # long documents cut for the tokenizer where no word gap was near (`tokenizer.pieces`)
            "plain_cuts": sum(e.get("plain_cuts", 0) for e in entries),
        }
    return {
        **manifest_head(cfg, argv, tok_entry, dtype),
        "sample_format": "webdataset tar; member KEY.npy = one block of block_len token ids (numpy .npy)",
        "document_separator": "eos_token_id after every document",
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
        "split_rule": "validation iff blake2b_64(f'{seed}:{document_index}') < val_fraction * 2**64",
        "shard_mb": cfg.shard_mb,
        "sources": [sources.describe(s, n, cfg.source) for s, n in zip(resolved, per_source)],
        "bad_input": bad.summary(),
        "splits": splits,
    }


def _print_summary(cfg: PrepConfig, manifest: dict) -> None:
    for split, s in manifest["splits"].items():
        print(f"[data_prep] {split}: {s['documents']} documents, {s['samples']} blocks of {cfg.block_len} "
              f"({s['tokens']} tokens, {s['dropped_tokens']} tail tokens dropped) in {len(s['shards'])} shard(s)",
              file=sys.stderr)
    if cfg.val_fraction > 0 and manifest["splits"]["validation"]["samples"] == 0:
        print(f"[data_prep] warning: the validation split is empty (too few documents for --val-fraction "
              f"{cfg.val_fraction}); raise it or add documents", file=sys.stderr)
    cuts = sum(s.get("plain_cuts", 0) for s in manifest["splits"].values())
    if cuts:
        print(f"[data_prep] note: {cuts} cut(s) inside very long documents found no word gap within "
              f"{toks.PIECE_CHARS // 2} characters (e.g. base64 or a long run of one character); the token ids "
              "next to them may differ from tokenizing those documents whole", file=sys.stderr)
    counts = {k: v for k, v in manifest["bad_input"]["counts"].items() if v}
    print(f"[data_prep] bad input skipped: {counts or 'none'}; manifest: {cfg.output / 'manifest.json'}",
          file=sys.stderr)
