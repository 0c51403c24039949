"""Weighted mixtures of data_prep directories (`data.sources`), drawn deterministically, resumed exactly.

The mixture is one global stream of samples. It is cut into rounds of `ROUND` samples; round r holds
floor(w_k * ROUND) samples of source k plus the leftover slots, given to sources drawn (without
replacement) in proportion to the fractional parts, all shuffled, by a generator seeded from
(seed, r). So the realised proportions match the weights to within 1/ROUND per round whatever the
seed, and the stream is a pure function of (seed, weights). Source k is read as its own endless
stream, epoch after epoch of its own permutation (`ShardLoader`'s order for seed + k). A step
takes the next `batch_size * world_size` slots and rank r reads the r-th slice.

The state is (position in the mixture stream, samples drawn from each source): every rank holds the
same one, and a restored loader continues with exactly the samples an uninterrupted run would read
(at another world size, at the same sample). Sources must share the tokenizer, block length, dtype
and kind (pretraining or loss-masked fine-tuning shards).

Remote sources (URLs) are prefetched as a single remote `ShardLoader` prefetches: before each batch
the shards this rank reads in it and in the next `CALM_DATA_PREFETCH` batches are queued on each
source's `ShardCache`, in reading order (the source's current epoch only).
"""

from __future__ import annotations

import numpy as np
import torch

from data_prep.manifest import ManifestError
from pretrain.data import MaskedBatch, ShardLoader

ROUND = 1024
"""Samples per round of the mixture stream; the realised proportions match the weights within 1/ROUND per round."""


def source_name(path: str, taken: set[str]) -> str:
    """A short, unique name for a source in metrics: its directory's last component."""
    base = str(path).rstrip("/").rsplit("/", 1)[-1] or str(path)
    name, n = base, 2
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    taken.add(name)
    return name


def parse_sources(sources: list) -> list[tuple[str, float]]:
    """`data.sources` entries ({path, weight}) as (path, normalised weight) pairs; ValueError if malformed."""
    pairs = []
    for i, item in enumerate(sources):
        if not isinstance(item, dict) or set(item) - {"path", "weight"} or "path" not in item:
            raise ValueError(f"data.sources[{i}] must be a mapping with 'path' and an optional 'weight', got {item!r}")
        weight = float(item.get("weight", 1.0))
        if not weight > 0:
            raise ValueError(f"data.sources[{i}].weight must be > 0, got {weight}")
        pairs.append((str(item["path"]), weight))
    if not pairs:
        raise ValueError("data.sources is empty")
    total = sum(w for _, w in pairs)
    return [(p, w / total) for p, w in pairs]


def check_same_format(loaders: list[ShardLoader], paths: list[str]) -> None:
    """All sources were made with one tokenizer, block length and dtype: a ManifestError otherwise."""
    first = loaders[0].manifest
    for loader, path in zip(loaders[1:], paths[1:]):
        m = loader.manifest
        for what, mine, theirs in (("tokenizer (sha256)", m["tokenizer"]["sha256"], first["tokenizer"]["sha256"]),
                                   ("block_len", m["block_len"], first["block_len"]),
                                   ("dtype", m["dtype"], first["dtype"]),
                                   ("loss_mask", m.get("loss_mask", False), first.get("loss_mask", False)),
                                   ("prompt alignment (K)", m.get("finetune", {}).get("patch_size"),
                                    first.get("finetune", {}).get("patch_size"))):
            if mine != theirs:
                raise ManifestError(f"data.sources: {path} has {what} {mine!r} but {paths[0]} has {theirs!r}; all "
                                    "sources of a mixture must be prepared with the same tokenizer, --block-len and kind "
                                    "(pretraining, or --finetune with one --patch-size)")


class MixtureLoader:
    """Yields `torch.LongTensor (batch_size, block_len)` batches of a weighted mixture, forever."""

    def __init__(self, sources: list[tuple[str, float]], split: str, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, verify: bool = True):
        self.paths = [p for p, _ in sources]
        self.weights = np.array([w for _, w in sources], dtype=np.float64)
        self.weights /= self.weights.sum()
        # Sub-loaders are only read by sample index; their rank/world_size share out verify_all.
        self.sources = [ShardLoader(p, split, 1, rank=rank, world_size=world_size, seed=seed + k, shuffle=shuffle,
                                    verify=verify, drop_last=False) for k, (p, _) in enumerate(sources)]
        check_same_format(self.sources, self.paths)
        taken: set[str] = set()
        self.names = [source_name(p, taken) for p in self.paths]
        self.split, self.batch_size, self.rank, self.world_size, self.seed = split, batch_size, rank, world_size, seed
        self.shuffle = shuffle
        self.position, self.drawn = 0, np.zeros(len(sources), dtype=np.int64)
        self._rounds: dict[int, np.ndarray] = {}  # a few recent rounds (reading and prefetching straddle two)

    @property
    def manifest(self) -> dict:
        return self.sources[0].manifest

    @property
    def block_len(self) -> int:
        return self.sources[0].block_len

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def _round(self, r: int) -> np.ndarray:
        """Source ids of the ROUND slots of round r."""
        if r not in self._rounds:
            rng = np.random.Generator(np.random.PCG64([self.seed, r, 0x6D6978]))  # "mix"
            exact = self.weights * ROUND
            counts = np.floor(exact).astype(np.int64)
            left = ROUND - int(counts.sum())
            if left:
                frac = exact - counts
                counts[rng.choice(len(counts), size=left, replace=False, p=frac / frac.sum())] += 1
            slots = np.repeat(np.arange(len(counts)), counts)
            if len(self._rounds) >= 4:
                del self._rounds[min(self._rounds)]
            self._rounds[r] = rng.permutation(slots) if self.shuffle else slots
        return self._rounds[r]

    def _slots(self, start: int, n: int) -> np.ndarray:
        """Source ids of mixture positions start..start+n-1."""
        pos = np.arange(start, start + n)
        out = np.empty(n, dtype=np.int64)
        for r in range(start // ROUND, (start + n - 1) // ROUND + 1):
            mine = pos // ROUND == r
            out[mine] = self._round(r)[pos[mine] % ROUND]
        return out

    def _stream_positions(self, slots: np.ndarray) -> np.ndarray:
        """Each slot's position in its source's stream, for slots starting at `self.position`."""
        out = np.empty_like(slots)
        for k in range(len(self.sources)):
            mine = slots == k
            out[mine] = self.drawn[k] + np.arange(int(mine.sum()))
        return out

    def __iter__(self):
        while True:
            yield self.next_batch()

    def next_batch(self) -> torch.Tensor:
        """This rank's slice of the next global batch; the state advances by the whole global batch."""
        ahead = max((s.prefetch_ahead for s in self.sources), default=0)
        # Slots of this batch and, for remote sources, of the `ahead` batches after it; each slot's
        # position in its source's stream is drawn so far + earlier slots of that source.
        slots = self._slots(self.position, self.global_batch * (1 + ahead))
        stream_pos = self._stream_positions(slots)
        mine = (np.arange(len(slots)) % self.global_batch) // self.batch_size == self.rank  # this rank's slices
        if ahead:
            self._prefetch(slots[mine], stream_pos[mine])
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        batch = self._read(slots[lo:hi], stream_pos[lo:hi])
        self.position += self.global_batch
        self.drawn += np.bincount(slots[: self.global_batch], minlength=len(self.sources))
        return batch

    def _indices(self, k: int, stream_pos: np.ndarray) -> np.ndarray:
        """Sample indices in source k of the given positions in its stream (epoch after epoch)."""
        src = self.sources[k]
        epochs, offsets = np.divmod(stream_pos, src.num_samples)
        index = np.empty_like(offsets)
        for e in np.unique(epochs).tolist():  # positions ascend: at most two epochs per batch
            index[epochs == e] = src.order(e)[offsets[epochs == e]]
        return index

    def _prefetch(self, slots: np.ndarray, stream_pos: np.ndarray) -> None:
        """Queue each remote source's shards of the given slots (in reading order, its current epoch only)."""
        for k, src in enumerate(self.sources):
            pos = stream_pos[slots == k]
            if not src.is_remote or not len(pos):
                continue
            pos = pos[pos // src.num_samples == pos[0] // src.num_samples]
            src.prefetch(self._indices(k, pos))

    def _read(self, slots: np.ndarray, stream_pos: np.ndarray):
        """The batch of these slots: a LongTensor, or for loss-masked sources a batch of the same kind."""
        parts = [(np.flatnonzero(slots == k), self.sources[k].read(self._indices(k, stream_pos[slots == k])))
                 for k in np.unique(slots).tolist()]
        if isinstance(parts[0][1], torch.Tensor):
            return self._place(parts, lambda part: part)
        packed = any(p.position_ids is not None for _, p in parts)  # a packed set mixed with unpacked ones
        return MaskedBatch(self._place(parts, lambda p: p.input_ids), self._place(parts, lambda p: p.loss_mask),
                           self._place(parts, lambda p: p.positions()) if packed else None)

    @staticmethod
    def _place(parts: list, field) -> torch.Tensor:
        """One tensor with row `rows[i]` of each part's `field` put back in slot order."""
        first = field(parts[0][1])
        out = first.new_empty((sum(len(rows) for rows, _ in parts), *first.shape[1:]))
        for rows, part in parts:
            out[torch.from_numpy(rows)] = field(part)
        return out

    def proportions(self) -> dict[str, float]:
        """Realised share of each source in the samples drawn so far (all ranks together)."""
        total = max(1, int(self.drawn.sum()))
        return {name: int(n) / total for name, n in zip(self.names, self.drawn)}

    def verify_all(self) -> None:
        for src in self.sources:
            if not src.is_remote:  # remote shards are verified by their cache as they arrive
                src.verify_all()

    def state_dict(self) -> dict:
        return {"kind": "mixture", "split": self.split, "seed": self.seed, "shuffle": self.shuffle,
                "position": self.position, "drawn": self.drawn.tolist(), "weights": self.weights.tolist(),
                "sources": [s.state_dict()["data_id"] for s in self.sources],
                "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continues where `state` left off; refuses state from other sources, weights, split or seed."""
        mine = self.state_dict()
        for key in ("kind", "split", "seed", "shuffle", "weights", "sources"):
            same = np.allclose(state.get(key), mine[key], rtol=0, atol=1e-12) if key == "weights" \
                and len(state.get(key) or ()) == len(mine[key]) else state.get(key) == mine[key]
            if not same:
                raise ManifestError(f"cannot resume the mixture {self.paths}: loader state has {key}="
                                    f"{state.get(key)!r} but this loader has {mine[key]!r} (the checkpoint was "
                                    "trained on other sources, weights, split or seed)")
        self.position, self.drawn = int(state["position"]), np.array(state["drawn"], dtype=np.int64)


def data_dirs(data) -> list[str]:
    """The data directories a `DataConfig` reads: `data.sources`' paths, or `data.path` alone."""
    return [p for p, _ in parse_sources(data.sources)] if data.sources else [data.path]


def train_loader(config, world):
    """The training loader: a `ShardLoader` over `data.path`, or a `MixtureLoader` over `data.sources`."""
    data, kw = config.data, dict(rank=world.rank, world_size=world.world_size, seed=config.seed, shuffle=True)
    if not data.sources:
        return ShardLoader(data.path, data.train_split, config.micro_batch_size, **kw)
    return MixtureLoader(parse_sources(data.sources), data.train_split, config.micro_batch_size, **kw)


def val_loaders(config, world) -> dict[str, object]:
    """Validation loaders by metric prefix: "" for the data as a whole (for a mixture: the mixture of the
    validation splits, in a fixed order) and, for a mixture, one per source named `source_name`."""
    data, kw = config.data, dict(rank=world.rank, world_size=world.world_size, seed=config.seed)
    if not data.sources:
        return {"": ShardLoader(data.path, data.val_split, config.micro_batch_size, shuffle=False, **kw)}
    sources = parse_sources(data.sources)
    loaders: dict[str, object] = {"": MixtureLoader(sources, data.val_split, config.micro_batch_size, **kw)}
    taken: set[str] = set()
    for path, _ in sources:
        loaders[source_name(path, taken) + "/"] = ShardLoader(path, data.val_split, config.micro_batch_size,
                                                              shuffle=False, **kw)
    return loaders
