"""Fault suite, data_prep: damaged compressed inputs are counted as bad files (not a traceback), a
very long document is tokenized in bounded memory to the same ids, and Ctrl-C stops with one line
and leaves a run that the same command finishes."""

from __future__ import annotations

import gzip
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from data_prep import shards, tokenizer
from data_prep.sources import DataError
from tests.data_prep.test_pipeline import make_texts, prep, write_jsonl
from tests.faults.conftest import REPO, _env

pytestmark = pytest.mark.faults


def _gzipped_jsonl(texts) -> bytes:
    return gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in texts).encode())


DAMAGED = {
    "truncated_gzip": lambda raw: raw[: len(raw) // 2],
    "corrupt_gzip_stream": lambda raw: raw[:20] + bytes(b ^ 0x5A for b in raw[20:200]) + raw[200:],
    "not_gzip_at_all": lambda raw: b"plain text that only calls itself .gz\n",
}


@pytest.mark.parametrize("fault", list(DAMAGED))
def test_damaged_compressed_file_is_counted_as_bad(tmp_path, capsys, fault):
    good = write_jsonl(tmp_path / "good.jsonl", make_texts(12, seed=1))
    damaged = tmp_path / "damaged.jsonl.gz"
    damaged.write_bytes(DAMAGED[fault](_gzipped_jsonl(make_texts(400, seed=2))))
    m = prep([good, damaged], tmp_path / "out")
    assert m["bad_input"]["counts"]["corrupt_file"] == 1 and m["bad_input"]["total"] == 1
    assert f"skipped (corrupt_file) {damaged}: truncated or corrupt" in capsys.readouterr().err
    documents = m["splits"]["train"]["documents"] + m["splits"]["validation"]["documents"]
    assert documents >= 12  # the good file whole, and what the damaged one held before its damage
    with pytest.raises(DataError, match=f"{damaged}: truncated or corrupt .*--fail-fast"):
        prep([good, damaged], tmp_path / "fail_fast", "--fail-fast")


def test_long_documents_are_cut_only_where_the_ids_stay_the_same(tiny_data_dir, monkeypatch):
    from tokenizers import Tokenizer

    monkeypatch.setattr(tokenizer, "PIECE_CHARS", 2000)
    spec = shards.PackSpec(output="", tokenizer_file=str(tiny_data_dir / "tokenizer" / "tokenizer.json"),
                           eos_token_id=0, block_len=64, dtype="uint16", seed=0, val_fraction=0.0)
    texts = [" ".join(make_texts(60, seed=3)), "short one", "a tail.\n\nNext  paragraph, 42 times: " * 300]
    whole = Tokenizer.from_file(spec.tokenizer_file).encode_batch(texts, add_special_tokens=False)
    plain_cuts = []
    assert [list(ids) for ids in shards._encode(spec, texts, plain_cuts)] == [e.ids for e in whole]
    assert plain_cuts == []
    blob = "x" * 9000  # no word gap anywhere: cut plainly, and said so
    parts = list(tokenizer.pieces(blob, 2000, plain_cuts=plain_cuts))
    assert "".join(parts) == blob and max(map(len, parts)) <= 2000 and plain_cuts == [2000, 4000, 6000, 8000]


RSS = """
import resource, sys
from data_prep.__main__ import main
peaks = []
for name in sys.argv[1:]:
    main(["--input", name, "--tokenizer", sys.argv[1].rsplit("/", 1)[0] + "/tokenizer", "--block-len", "2048",
          "--workers", "1", "--no-progress", "--output", name + ".out"])
    peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
print(peaks[1] - peaks[0])
"""


@pytest.mark.slow
def test_a_very_long_document_is_tokenized_in_bounded_memory(tiny_data_dir, tmp_path):
    """The audit's 50 MB document peaked at 10.9 GB (~200x); 8 MB here must stay under 25x."""
    import shutil

    shutil.copytree(tiny_data_dir / "tokenizer", tmp_path / "tokenizer")
    rng = np.random.default_rng(0)
    words = np.array("the of and to in a is was for on that with as by at from his her an were".split())
    long_text = " ".join(rng.choice(words, size=2_000_000))
    size = len(long_text)
    (tmp_path / "small.jsonl").write_text(json.dumps({"text": "a small document"}) + "\n")
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": long_text}) + "\n")
    proc = subprocess.run([sys.executable, "-c", RSS, str(tmp_path / "small.jsonl"), str(tmp_path / "long.jsonl")],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    extra = int(proc.stdout.split()[-1])
    assert extra < 25 * size, f"{extra / 2**20:.0f} MiB more for a {size / 2**20:.0f} MB document"


@pytest.mark.slow
def test_ctrl_c_stops_data_prep_with_one_line_and_the_same_command_finishes(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", make_texts(3000, seed=6))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data_prep", "--input", str(src), "--train-tokenizer", "--vocab-size", "320",
           "--block-len", "32", "--shard-mb", "0.004", "--workers", "2", "--no-progress", "--output", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # a terminal's Ctrl-C reaches the whole process group
    deadline = time.monotonic() + 120
    while not (out / ".parts" / "chunk-000003.json").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    import os

    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert "[data_prep] interrupted (Ctrl-C); finished shards are kept" in err
    assert not (out / "manifest.json").exists(), "finished before Ctrl-C; make the corpus larger"
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 and "finished chunk(s) reused" in done.stderr, done.stderr[-3000:]
