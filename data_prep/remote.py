"""Data directories in object storage: `s3://`, `gs://`, `https://`, `hf://` URLs read through fsspec.

A remote data directory is mirrored into a local cache: `manifest.json` and the tokenizer are
downloaded when the directory is first named (they are small, and everything that reads a manifest
or a tokenizer then works unchanged on the local copy); shards are fetched on demand by
`ShardCache.fetch`, checked against the manifest's byte count and sha256 before use, fetched again
once if they fail, prefetched ahead of the reader by a few threads, and evicted least-recently-used
once the cache holds more than its size bound.

The cache is configured by environment (every rank and every tool sees the same settings):
  CALM_DATA_CACHE      cache root (default ~/.cache/calm/data); one subdirectory per URL
  CALM_DATA_CACHE_GB   size bound of the shards of one URL (default 50)
  CALM_DATA_PREFETCH   shards fetched ahead of the reader (default 8; 0 disables prefetching)
"""

from __future__ import annotations

import collections
import hashlib
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from data_prep.manifest import ManifestError
from data_prep.sources import sha256_file

SCHEMES = ("s3://", "gs://", "gcs://", "http://", "https://", "hf://", "memory://", "file://")
# fsspec backends that are not in requirements.txt: pinned in requirements-cloud.txt (to fsspec's pin)
BACKENDS = {"s3://": "s3fs==2026.9.0", "gs://": "gcsfs==2026.10.1", "gcs://": "gcsfs==2026.10.1"}
_MIRRORS: dict[str, Path] = {}  # URL -> its local mirror, set up once per process
_LOCK = threading.Lock()


class RemoteError(RuntimeError):
    """A remote shard or directory cannot be fetched or fails verification; the message names it."""


class MissingBackend(RemoteError, ManifestError):
    """A URL whose fsspec backend is not installed. A ManifestError too, so every command that reports a
    bad data directory in one line (training, evaluation, data_prep) reports this one the same way."""


def is_url(path) -> bool:
    return isinstance(path, str) and path.startswith(SCHEMES)


def cache_root() -> Path:
    return Path(os.environ.get("CALM_DATA_CACHE") or Path.home() / ".cache" / "calm" / "data")


def _filesystem(url: str):
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url)
    except ImportError as exc:  # fsspec's own text names the package but not the version that fits its pin
        pin = next((pkg for scheme, pkg in BACKENDS.items() if url.startswith(scheme)), None)
        if pin is None:
            raise
        raise MissingBackend(f"{url}: reading {url.split('://')[0]}:// needs {pin.split('==')[0]}, which is not "
                             f"installed: pip install {pin} (pinned in requirements-cloud.txt)") from exc
    return fs, root.rstrip("/")


def _atomic_get(fs, remote: str, local: Path) -> None:
    """Download to a temporary name and rename, so an interrupted fetch never leaves a partial file
    under the real name (tmp name per thread: two ranks or threads may fetch the same file)."""
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.{os.getpid()}.{threading.get_ident()}.part")
    try:
        fs.get_file(remote, str(tmp))  # streamed to disk; plain GETs (no range requests needed)
        os.replace(tmp, local)
    except FileNotFoundError as e:
        raise RemoteError(f"{remote}: not found on the remote ({e})") from e
    finally:
        tmp.unlink(missing_ok=True)


def local_mirror(url: str) -> Path:
    """The local directory mirroring `url`: manifest.json and the tokenizer fetched (once per
    process, refreshed from the remote at each process start); shards come later, one by one."""
    url = url.rstrip("/")
    with _LOCK:
        if url in _MIRRORS:
            return _MIRRORS[url]
        import json

        local = cache_root() / hashlib.sha256(url.encode()).hexdigest()[:16]
        fs, root = _filesystem(url)
        _atomic_get(fs, f"{root}/manifest.json", local / "manifest.json")
        (local / "source.txt").write_text(url + "\n")
        try:
            tok_dir = json.loads((local / "manifest.json").read_text())["tokenizer"]["path"]
        except (ValueError, KeyError, TypeError):
            tok_dir = None  # read_manifest reports the malformed manifest
        if tok_dir:
            for remote in fs.find(f"{root}/{tok_dir}"):
                name = remote.rstrip("/").rsplit("/", 1)[-1]
                if name:
                    _atomic_get(fs, remote, local / tok_dir / name)
        _MIRRORS[url] = local
        return local


class ShardCache:
    """Verified, size-bounded local copies of one remote directory's shards, with prefetching."""

    def __init__(self, url: str, max_bytes: int | None = None, prefetch: int | None = None):
        self.url = url.rstrip("/")
        self.local = local_mirror(self.url)
        self.fs, self.root = _filesystem(self.url)
        gb = float(os.environ.get("CALM_DATA_CACHE_GB", 50))
        self.max_bytes = int(gb * 2**30) if max_bytes is None else max_bytes
        self.ahead = int(os.environ.get("CALM_DATA_PREFETCH", 8)) if prefetch is None else prefetch
        self._lru: collections.OrderedDict[str, int] = collections.OrderedDict()  # path -> bytes, verified
        self._pending: dict[str, Future] = {}
        self._last: str | None = None
        self._failed: dict[str, RemoteError] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max(1, min(self.ahead, 4)), thread_name_prefix="shard-prefetch") \
            if self.ahead else None
        self.fetches = 0  # downloads made (a test and the benchmark read it)

    def fetch(self, entry: dict) -> Path:
        """The local path of the shard `entry` (a manifest shard entry), verified; blocks until it is there."""
        with self._lock:
            self._last = entry["path"]  # the reader opens it next: prefetching never evicts it
            future = self._pending.get(entry["path"])
        if future is not None:
            future.result()
        with self._lock:
            failed = self._failed.pop(entry["path"], None)
        if failed is not None:  # prefetching already fetched it twice and refused it
            raise failed
        path = self._ensure(entry)
        with self._lock:
            self._lru.move_to_end(entry["path"])
            self._evict(keep=entry["path"])
        return path

    def prefetch(self, entries: list[dict]) -> None:
        """Start fetching shards the reader will need soon (at most `ahead`, in that order)."""
        if self._pool is None:
            return
        with self._lock:
            for entry in entries[: self.ahead]:
                key = entry["path"]
                if key not in self._lru and key not in self._pending:
                    self._pending[key] = self._pool.submit(self._background, entry)

    def _background(self, entry: dict) -> None:
        try:
            self._ensure(entry)
        except RemoteError as exc:  # refused: the reader's fetch raises it, in the reader's thread
            with self._lock:
                self._failed[entry["path"]] = exc
        except Exception:  # noqa: BLE001 - a network error: the reader's own fetch tries again
            pass
        finally:
            with self._lock:
                self._pending.pop(entry["path"], None)

    def _ensure(self, entry: dict) -> Path:
        key = entry["path"]
        path = self.local / key
        with self._lock:
            if key in self._lru and path.is_file():
                return path
        if path.is_file() and self._valid(path, entry):  # left by an earlier process: verify, don't trust
            return self._admit(key, path)
        for attempt in (1, 2):  # a shard that fails verification is fetched once more, then refused
            _atomic_get(self.fs, f"{self.root}/{key}", path)
            with self._lock:
                self.fetches += 1
            if self._valid(path, entry):
                return self._admit(key, path)
        path.unlink(missing_ok=True)
        raise RemoteError(f"shard {self.url}/{key} failed verification twice (size or sha256 differs from the "
                          "manifest's); the remote copy is corrupted: re-upload it or re-run data_prep")

    @staticmethod
    def _valid(path: Path, entry: dict) -> bool:
        if "bytes" in entry and path.stat().st_size != entry["bytes"]:
            return False
        return sha256_file(path) == entry["sha256"]

    def _admit(self, key: str, path: Path) -> Path:
        with self._lock:
            self._lru[key] = path.stat().st_size
            self._lru.move_to_end(key)
            self._evict(keep=key)
        return path

    def _evict(self, keep: str) -> None:
        """Drop least-recently-used shards while over the bound (caller holds the lock). A shard
        still memory-mapped by the reader stays readable: unlinking frees it when the map closes."""
        while sum(self._lru.values()) > self.max_bytes:
            key = next((k for k in self._lru if k not in (keep, self._last)), None)
            if key is None:
                break
            self._lru.pop(key)
            (self.local / key).unlink(missing_ok=True)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
