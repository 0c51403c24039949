"""Training-side reader of the shards made by `python -m data_prep`: exact, resumable, rank-aware.

`ShardLoader` indexes every sample of a split globally (sample counts come from the manifest) and
reads them straight from the tar files through a memory map, so nothing is loaded up front and any
sample is one slice away. Each epoch is a permutation of all samples drawn from (seed, epoch); a
step takes the next `batch_size * world_size` samples of it and rank r gets the r-th slice. The state
is just (epoch, samples consumed in the epoch), so a restored loader continues with exactly the
samples an uninterrupted run would have read; at another world size or batch size it continues at
the same sample, only the grouping of the following samples into batches changes.

Use it directly rather than inside torch DataLoader workers: a read is a memory-map slice, and the
resume state lives in this object. Every shard is checked before use: its size at construction, its
sha256 (against the manifest) and tar structure when first opened. A truncated or altered shard
raises `ShardError` naming the file.

Fine-tuning shards (manifest `"loss_mask": true`, data_prep/finetune.py) hold (ids, loss mask) per
sample, and packed ones (`"finetune": {"packed": true}`) also the position ids that keep each record
to itself; their batches are `MaskedBatch`es, which the stage objectives (pretrain.stages) score on
the masked positions only. Pretraining shards are read exactly as before, as plain LongTensors.
"""

from __future__ import annotations

import collections
import hashlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_prep.manifest import ManifestError, check_compatible, read_manifest
from data_prep.remote import RemoteError, ShardCache, is_url, local_mirror
from data_prep.tokenizer import tokenizer_sha256

__all__ = ["ShardLoader", "ShardError", "MaskedBatch", "ManifestError", "read_manifest", "load_tokenizer",
           "check_tokenizer", "check_compatible"]
OPEN_SHARDS = 128  # memory maps kept open at once; each holds a file descriptor


class ShardError(RuntimeError):
    """A shard is missing, truncated or corrupted; the message names the file."""


@dataclass
class MaskedBatch:
    """A batch of fine-tuning blocks: token ids, the loss mask (1 = scored) and, for packed blocks, the
    position ids that restart at every record (None: one record per block), all (B, block_len).

    Moves like a tensor (`.to(device)`), so the training loop handles it as it handles a plain batch."""

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor | None = None

    def to(self, *args, **kwargs) -> "MaskedBatch":
        pos = None if self.position_ids is None else self.position_ids.to(*args, **kwargs)
        return MaskedBatch(self.input_ids.to(*args, **kwargs), self.loss_mask.to(*args, **kwargs), pos)

    def positions(self) -> torch.Tensor:
        """The position ids, counting from 0 across the block where it holds one record."""
        if self.position_ids is not None:
            return self.position_ids
        return torch.arange(self.input_ids.shape[1], device=self.input_ids.device).expand_as(self.input_ids)

    def __len__(self) -> int:
        return len(self.input_ids)


def check_tokenizer(data_dir, manifest: dict | None = None) -> Path:
    """The directory of the tokenizer the shards were made with, checked against the manifest's hash."""
    entry = (manifest or read_manifest(data_dir))["tokenizer"]
    if is_url(data_dir):
        data_dir = local_mirror(data_dir)  # the tokenizer was fetched beside the manifest
    directory = Path(data_dir) / entry["path"]
    if not directory.is_dir():
        raise ManifestError(f"tokenizer directory {directory} is missing; the data directory is incomplete "
                            "(re-run data_prep)")
    if tokenizer_sha256(directory) != entry["sha256"]:
        raise ManifestError(f"tokenizer files in {directory} differ from the ones recorded in the manifest "
                            "(sha256 mismatch); the token ids of the shards would be misread: restore the "
                            "tokenizer data_prep saved there, or re-run data_prep")
    return directory


def load_tokenizer(data_dir):
    """The tokenizer the shards were made with, checked against the manifest's hash."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(check_tokenizer(data_dir)))


class _Shard:
    """Checks one tar and indexes its blocks; the memory map is opened on demand and may be dropped."""

    def __init__(self, path: Path, entry: dict, block_len: int, dtype: np.dtype, verify: bool, rows: int = 1):
        # rows=2: fine-tuning samples, (2, block_len) arrays of ids and loss mask; 3: packed, with position ids
        self.path, self.dtype, self.nbytes = path, dtype, rows * block_len * dtype.itemsize
        self.shape = (block_len,) if rows == 1 else (rows, block_len)
        if verify:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    digest.update(chunk)
            if digest.hexdigest() != entry["sha256"]:
                raise ShardError(f"shard {path} is corrupted: sha256 {digest.hexdigest()} differs from the "
                                 f"manifest's {entry['sha256']}; re-run data_prep to rebuild it")
        try:
            with tarfile.open(path, "r:") as tar:
                members = tar.getmembers()
                first = tar.extractfile(members[0]).read(4096) if members else b""
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ShardError(f"shard {path} is truncated or not a tar file: {e}") from e
        if len(members) != entry["samples"]:
            raise ShardError(f"shard {path} holds {len(members)} samples, the manifest says {entry['samples']}")
        header = self._npy_header(members[0].name, first, dtype)
        if any(m.size != header + self.nbytes for m in members):
            raise ShardError(f"shard {path} has members of unexpected size (want {header + self.nbytes} bytes each)")
        self.offsets = np.array([m.offset_data + header for m in members], dtype=np.int64)
        self.map: np.memmap | None = None

    def _npy_header(self, name: str, first: bytes, dtype: np.dtype) -> int:
        raw = io.BytesIO(first)
        try:
            version = np.lib.format.read_magic(raw)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, found = read_header(raw)
        except ValueError as e:
            raise ShardError(f"shard {self.path}: member {name} is not a .npy array: {e}") from e
        if shape != self.shape or found != dtype or fortran:
            raise ShardError(f"shard {self.path}: member {name} is {found}{shape}, "
                             f"the manifest says {dtype}{self.shape}")
        return raw.tell()

    def read(self, j: int) -> np.ndarray:
        if self.map is None:
            self.map = np.memmap(self.path, dtype=np.uint8, mode="r")
        off = self.offsets[j]
        return self.map[off : off + self.nbytes].view(self.dtype).reshape(self.shape)


class ShardLoader:
    """Yields `torch.LongTensor (batch_size, block_len)` batches of one split for one rank
    (`MaskedBatch`es for fine-tuning shards, `masked` True).

    epochs=None loops forever (training); epochs=1 is a single pass (validation). With
    drop_last=True every batch is full and the last incomplete global batch of an epoch is skipped
    (a different one each epoch when shuffling); with False the tail is spread over the ranks, so
    the last batch can be smaller (or absent on some ranks).
    """

    def __init__(self, data_dir, split: str, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, epochs: int | None = None, drop_last: bool = True, verify: bool = True):
        # A URL: shards come through a verified local cache (data_prep.remote), read from there.
        self._remote = ShardCache(data_dir) if is_url(data_dir) else None
        self.data_dir = self._remote.local if self._remote else Path(data_dir)
        self._manifest = read_manifest(self.data_dir)
        if split not in self._manifest["splits"]:
            raise ManifestError(f"{self.data_dir}: no split {split!r} (has: {list(self._manifest['splits'])})")
        if not 0 <= rank < world_size or batch_size <= 0:
            raise ValueError(f"need 0 <= rank < world_size and batch_size > 0 (got {rank}, {world_size}, {batch_size})")
        self.split, self.batch_size, self.rank, self.world_size = split, batch_size, rank, world_size
        self.seed, self.shuffle, self.epochs, self.drop_last, self.verify = seed, shuffle, epochs, drop_last, verify
        self._entries = self._manifest["splits"][split]["shards"]
        counts = np.array([s["samples"] for s in self._entries], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self.num_samples = int(self._starts[-1])
        self._dtype = np.dtype(self._manifest["dtype"])
        self.masked = bool(self._manifest.get("loss_mask", False))
        self.packed = self.masked and bool(self._manifest.get("finetune", {}).get("packed", False))
        self._data_id = hashlib.sha256("".join(s["sha256"] for s in self._entries).encode()).hexdigest()
        for entry in self._entries if self._remote is None else ():  # remote shards: checked when fetched
            path = self.data_dir / entry["path"]
            if not path.is_file():
                raise ShardError(f"shard {path} listed in the manifest is missing; re-run data_prep (it reuses "
                                 "the intact shards)")
            if "bytes" in entry and path.stat().st_size != entry["bytes"]:
                raise ShardError(f"shard {path} is truncated or altered: {path.stat().st_size} bytes, "
                                 f"the manifest says {entry['bytes']}; re-run data_prep to rebuild it")
        if self.num_samples == 0:
            raise ManifestError(f"{self.data_dir}: split {split!r} holds no samples")
        if drop_last and self.num_samples < self.global_batch:
            raise ManifestError(f"{self.data_dir}: split {split!r} has {self.num_samples} samples, fewer than one "
                                f"global batch of {self.global_batch} (batch_size x world_size)")
        self._shards: dict[int, _Shard] = {}  # checked and indexed once, kept (a few bytes per sample)
        self._mapped: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU of open memory maps
        self._order_cache: tuple[int, np.ndarray] | None = None
        self.epoch, self.offset = 0, 0

    @property
    def manifest(self) -> dict:
        return self._manifest

    @property
    def block_len(self) -> int:
        return self._manifest["block_len"]

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        full, rest = divmod(self.num_samples, self.global_batch)
        if self.drop_last or rest == 0:
            return full
        per_rank = -(-rest // self.world_size)
        return full + (1 if self.rank * per_rank < rest else 0)

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            order = (np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(self.num_samples)
                     if self.shuffle else np.arange(self.num_samples))
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def _rank_slice(self) -> tuple[slice, int] | None:
        """This rank's part of the next global batch and the new offset, or None at the epoch's end."""
        start, remaining = self.offset, self.num_samples - self.offset
        if remaining >= self.global_batch:
            lo = start + self.rank * self.batch_size
            return slice(lo, lo + self.batch_size), start + self.global_batch
        if remaining <= 0 or self.drop_last:
            return None
        per_rank = -(-remaining // self.world_size)
        lo = start + self.rank * per_rank
        return slice(lo, min(lo + per_rank, self.num_samples)), self.num_samples

    def __iter__(self):
        while self.epochs is None or self.epoch < self.epochs:
            order = self._order(self.epoch)
            while (step := self._rank_slice()) is not None:
                part, new_offset = step
                if self._remote is not None:
                    self._prefetch(order, new_offset)
                batch = self.read(order[part]) if part.stop > part.start else None
                self.offset = new_offset
                if batch is not None:
                    yield batch
            self.epoch, self.offset = self.epoch + 1, 0

    # The interface a mixture of loaders (pretrain.mixture) draws on: sample order, reads, prefetching.
    @property
    def is_remote(self) -> bool:
        return self._remote is not None

    @property
    def prefetch_ahead(self) -> int:
        """Batches whose shards a remote loader fetches ahead of the reader (0 for local data)."""
        return self._remote.ahead if self._remote is not None else 0

    def order(self, epoch: int) -> np.ndarray:
        """Sample indices of `epoch` in reading order (a permutation from (seed, epoch) when shuffling)."""
        return self._order(epoch)

    def read(self, indices: np.ndarray):
        """The samples at these global indices, in this order (a batch, masked for fine-tuning shards)."""
        shard_ids = np.searchsorted(self._starts, indices, side="right") - 1
        rows = [self._shard(s).read(i - self._starts[s]) for s, i in zip(shard_ids.tolist(), indices.tolist())]
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))
        if not self.masked:
            return batch
        return MaskedBatch(batch[:, 0].contiguous(), batch[:, 1].bool(),
                           batch[:, 2].contiguous() if self.packed else None)

    def prefetch(self, indices: np.ndarray) -> None:
        """Remote data: queue the shards holding these samples, in this order (nothing for local data)."""
        if self._remote is not None:
            shard_ids = dict.fromkeys((np.searchsorted(self._starts, indices, side="right") - 1).tolist())
            self._remote.prefetch([self._entries[s] for s in shard_ids])

    def _prefetch(self, order: np.ndarray, offset: int) -> None:
        """Remote data: queue the shards of the samples after `offset` (this epoch), in reading order."""
        self.prefetch(order[offset : offset + self.global_batch * max(1, self._remote.ahead)])

    def _shard(self, s: int) -> _Shard:
        shard = self._shards.get(s)
        entry = self._entries[s]
        # Remote: (re)fetched if evicted, verified by the cache, so not hashed a second time here.
        try:
            path = self._remote.fetch(entry) if self._remote else self.data_dir / entry["path"]
        except RemoteError as exc:
            raise ShardError(str(exc)) from exc
        if shard is None:
            shard = self._shards[s] = _Shard(path, entry, self.block_len, self._dtype,
                                             self.verify and self._remote is None,
                                             1 + self.masked + self.packed)
        self._mapped[s] = None
        self._mapped.move_to_end(s)
        if len(self._mapped) > OPEN_SHARDS:
            self._shards[self._mapped.popitem(last=False)[0]].map = None
        return shard

    def verify_all(self) -> None:
        """Collective: checksum and index every shard now, the shards shared out over the ranks; the
        same ShardError on every rank if any is bad. Shards first opened later skip the sha256."""
        from pretrain import distributed

        problems = []
        for s in range(self.rank, len(self._entries), self.world_size):
            try:
                self._shard(s)
            except ShardError as exc:
                problems.append(str(exc))
        problems = distributed.gather_lists(problems)
        if problems:
            more = f" (and {len(problems) - 1} more bad shard(s))" if len(problems) > 1 else ""
            raise ShardError(problems[0] + more)
        self.verify = False

    def state_dict(self) -> dict:
        return {"split": self.split, "epoch": self.epoch, "offset": self.offset, "seed": self.seed,
                "shuffle": self.shuffle, "num_samples": self.num_samples, "data_id": self._data_id,
                "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continues where `state` left off; refuses state from other data, split, seed or shuffling."""
        mine = self.state_dict()
        for key in ("split", "seed", "shuffle", "num_samples", "data_id"):
            if state.get(key) != mine[key]:
                raise ManifestError(f"cannot resume {self.data_dir} split {self.split!r}: loader state has "
                                    f"{key}={state.get(key)!r} but this loader has {mine[key]!r} (the "
                                    "checkpoint was trained on other data, split, seed or shuffling)")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
