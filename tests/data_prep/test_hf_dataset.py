"""The README's Hugging Face dataset command, offline: a local copy of a hub repository in the hub's
layout (a dataset card declaring configs, parquet files per config, as `git clone` of the hub
repository gives) goes through the same `datasets.load_dataset(name, --hf-config, split, streaming)`
call as a hub name, so --hf-config, --streaming and --text-field are run for real."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.__main__ import main
from data_prep.builtin import BUILTIN_CORPORA
from data_prep.sources import DataError
from tests.readme import command

REPO = Path(__file__).resolve().parents[2]
# fineweb-edu's dataset card declares its configs like this (abridged).
CARD = """---
license: odc-by
configs:
- config_name: default
  data_files:
  - split: train
    path: data/*/*
- config_name: sample-10BT
  data_files:
  - split: train
    path: sample/10BT/*
---
# FineWeb-Edu (a local stand-in with the hub repository's layout)
"""


@pytest.fixture(scope="module")
def hub_copy(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """{tmp}/HuggingFaceFW/fineweb-edu with two configs of Wikipedia articles; rows per config."""
    texts = [text for _, text in itertools.islice(BUILTIN_CORPORA["builtin:wiki"].documents(), 60)]
    repo = tmp_path_factory.mktemp("hub") / "HuggingFaceFW" / "fineweb-edu"
    layout = {"data/CC-MAIN-2024-10/train-00000-of-00001.parquet": texts[:24],
              "sample/10BT/000_00000.parquet": texts[24:44], "sample/10BT/001_00000.parquet": texts[44:]}
    for name, rows in layout.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        table = pa.table({"text": rows, "id": [f"<urn:{name}:{i}>" for i in range(len(rows))],
                          "url": [f"https://example.org/{i}" for i in range(len(rows))]})
        pq.write_table(table, repo / name)
    (repo / "README.md").write_text(CARD)
    return repo, {"default": 24, "sample-10BT": 36}


@pytest.mark.slow
def test_readme_hub_command_on_a_local_copy(hub_copy, tmp_path):
    repo, rows = hub_copy
    words = command("bash run.sh prep --input HuggingFaceFW/fineweb-edu")
    # The hub name becomes the local copy; everything else is the README's command.
    args = [str(repo) if w == "HuggingFaceFW/fineweb-edu" else w for w in words]
    args = [str(tmp_path / "fineweb") if w == "data/fineweb" else w for w in args]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([*args, "--no-progress"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "fineweb" / "manifest.json").read_text())
    [source] = manifest["sources"]
    assert (source["kind"], source["hf_config"], source["hf_split"], source["streaming"]) == (
        "hf_repo", "sample-10BT", "train", True)
    assert source["documents"] == rows["sample-10BT"]  # the sample's two files, not the default config
    assert sorted(source["files"]) == ["README.md", "data/CC-MAIN-2024-10/train-00000-of-00001.parquet",
                                       "sample/10BT/000_00000.parquet", "sample/10BT/001_00000.parquet"]
    assert manifest["tokenizer"]["name"] == "byte-level-bpe-32000" and manifest["block_len"] == 2048
    splits = manifest["splits"]
    assert splits["train"]["documents"] + splits["validation"]["documents"] == rows["sample-10BT"]
    assert splits["train"]["samples"] > 0


def test_hf_config_and_text_field_choose_what_is_read(hub_copy, tmp_path):
    repo, rows = hub_copy
    common = ["--input", str(repo), "--train-tokenizer", "--vocab-size", "300", "--block-len", "64",
              "--val-fraction", "0", "--workers", "1", "--no-progress"]
    manifest = main([*common, "--hf-config", "default", "--text-field", "url", "--output", str(tmp_path / "a")])
    assert manifest["sources"][0]["documents"] == rows["default"]
    assert (manifest["sources"][0]["hf_config"], manifest["sources"][0]["streaming"]) == ("default", False)
    # 24 short URLs instead of 24 articles: a few blocks of 64 tokens, not hundreds.
    assert manifest["splits"]["train"]["documents"] == rows["default"]
    assert 0 < manifest["splits"]["train"]["samples"] < 10
    with pytest.raises(DataError, match="no text field 'body'"):
        main([*common, "--hf-config", "sample-10BT", "--text-field", "body", "--fail-fast", "--output",
              str(tmp_path / "b")])
    with pytest.raises(DataError, match="cannot load Hugging Face dataset .*config 'no-such-config'"):
        main([*common, "--hf-config", "no-such-config", "--output", str(tmp_path / "c")])
