"""Samples/s of the training loader: local shards, shards via a local HTTP server (cold and warm cache),
and a two-source weighted mixture (its HTTP source from an empty cache and from a filled one).

The data is the tests' tiny set made larger (`--max-docs` of the built-in corpus, block 512); each
case reads `--batches` batches of `--batch` samples through `ShardLoader` / `MixtureLoader` in one
process, best of `--repeats`. "http cold" starts from an empty cache (every shard fetched, verified
and cached, with prefetching); "http warm" reuses the filled cache (shards verified again once per
process). The server is `tests.http_server.StaticServer` on 127.0.0.1.

    python -m bench.loader_throughput [--batches 400] [--batch 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from itertools import islice
from pathlib import Path


def _rate(make, batches: int, batch: int, repeats: int, before=None) -> float:
    best = float("inf")
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        for _ in islice(iter(make()), batches):
            pass
        best = min(best, time.perf_counter() - start)
    return batches * batch / best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-docs", type=int, default=64)
    args = p.parse_args(argv)

    from data_prep.__main__ import main as prep
    from data_prep import remote
    from pretrain.data import ShardLoader
    from pretrain.mixture import MixtureLoader
    from tests.http_server import StaticServer

    work = Path(tempfile.mkdtemp(prefix="calm-loader-bench-"))
    os.environ["CALM_DATA_CACHE"] = str(work / "cache")
    data = work / "www" / "data"
    prep(["--input", "builtin:wiki", "--max-docs", str(args.max_docs), "--train-tokenizer", "--vocab-size", "512",
          "--block-len", "512", "--val-fraction", "0.1", "--shard-mb", "0.5", "--workers", "1", "--no-progress",
          "--output", str(data)])
    n, b, r = args.batches, args.batch, args.repeats
    results = {"local": _rate(lambda: ShardLoader(data, "train", b, seed=1), n, b, r)}
    with StaticServer(work / "www") as url:
        def cold():
            remote._MIRRORS.clear()
            shutil.rmtree(work / "cache", ignore_errors=True)

        results["http, cold cache"] = _rate(lambda: ShardLoader(f"{url}/data", "train", b, seed=1), n, b, r, cold)
        results["http, warm cache"] = _rate(lambda: ShardLoader(f"{url}/data", "train", b, seed=1), n, b, r)
        mix = [(str(data), 0.7), (f"{url}/data", 0.3)]
        results["mixture local 0.7 + http 0.3 (cold)"] = _rate(lambda: MixtureLoader(mix, "train", b, seed=1), n, b, r,
                                                               cold)
        results["mixture local 0.7 + http 0.3 (warm)"] = _rate(lambda: MixtureLoader(mix, "train", b, seed=1), n, b, r)
    for name, rate in results.items():
        print(f"{name:40s} {rate:10.0f} samples/s  ({rate / results['local']:.2f}x local)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
