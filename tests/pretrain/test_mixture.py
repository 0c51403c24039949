"""Weighted mixtures (`pretrain.mixture`) and shards from a local HTTP server (`data_prep.remote`)."""

from __future__ import annotations

import json
import shutil
from itertools import islice

import numpy as np
import pytest
import torch

from data_prep.manifest import ManifestError
from pretrain.data import ShardError, ShardLoader
from pretrain.mixture import ROUND, MixtureLoader
from tests.http_server import StaticServer


def half_copy(src, dst):
    """A second source with the same tokenizer: `src` with only the first half of its train shards."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    train["shards"] = train["shards"][: max(1, len(train["shards"]) // 2)]
    for key in ("samples", "tokens"):
        if key in train:
            train[key] = sum(s[key] for s in train["shards"])
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


@pytest.fixture(scope="module")
def two_sources(tiny_data_dir, tmp_path_factory):
    return [(str(tiny_data_dir), 0.7), (str(half_copy(tiny_data_dir, tmp_path_factory.mktemp("mix") / "b")), 0.3)]


def test_proportions_within_one_percent_and_sources_read(two_sources):
    loader = MixtureLoader(two_sources, "train", batch_size=16, seed=5)
    batches = list(islice(iter(loader), 10240 // 16))
    shares = loader.proportions()
    assert sum(loader.drawn) == 10240
    assert all(abs(share - w) < 0.01 for share, (_, w) in zip(shares.values(), two_sources)), shares
    # Every sample is a block of one of the sources, and the smaller source is read epoch after epoch.
    b = ShardLoader(two_sources[1][0], "train", 1)
    assert loader.drawn[1] > b.num_samples
    assert all(batch.shape == (16, 64) for batch in batches)


def test_mixture_resume_two_ranks_equals_uninterrupted(two_sources):
    n, m, world = 5, 6, 2
    full = [list(islice(iter(MixtureLoader(two_sources, "train", 8, rank=r, world_size=world, seed=1)), n + m))
            for r in range(world)]
    for r in range(world):
        first = MixtureLoader(two_sources, "train", 8, rank=r, world_size=world, seed=1)
        list(islice(iter(first), n))
        state = json.loads(json.dumps(first.state_dict()))  # through a checkpoint's JSON
        resumed = MixtureLoader(two_sources, "train", 8, rank=r, world_size=world, seed=1)
        resumed.load_state_dict(state)
        assert all(torch.equal(a, b) for a, b in zip(islice(iter(resumed), m), full[r][n:], strict=True))
    single = list(islice(iter(MixtureLoader(two_sources, "train", 16, seed=1)), n + m))
    assert all(torch.equal(torch.cat([full[0][i], full[1][i]]), single[i]) for i in range(n + m))
    # The order is the seed's: another seed draws other samples; other weights refuse the state.
    other = next(iter(MixtureLoader(two_sources, "train", 16, seed=2)))
    assert not torch.equal(other, single[0])
    reweighted = MixtureLoader([(two_sources[0][0], 0.5), (two_sources[1][0], 0.5)], "train", 16, seed=1)
    with pytest.raises(ManifestError, match="weights"):
        reweighted.load_state_dict(state)


@pytest.mark.faults
def test_sources_with_another_tokenizer_are_refused(two_sources, tmp_path):
    other = shutil.copytree(two_sources[1][0], tmp_path / "other")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="same tokenizer"):
        MixtureLoader([two_sources[0], (str(other), 0.3)], "train", 4)


def test_round_follows_weights_exactly():
    loader = MixtureLoader.__new__(MixtureLoader)
    loader.weights, loader.seed, loader.shuffle, loader._round_cache = np.array([0.5, 0.3, 0.2]), 0, True, None
    counts = np.bincount(loader._round(3), minlength=3)
    assert counts.sum() == ROUND and np.all(np.abs(counts - loader.weights * ROUND) <= 1)


def test_http_shards_equal_local_and_corruption_is_refetched_then_refused(tiny_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CALM_DATA_CACHE", str(tmp_path / "cache"))
    served = shutil.copytree(tiny_data_dir, tmp_path / "www" / "data")
    local = list(islice(iter(ShardLoader(tiny_data_dir, "train", 8, seed=4, epochs=1)), 60))
    with StaticServer(tmp_path / "www") as url:
        # A cache bound of half the shards: shards are evicted and fetched again, the samples stay the same.
        sizes = [s["bytes"] for s in json.loads((served / "manifest.json").read_text())["splits"]["train"]["shards"]]
        monkeypatch.setenv("CALM_DATA_CACHE_GB", str(sum(sizes) / 2 / 2**30))
        remote = ShardLoader(f"{url}/data", "train", 8, seed=4, epochs=1)
        got = list(islice(iter(remote), 60))
        assert all(torch.equal(a, b) for a, b in zip(got, local, strict=True))
        assert remote._remote.fetches > len(remote.manifest["splits"]["train"]["shards"])  # evicted, refetched
        cached = sum(p.stat().st_size for p in (remote.data_dir / "train").glob("*.tar"))
        assert cached <= sum(sizes) / 2 + max(sizes)  # the bound, give or take the shard being read
        # Exact resume through the cache.
        half = ShardLoader(f"{url}/data", "train", 8, seed=4, epochs=1)
        list(islice(iter(half), 10))
        again = ShardLoader(f"{url}/data", "train", 8, seed=4, epochs=1)
        again.load_state_dict(half.state_dict())
        assert all(torch.equal(a, b) for a, b in zip(islice(iter(again), 50), local[10:], strict=True))

        monkeypatch.setenv("CALM_DATA_CACHE_GB", "1")
        monkeypatch.setenv("CALM_DATA_CACHE", str(tmp_path / "cache2"))
        name = json.loads((served / "manifest.json").read_text())["splits"]["validation"]["shards"][0]["path"]
        shard = served / name
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        val = ShardLoader(f"{url}/data", "validation", 4, shuffle=False, epochs=1)
        with pytest.raises(ShardError, match=f"{name} failed verification twice"):
            list(val)
        assert val._remote.fetches == 2
