"""Readers that turn inputs (files, directories, HF datasets, the built-in corpus) into documents.

A Hugging Face dataset is a hub name, a `save_to_disk` directory, or a local copy of a hub
repository (a directory whose README.md dataset card lists `configs`, as `git clone` of the hub
repository gives); hub names and local copies go through the same `datasets.load_dataset` call with
--hf-config, --hf-split and --streaming.

Every input is read in a fixed order (directories sorted) so the document stream, and therefore
the shards, are reproducible. Anything that cannot become a document is reported through
`BadInput`: a message naming the file and line, a count per kind for the manifest, and with
`fail_fast` an immediate `DataError` instead of a skip. Nothing is dropped silently.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import yaml

from data_prep.builtin import BUILTIN_CORPORA

BAD_KINDS = (
    "malformed_json",
    "non_utf8",
    "empty_document",
    "missing_text_field",
    "unknown_format",
    "missing_path",
    "corrupt_file",
)
# Suffix (after an optional .gz) -> reader name.
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".txt": "txt", ".parquet": "parquet"}
EXAMPLES_KEPT = 20  # per kind, in the manifest
PRINTED = 10  # per kind, on stderr; the rest only counted


class DataError(RuntimeError):
    """Input that cannot be used; the message names the file (and line) and the problem."""


@dataclass
class BadInput:
    """Counts and reports every input that did not become a document."""

    fail_fast: bool = False
    quiet: bool = False  # a second pass over the same inputs (tokenizer training) reports nothing
    counts: dict = field(default_factory=lambda: {k: 0 for k in BAD_KINDS})
    examples: dict = field(default_factory=lambda: {k: [] for k in BAD_KINDS})

    def report(self, kind: str, where: str, problem: str) -> None:
        message = f"{where}: {problem}"
        if self.fail_fast:
            raise DataError(f"{message} (--fail-fast is set)")
        self.counts[kind] += 1
        if len(self.examples[kind]) < EXAMPLES_KEPT:
            self.examples[kind].append(message)
        if self.quiet:
            return
        if self.counts[kind] <= PRINTED:
            print(f"[data_prep] skipped ({kind}) {message}", file=sys.stderr)
        elif self.counts[kind] == PRINTED + 1:
            print(f"[data_prep] further '{kind}' skips are only counted (see manifest)", file=sys.stderr)

    def summary(self) -> dict:
        return {"counts": dict(self.counts), "total": sum(self.counts.values()), "examples": self.examples}


@dataclass
class SourceOptions:
    text_field: str = "text"
    txt_mode: str = "file"  # "file": one document per .txt file; "paragraph": split on blank lines
    hf_split: str = "train"
    hf_config: str | None = None
    streaming: bool = False


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_format(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return FORMATS.get(suffixes[-1]) if suffixes else None


def looks_like_path(spec: str) -> bool:
    """Inputs that are clearly meant as local paths (so a missing one is a missing path, not a hub name)."""
    return spec.startswith(("/", "./", "../", "~")) or file_format(Path(spec)) is not None


def is_hf_disk_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
                              or (path / "state.json").exists())


def is_hf_repo(path: Path) -> bool:
    """A local copy of a hub dataset repository: its dataset card's YAML header declares `configs`."""
    card = path / "README.md"
    if not (path.is_dir() and card.is_file()):
        return False
    parts = card.read_text(errors="replace").split("---", 2)
    if len(parts) < 3 or parts[0].strip():
        return False
    try:
        header = yaml.safe_load(parts[1])
    except yaml.YAMLError:
        return False
    return isinstance(header, dict) and "configs" in header


def resolve_inputs(specs: list[str], bad: BadInput) -> list[dict]:
    """Expands directories into files and classifies each input; records missing paths and unknown formats."""
    resolved = []
    for spec in specs:
        if spec in BUILTIN_CORPORA:
            resolved.append({"kind": "builtin", "spec": spec, "path": BUILTIN_CORPORA[spec].path()})
            continue
        if spec.startswith("builtin:"):
            raise DataError(f"unknown built-in corpus {spec!r}; available: {', '.join(BUILTIN_CORPORA)}")
        path = Path(spec).expanduser()
        if path.is_dir() and is_hf_disk_dataset(path):
            resolved.append({"kind": "hf_disk", "spec": spec, "path": path})
        elif is_hf_repo(path):
            resolved.append({"kind": "hf_repo", "spec": spec, "path": path})
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not files:
                bad.report("missing_path", str(path), "directory holds no files")
            for p in files:
                _add_file(p, resolved, bad)
        elif path.is_file():
            _add_file(path, resolved, bad)
        elif looks_like_path(spec):
            bad.report("missing_path", spec, "no such file or directory")
        else:
            resolved.append({"kind": "hf_hub", "spec": spec})
    return resolved


def _add_file(path: Path, resolved: list, bad: BadInput) -> None:
    fmt = file_format(path)
    if fmt is None:
        bad.report("unknown_format", str(path),
                   f"unknown format (known: {', '.join(sorted(FORMATS))}, optionally .gz)")
    else:
        resolved.append({"kind": "file", "format": fmt, "spec": str(path), "path": path})


def describe(source: dict, documents: int, opts: SourceOptions) -> dict:
    """The manifest entry of one source: path, size and checksum for files; split and config for hub sets."""
    entry = {"input": source["spec"], "kind": source["kind"], "documents": documents}
    if source["kind"] in ("file", "builtin"):
        entry.update(path=str(source["path"]), bytes=source["path"].stat().st_size,
                     sha256=sha256_file(source["path"]))
    if source["kind"] in ("hf_hub", "hf_repo"):
        entry.update(hf_split=opts.hf_split, hf_config=opts.hf_config, streaming=opts.streaming)
    if source["kind"] in ("hf_disk", "hf_repo"):
        files = sorted(p for p in source["path"].rglob("*") if p.is_file() and ".git" not in p.parts)
        entry.update(path=str(source["path"]), bytes=sum(p.stat().st_size for p in files),
                     files={str(p.relative_to(source["path"])): sha256_file(p) for p in files})
    return entry


def iter_source(source: dict, opts: SourceOptions, bad: BadInput) -> Iterator[str]:
    """Yields the non-empty text documents of one resolved input."""
    kind = source["kind"]
    if kind == "builtin":
        texts = ((f"{source['path']}:{title}", text) for title, text in BUILTIN_CORPORA[source["spec"]].documents())
    elif kind == "file":
        texts = _until_unreadable(READERS[source["format"]](source["path"], opts, bad), source["path"], bad)
    else:
        texts = _read_hf(source, opts, bad)
    for where, text in texts:
        if not text.strip():
            bad.report("empty_document", where, "empty document")
        else:
            yield text


def _until_unreadable(texts, path: Path, bad: BadInput):
    """A reader's documents until its file turns out truncated or corrupt (a cut .gz, a disk error):
    that is reported as a bad file instead of ending the run; the documents read before it are kept."""
    last = None
    try:
        for where, text in texts:
            last = where
            yield where, text
    except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        kept = f"the documents up to {last} are kept" if last else "no document could be read from it"
        bad.report("corrupt_file", str(path), f"truncated or corrupt ({type(e).__name__}: {e}); {kept}, the rest "
                                              "of the file is skipped")


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def _decode(raw: bytes, where: str, bad: BadInput) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad.report("non_utf8", where, f"invalid UTF-8 byte {raw[e.start]:#04x} at byte {e.start} of the line")
        return None


def _text_of(record, where: str, opts: SourceOptions, bad: BadInput) -> str | None:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict) or opts.text_field not in record:
        keys = sorted(record)[:8] if isinstance(record, dict) else type(record).__name__
        bad.report("missing_text_field", where, f"no text field {opts.text_field!r} (has: {keys})")
        return None
    value = record[opts.text_field]
    if value is None:
        return ""
    if not isinstance(value, str):
        bad.report("missing_text_field", where, f"field {opts.text_field!r} is {type(value).__name__}, not a string")
        return None
    return value


def jsonl_records(path: Path, bad: BadInput):
    """("file:line", parsed value) for every line of a JSONL file (plain or .gz) that decodes and parses;
    undecodable and malformed lines are reported to `bad` and skipped, blank lines skipped silently."""
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue  # blank separator lines carry no document
            line = _decode(raw, where, bad)
            if line is None:
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                bad.report("malformed_json", where, f"malformed JSON ({e.msg} at column {e.colno})")


def _read_jsonl(path: Path, opts: SourceOptions, bad: BadInput):
    for where, record in jsonl_records(path, bad):
        text = _text_of(record, where, opts, bad)
        if text is not None:
            yield where, text


def _read_json(path: Path, opts: SourceOptions, bad: BadInput):
    """A JSON array of records (or strings); a .json file holding JSON lines is read as such."""
    with _open_binary(path) as f:
        raw = f.read()
    text = _decode(raw, str(path), bad)
    if text is None:
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            yield from _read_jsonl(path, opts, bad)
        else:
            bad.report("malformed_json", f"{path}:{e.lineno}", f"malformed JSON ({e.msg} at column {e.colno})")
        return
    if isinstance(data, dict):
        data = [data]
    for i, record in enumerate(data):
        where = f"{path}[{i}]"
        value = _text_of(record, where, opts, bad)
        if value is not None:
            yield where, value


def _read_txt(path: Path, opts: SourceOptions, bad: BadInput):
    with _open_binary(path) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        bad.report("non_utf8", f"{path}:{line}", f"invalid UTF-8 byte {raw[e.start]:#04x}; file skipped")
        return
    if opts.txt_mode == "file":
        yield str(path), text
        return
    para, first = [], 0
    for lineno, line in enumerate([*text.split("\n"), ""], start=1):
        if line.strip():
            first = first or lineno
            para.append(line)
        elif para:
            yield f"{path}:{first}", "\n".join(para)
            para, first = [], 0


def _read_parquet(path: Path, opts: SourceOptions, bad: BadInput):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        bad.report("unknown_format", str(path), f"not a readable Parquet file ({e})")
        return
    if opts.text_field not in pf.schema_arrow.names:
        bad.report("missing_text_field", str(path),
                   f"no column {opts.text_field!r} (has: {pf.schema_arrow.names[:8]}); file skipped")
        return
    row = 0
    for batch in pf.iter_batches(columns=[opts.text_field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            where = f"{path}:row {row}"
            row += 1
            text = _text_of({opts.text_field: value}, where, opts, bad)
            if text is not None:
                yield where, text


def _read_hf(source: dict, opts: SourceOptions, bad: BadInput):
    import datasets

    spec = source["spec"]
    try:
        if source["kind"] == "hf_disk":
            ds = datasets.load_from_disk(str(source["path"]))
            if isinstance(ds, datasets.DatasetDict):
                if opts.hf_split not in ds:
                    raise DataError(f"{spec}: no split {opts.hf_split!r} (has: {list(ds)})")
                ds = ds[opts.hf_split]
            if opts.streaming:
                ds = ds.to_iterable_dataset()
        else:
            name = str(source["path"]) if source["kind"] == "hf_repo" else spec
            ds = datasets.load_dataset(name, opts.hf_config, split=opts.hf_split, streaming=opts.streaming)
    except DataError:
        raise
    except Exception as e:
        hint = ("" if source["kind"] != "hf_hub" else " It is no local path either (none exists by that name); "
                "offline, use local files or --input builtin:wiki")
        raise DataError(f"cannot load Hugging Face dataset {spec!r} (config {opts.hf_config!r}, split "
                        f"{opts.hf_split!r}): {type(e).__name__}: {e}.{hint}") from e
    for i, record in enumerate(ds):
        where = f"{spec}[{i}]"
        text = _text_of(record, where, opts, bad)
        if text is not None:
            yield where, text


READERS = {"jsonl": _read_jsonl, "json": _read_json, "txt": _read_txt, "parquet": _read_parquet}

