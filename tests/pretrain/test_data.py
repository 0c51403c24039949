"""ShardLoader: exact resume (1 and 2 ranks, across epochs, across world sizes), coverage, corruption."""

import json
import shutil
from itertools import islice

import numpy as np
import pytest
import torch

from pretrain.data import ManifestError, ShardError, ShardLoader, check_compatible, load_tokenizer, read_manifest


def take(loader_iter, n):
    return list(islice(loader_iter, n))


def rows(batch):
    return [tuple(r) for r in batch.tolist()]


def test_batches_shape_and_properties(tiny_data_dir):
    loader = ShardLoader(tiny_data_dir, "train", batch_size=4)
    batch = next(iter(loader))
    assert batch.dtype == torch.long and batch.shape == (4, loader.block_len) == (4, 64)
    vocab = loader.manifest["tokenizer"]["vocab_size"]
    assert vocab == 512 and loader.manifest["block_len"] == 64
    assert int(batch.max()) < vocab


@pytest.mark.parametrize("n_before", [3, 20])  # 20 crosses an epoch boundary with batch 256
def test_resume_equals_uninterrupted_single_rank(tiny_data_dir, n_before):
    m = 6
    full = take(iter(ShardLoader(tiny_data_dir, "train", batch_size=256, seed=3)), n_before + m)
    first = ShardLoader(tiny_data_dir, "train", batch_size=256, seed=3)
    it = iter(first)
    assert all(torch.equal(a, b) for a, b in zip(take(it, n_before), full))
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = ShardLoader(tiny_data_dir, "train", batch_size=256, seed=3)
    resumed.load_state_dict(state)
    after = take(iter(resumed), m)
    assert all(torch.equal(a, b) for a, b in zip(after, full[n_before:], strict=True))


def test_resume_equals_uninterrupted_two_ranks(tiny_data_dir):
    n, m, world = 4, 5, 2
    full = [take(iter(ShardLoader(tiny_data_dir, "train", 8, rank=r, world_size=world, seed=1)), n + m)
            for r in range(world)]
    states = []
    for r in range(world):
        loader = ShardLoader(tiny_data_dir, "train", 8, rank=r, world_size=world, seed=1)
        take(iter(loader), n)
        states.append(loader.state_dict())
    for r in range(world):
        resumed = ShardLoader(tiny_data_dir, "train", 8, rank=r, world_size=world, seed=1)
        resumed.load_state_dict(states[r])
        assert all(torch.equal(a, b) for a, b in zip(take(iter(resumed), m), full[r][n:], strict=True))
    # ranks read disjoint samples that together form the single-rank global batches
    single = take(iter(ShardLoader(tiny_data_dir, "train", 16, seed=1)), n + m)
    for step in range(n + m):
        assert torch.equal(torch.cat([full[0][step], full[1][step]]), single[step])


def test_resume_at_other_world_size_continues_at_same_sample(tiny_data_dir):
    single = take(iter(ShardLoader(tiny_data_dir, "train", 16, seed=2)), 7)
    first = ShardLoader(tiny_data_dir, "train", 16, seed=2)
    take(iter(first), 3)
    state = first.state_dict()
    resumed = []
    for r in range(2):
        loader = ShardLoader(tiny_data_dir, "train", 8, rank=r, world_size=2, seed=2)
        loader.load_state_dict(state)
        resumed.append(take(iter(loader), 4))
    for step in range(4):
        assert torch.equal(torch.cat([resumed[0][step], resumed[1][step]]), single[3 + step])


@pytest.mark.faults
def test_state_from_other_seed_or_split_is_refused(tiny_data_dir):
    state = ShardLoader(tiny_data_dir, "train", 4, seed=0).state_dict()
    with pytest.raises(ValueError, match="seed=0"):
        ShardLoader(tiny_data_dir, "train", 4, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="split='train'"):
        ShardLoader(tiny_data_dir, "validation", 4, seed=0).load_state_dict(state)


def test_one_epoch_covers_every_sample_once_across_ranks(tiny_data_dir):
    loaders = [ShardLoader(tiny_data_dir, "validation", 7, rank=r, world_size=2, epochs=1, drop_last=False)
               for r in range(2)]
    batches = [list(loader) for loader in loaders]
    assert [len(b) for b in batches] == [len(loader) for loader in loaders]
    seen = [row for per_rank in batches for batch in per_rank for row in rows(batch)]
    everything = rows(torch.cat(list(ShardLoader(tiny_data_dir, "validation", 1, shuffle=False, epochs=1))))
    assert sorted(seen) == sorted(everything) and len(seen) == loaders[0].num_samples
    assert all(loader.epoch == 1 and list(loader) == [] for loader in loaders)


def test_epochs_reshuffle_deterministically(tiny_data_dir):
    loader = ShardLoader(tiny_data_dir, "validation", 8, seed=5, epochs=2)
    per_epoch = len(loader)
    batches = list(loader)
    assert len(batches) == 2 * per_epoch
    assert not torch.equal(batches[0], batches[per_epoch])
    again = list(ShardLoader(tiny_data_dir, "validation", 8, seed=5, epochs=2))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))


@pytest.fixture
def data_copy(tiny_data_dir, tmp_path):
    return shutil.copytree(tiny_data_dir, tmp_path / "data")


@pytest.mark.faults
def test_corrupted_shard_is_named(data_copy):
    shard = data_copy / read_manifest(data_copy)["splits"]["validation"]["shards"][0]["path"]
    raw = bytearray(shard.read_bytes())
    raw[2000] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=f"shard {shard} is corrupted"):
        list(ShardLoader(data_copy, "validation", 4, epochs=1))


@pytest.mark.faults
def test_truncated_shard_is_named(data_copy):
    shard = data_copy / read_manifest(data_copy)["splits"]["train"]["shards"][1]["path"]
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(ShardError, match=f"shard {shard} is truncated"):
        ShardLoader(data_copy, "train", 4)


@pytest.mark.faults
def test_truncated_tar_detected_without_manifest_sizes(data_copy):
    manifest = read_manifest(data_copy)
    entry = manifest["splits"]["validation"]["shards"][0]
    shard = data_copy / entry["path"]
    shard.write_bytes(shard.read_bytes()[:-3000])
    del entry["bytes"]
    (data_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=f"shard {shard}"):
        list(ShardLoader(data_copy, "validation", 4, epochs=1, verify=False))


@pytest.mark.faults
def test_missing_shard_and_manifest(data_copy, tmp_path):
    shard = data_copy / read_manifest(data_copy)["splits"]["train"]["shards"][0]["path"]
    shard.unlink()
    with pytest.raises(ShardError, match=f"shard {shard} listed in the manifest is missing"):
        ShardLoader(data_copy, "train", 4)
    with pytest.raises(ManifestError, match="manifest.json not found"):
        read_manifest(tmp_path / "nowhere")


def test_check_compatible(tiny_data_dir):
    manifest = read_manifest(tiny_data_dir)
    check_compatible(manifest, patch_size=4, vocab_size=512)
    check_compatible(manifest, patch_size=8)
    with pytest.raises(ManifestError, match="block_len 64 of the data is not a multiple of the model's patch size K=3"):
        check_compatible(manifest, patch_size=3)
    for vocab in (500, 1024):  # one rule everywhere: equal, neither smaller nor larger
        with pytest.raises(ManifestError, match=f"vocab_size {vocab} but the tokenizer .* has 512 tokens"):
            check_compatible(manifest, vocab_size=vocab)
    check_compatible(manifest, tokenizer_sha256=manifest["tokenizer"]["sha256"])
    with pytest.raises(ManifestError, match="trained on shards of another tokenizer"):
        check_compatible(manifest, tokenizer_sha256="0" * 64)


@pytest.mark.faults
def test_load_tokenizer_round_trip_and_tamper(tiny_data_dir, data_copy):
    tok = load_tokenizer(tiny_data_dir)
    manifest = read_manifest(tiny_data_dir)
    assert len(tok) == manifest["tokenizer"]["vocab_size"]
    assert tok.eos_token_id == manifest["tokenizer"]["eos_token_id"]
    tokens = torch.cat(list(ShardLoader(tiny_data_dir, "train", 64, shuffle=False, epochs=1, drop_last=False)))
    docs = manifest["splits"]["train"]["documents"]
    assert docs - len(manifest["splits"]["train"]["shards"]) <= int((tokens == tok.eos_token_id).sum()) <= docs
    text = "The history of the alphabet"
    assert tok.decode(tok(text)["input_ids"]) == text
    (data_copy / "tokenizer" / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ManifestError, match="sha256 mismatch"):
        load_tokenizer(data_copy)


@pytest.mark.faults
def test_too_small_split_for_global_batch(tiny_data_dir):
    with pytest.raises(ManifestError, match="fewer than one global batch"):
        ShardLoader(tiny_data_dir, "validation", 10_000)


def test_shards_read_with_webdataset(tiny_data_dir):
    import webdataset as wds

    entry = read_manifest(tiny_data_dir)["splits"]["validation"]["shards"][0]
    samples = list(wds.WebDataset(str(tiny_data_dir / entry["path"]), shardshuffle=False).decode())
    assert len(samples) == entry["samples"]
    first = next(iter(ShardLoader(tiny_data_dir, "validation", 1, shuffle=False)))
    assert samples[0]["npy"].dtype == np.uint16 and samples[0]["npy"].tolist() == first[0].tolist()


def test_few_open_memory_maps_give_same_batches(tiny_data_dir, monkeypatch):
    reference = list(ShardLoader(tiny_data_dir, "train", 32, seed=4, epochs=1))
    monkeypatch.setattr("pretrain.data.OPEN_SHARDS", 2)
    loader = ShardLoader(tiny_data_dir, "train", 32, seed=4, epochs=1)
    assert all(torch.equal(a, b) for a, b in zip(loader, reference, strict=True))
    assert sum(shard.map is not None for shard in loader._shards.values()) == 2
