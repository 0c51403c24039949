"""data_prep end to end on small inputs: formats, determinism, token counts, resume, settings checks."""

import gzip
import json
import os

import numpy as np
import pytest

from data_prep import shards
from data_prep.__main__ import main
from data_prep.sources import DataError
from pretrain.data import ShardLoader, load_tokenizer

WORDS = "the of and to in a is was for on that with as by at from his her an were are which this be".split()


def make_texts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(20, 200)))) + f" doc{i}." for i in range(n)]


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def prep(inputs, out, *extra, workers=1):
    args = ["--input", *map(str, inputs), "--output", str(out), "--train-tokenizer", "--vocab-size", "320",
            "--block-len", "32", "--patch-size", "4", "--val-fraction", "0.2", "--shard-mb", "0.002",
            "--workers", str(workers), "--no-progress", *extra]
    return main(args)


def shard_bytes(out):
    return {p.relative_to(out).as_posix(): p.read_bytes()
            for p in sorted(out.rglob("*")) if p.is_file() and p.parent.name in ("train", "validation", "tokenizer")}


def test_determinism_across_runs_and_worker_counts(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", make_texts(60))
    m1 = prep([src], tmp_path / "one", workers=1)
    m2 = prep([src], tmp_path / "two", workers=2)
    assert len(m1["splits"]["train"]["shards"]) > 2
    first, second = shard_bytes(tmp_path / "one"), shard_bytes(tmp_path / "two")
    assert first.keys() == second.keys() and first == second
    assert m1["splits"] == m2["splits"] and m1["tokenizer"] == m2["tokenizer"]


def test_manifest_counts_match_direct_tokenization(tmp_path):
    texts = make_texts(40, seed=1)
    out = tmp_path / "out"
    m = prep([write_jsonl(tmp_path / "a.jsonl", texts)], out, "--shard-mb", "100")
    tok = load_tokenizer(out)
    eos = tok.eos_token_id
    assert m["dtype"] == "uint16" and m["tokenizer"]["vocab_size"] == len(tok) == 320
    assert tok.pad_token_id is not None and tok.pad_token_id != eos
    for split in ("train", "validation"):
        docs = [t for i, t in enumerate(texts) if shards.doc_split(0, i, 0.2) == split]
        stream = [i for t in docs for i in [*tok(t, add_special_tokens=False)["input_ids"], eos]]
        s = m["splits"][split]
        assert s["documents"] == len(docs) > 0
        assert s["document_tokens"] == len(stream)
        assert s["tokens"] == s["samples"] * 32 == sum(sh["tokens"] for sh in s["shards"])
        assert s["tokens"] + s["dropped_tokens"] == len(stream) and s["dropped_tokens"] < 32
        loader = ShardLoader(out, split, batch_size=1, shuffle=False, epochs=1)
        assert np.concatenate([b[0].numpy() for b in loader]).tolist() == stream[: s["tokens"]]


def test_all_input_formats(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = make_texts(12, seed=2)
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    write_jsonl(d / "a.jsonl", texts[0:2], field="body")
    with gzip.open(d / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"body": t}) + "\n" for t in texts[2:4]))
    (d / "c.json").write_text(json.dumps([{"body": t} for t in texts[4:6]]))
    (d / "sub" / "d.txt").write_text(texts[6])
    pq.write_table(pa.table({"body": texts[7:9]}), d / "e.parquet")
    hf = tmp_path / "hf"
    datasets.Dataset.from_dict({"body": texts[9:12]}).save_to_disk(str(hf))
    m = prep([d, hf], tmp_path / "out", "--text-field", "body")
    assert [s["documents"] for s in m["sources"]] == [2, 2, 2, 2, 1, 3]
    assert all(len(s["sha256"]) == 64 and s["bytes"] > 0 for s in m["sources"][:5])
    assert m["splits"]["train"]["documents"] + m["splits"]["validation"]["documents"] == 12
    assert m["bad_input"]["total"] == 0
    assert "--text-field body" in m["command"]


def test_txt_paragraph_mode(tmp_path):
    (tmp_path / "p.txt").write_text("first paragraph.\n\nsecond one.\n\n\nthird.")
    m = prep([tmp_path / "p.txt"], tmp_path / "out", "--txt-mode", "paragraph", "--val-fraction", "0")
    assert m["splits"]["train"]["documents"] == 3


def test_builtin_wiki_is_clean():
    from data_prep.builtin import BUILTIN_CORPORA

    docs = [text for _, (_title, text) in zip(range(5), BUILTIN_CORPORA["builtin:wiki"].documents())]
    assert all(len(t) > 1000 for t in docs)
    assert not any("''" in t or "==" in t or "#REDIRECT" in t.upper() for t in docs)


@pytest.mark.faults
def test_resume_after_kill_skips_finished_shards(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", make_texts(60, seed=3))
    ref, out = tmp_path / "ref", tmp_path / "out"
    prep([src], ref)
    m = prep([src], out)
    shard_list = m["splits"]["train"]["shards"]
    assert len(shard_list) >= 3
    # Simulate a kill during the last chunk: its record and shards never landed, a temp file did.
    last = int(shard_list[-1]["path"].split("-")[1][:6])
    for split in ("train", "validation"):
        (out / split / shards.shard_name(last)).unlink(missing_ok=True)
    (out / ".parts" / f"chunk-{last:06d}.json").unlink()
    (out / "train" / f".{shards.shard_name(last)}.tmp999").write_bytes(b"half a shard")
    # the killed run may also have been writing a chunk's record or the manifest (seen in CI)
    (out / ".parts" / f".chunk-{last:06d}.json.tmp999").write_bytes(b"{")
    (out / "manifest.json").unlink()
    (out / ".manifest.json.tmp999").write_bytes(b"{")
    kept = out / shard_list[0]["path"]
    before = kept.stat().st_mtime_ns, kept.stat().st_ino
    prep([src], out)
    assert (kept.stat().st_mtime_ns, kept.stat().st_ino) == before  # finished shard not rewritten
    assert not list(out.rglob(".*.tmp*"))
    assert shard_bytes(out) == shard_bytes(ref)


@pytest.mark.faults
def test_corrupted_finished_shard_is_rebuilt_on_rerun(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", make_texts(30, seed=4))
    out = tmp_path / "out"
    m = prep([src], out)
    victim = out / m["splits"]["train"]["shards"][0]["path"]
    good = victim.read_bytes()
    victim.write_bytes(good[:1000])
    prep([src], out)
    assert victim.read_bytes() == good


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "shard-000000.tar"

    def boom(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        shards.write_atomic(target, b"x" * 100)
    assert not target.exists()


@pytest.mark.faults
def test_changed_settings_are_refused_then_overwritten(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", make_texts(10))
    out = tmp_path / "out"
    prep([src], out)
    with pytest.raises(DataError, match="other settings"):
        prep([src], out, "--seed", "1")
    m = prep([src], out, "--seed", "1", "--overwrite")
    assert m["seed"] == 1


@pytest.mark.parametrize("flags, message", [
    (["--block-len", "30"], "multiple of --patch-size"),
    (["--val-fraction", "1.5"], "val-fraction"),
    (["--vocab-size", "257"], "cannot hold the 256 byte symbols plus EOS and PAD"),
])
@pytest.mark.faults
def test_bad_flags(tmp_path, flags, message):
    src = write_jsonl(tmp_path / "a.jsonl", make_texts(3))
    with pytest.raises(DataError, match=message):
        prep([src], tmp_path / "out", *flags)


def test_existing_tokenizer_dir(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", make_texts(20))
    first = prep([src], tmp_path / "first")
    m = main(["--input", str(src), "--output", str(tmp_path / "second"), "--tokenizer", str(tmp_path / "first" / "tokenizer"),
              "--block-len", "32", "--patch-size", "4", "--val-fraction", "0.2", "--shard-mb", "0.002",
              "--workers", "1", "--no-progress"])
    assert m["tokenizer"]["vocab_size"] == first["tokenizer"]["vocab_size"]
    assert m["splits"] == first["splits"]


@pytest.mark.faults
def test_resume_after_real_sigkill(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    src = write_jsonl(tmp_path / "a.jsonl", make_texts(600, seed=6))
    out, ref = tmp_path / "out", tmp_path / "ref"
    args = ["--input", str(src), "--train-tokenizer", "--vocab-size", "320", "--block-len", "32", "--patch-size", "4",
            "--val-fraction", "0.2", "--shard-mb", "0.004", "--workers", "1", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "data_prep", *args, "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (out / ".parts" / "chunk-000005.json").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "finished before the kill; make the corpus larger"
    done_before = len(list((out / ".parts").glob("chunk-*.json")))
    main([*args, "--output", str(out)])
    main([*args, "--output", str(ref)])
    assert done_before >= 6
    assert shard_bytes(out) == shard_bytes(ref)
    assert not list(out.rglob(".*.tmp*"))


def test_streaming_local_dataset_dict(tmp_path):
    import datasets

    texts = make_texts(5, seed=7)
    d = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts}),
                              "test": datasets.Dataset.from_dict({"text": texts[:1]})})
    d.save_to_disk(str(tmp_path / "hf"))
    m = prep([tmp_path / "hf"], tmp_path / "out", "--streaming", "--val-fraction", "0")
    assert m["sources"][0]["documents"] == 5
    m = prep([tmp_path / "hf"], tmp_path / "out2", "--hf-split", "test", "--val-fraction", "0")
    assert m["sources"][0]["documents"] == 1


def test_large_vocabulary_gives_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": 1, **{f"w{i}": i for i in range(2, 70_000)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="[UNK]").save_pretrained(
        str(tmp_path / "tok"))
    ids = [69_999, 65_536, 3, 40_000] * 10
    src = write_jsonl(tmp_path / "a.jsonl", [" ".join(f"w{i}" for i in ids)])
    m = main(["--input", str(src), "--output", str(tmp_path / "out"), "--tokenizer", str(tmp_path / "tok"),
              "--block-len", "8", "--patch-size", "4", "--val-fraction", "0", "--workers", "1", "--no-progress"])
    assert m["dtype"] == "uint32" and m["tokenizer"]["pad_token_id"] == m["tokenizer"]["eos_token_id"] == 1
    got = next(iter(ShardLoader(tmp_path / "out", "train", 5, shuffle=False)))
    assert got.flatten().tolist() == ids
