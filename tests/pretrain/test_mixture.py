"""Weighted mixtures (`pretrain.mixture`) and shards from a local HTTP server (`data_prep.remote`)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.manifest import ManifestError
from data_prep.remote import BACKENDS
from pretrain.data import ShardError, ShardLoader
from pretrain.mixture import ROUND, MixtureLoader
from tests.http_server import StaticServer

REPO = Path(__file__).resolve().parents[2]


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
    loader.weights, loader.seed, loader.shuffle, loader._rounds = np.array([0.5, 0.3, 0.2]), 0, True, {}
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


def test_mixture_prefetches_its_remote_source_and_reads_the_same_samples(two_sources, tmp_path, monkeypatch):
    monkeypatch.setenv("CALM_DATA_CACHE", str(tmp_path / "cache"))
    (a, wa), (b, wb) = two_sources
    shutil.copytree(b, tmp_path / "www" / "b")
    local = list(islice(iter(MixtureLoader(two_sources, "train", 8, seed=3)), 12))
    with StaticServer(tmp_path / "www") as url:
        mix = MixtureLoader([(a, wa), (f"{url}/b", wb)], "train", 8, seed=3)
        src = mix.sources[1]
        got = [mix.next_batch()]
        deadline = time.monotonic() + 30
        while src._remote._pending and time.monotonic() < deadline:  # the queued fetches finish
            time.sleep(0.05)
        read = {src._entries[s]["path"] for s in src._shards}  # opened by the reader so far
        prefetched = set(src._remote._lru) - read
        assert prefetched and len(set(src._remote._lru)) <= len(read) + src._remote.ahead
        got += [mix.next_batch() for _ in range(11)]
        assert all(torch.equal(x, y) for x, y in zip(got, local, strict=True))
        assert prefetched <= {src._entries[s]["path"] for s in src._shards}  # fetched ahead, then read


@pytest.mark.faults
def test_a_missing_cloud_backend_is_one_line_naming_its_pinned_pip_command(capsys):
    from data_prep.distributed import main as distributed_main

    def pins(name: str) -> dict[str, str]:
        lines = (REPO / name).read_text().splitlines()
        return dict(line.split("==") for line in lines if line and not line.startswith("#"))

    cloud = pins("requirements-cloud.txt")
    assert cloud["s3fs"] == pins("requirements.txt")["fsspec"]  # s3fs pins fsspec to its own version
    assert {f"{k}=={v}" for k, v in cloud.items()} == set(BACKENDS.values())
    missing = [(scheme, pkg) for scheme, pkg in (("s3", "s3fs"), ("gs", "gcsfs")) if not importlib.util.find_spec(pkg)]
    if not missing:
        pytest.skip("s3fs and gcsfs are both installed here")
    for scheme, pkg in missing:
        with pytest.raises(ManifestError) as err:
            ShardLoader(f"{scheme}://bucket/data", "train", 4)
        assert "\n" not in str(err.value) and f"needs {pkg}, which is not installed: pip install {pkg}==" \
            f"{cloud[pkg]}" in str(err.value)
        assert distributed_main(["--tasks", "2", "--output", f"{scheme}://bucket/out", "--input", "x.jsonl"]) == 1
        assert capsys.readouterr().err.strip().splitlines() == [f"[data_prep] error: {err.value}".replace(
            "bucket/data", "bucket/out")]
