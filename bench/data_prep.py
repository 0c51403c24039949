"""Throughput of `python -m data_prep` next to the raw batch-encode speed of the same tokenizer.

Both sides see the same documents on the same machine: the built-in Wikipedia excerpt written
`--copies` times into a JSONL file (so there is enough work to spread over the cores). The raw figure
is `tokenizer(list_of_texts)` of the HF fast tokenizer with its own thread pool; the data_prep figure
is the whole run (reading, tokenizing in worker processes, packing, tar writing, hashing, manifest)
from the first input byte to the manifest, tokens counted as document tokens (EOS included). Each
side is timed --repeats times, alternating, and the best time is kept (the machine may be shared).

    python bench/data_prep.py [--copies 8] [--vocab-size 8192] [--workers 0] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_prep.__main__ import main as data_prep_main  # noqa: E402
from data_prep.builtin import BUILTIN_CORPORA  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--copies", type=int, default=8, help="times the built-in corpus is repeated")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--workers", type=int, default=0, help="data_prep workers (0: all cores)")
    p.add_argument("--shard-mb", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()

    from transformers import AutoTokenizer

    texts = [text for _title, text in BUILTIN_CORPORA["builtin:wiki"].documents()] * a.copies
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        common = ["--block-len", "2048", "--patch-size", "4", "--no-progress", "--val-fraction", "0.005"]
        data_prep_main(["--input", "builtin:wiki", "--train-tokenizer", "--vocab-size", str(a.vocab_size),
                        "--output", str(tmp / "tok"), "--workers", "1", *common])
        tok_dir = tmp / "tok" / "tokenizer"

        tok = AutoTokenizer.from_pretrained(str(tok_dir))
        raw_s = prep_s = float("inf")
        for i in range(a.repeats):
            start = time.perf_counter()
            ids = tok(texts, add_special_tokens=False)["input_ids"]
            raw_s = min(raw_s, time.perf_counter() - start)
            raw_tokens = sum(len(x) + 1 for x in ids)

            start = time.perf_counter()
            manifest = data_prep_main(["--input", str(corpus), "--tokenizer", str(tok_dir), "--output",
                                       str(tmp / f"out{i}"), "--workers", str(a.workers), "--shard-mb",
                                       str(a.shard_mb), *common])
            prep_s = min(prep_s, time.perf_counter() - start)
            prep_tokens = sum(s["document_tokens"] for s in manifest["splits"].values())

    assert prep_tokens == raw_tokens, (prep_tokens, raw_tokens)
    raw_tps, prep_tps = raw_tokens / raw_s, prep_tokens / prep_s
    mb = sum(len(t.encode()) for t in texts) / 1e6
    print(f"corpus: builtin:wiki x{a.copies} = {len(texts)} documents, {mb:.1f} MB, {raw_tokens} tokens "
          f"(vocab {len(tok)}), {len(os.sched_getaffinity(0))} cores, best of {a.repeats}")
    print(f"raw tokenizer(batch) encode : {raw_tps / 1e6:8.3f} M tokens/s  ({raw_s:.2f} s)")
    print(f"python -m data_prep (total) : {prep_tps / 1e6:8.3f} M tokens/s  ({prep_s:.2f} s)")
    print(f"ratio data_prep / raw encode: {prep_tps / raw_tps:8.2f}")


if __name__ == "__main__":
    main()
