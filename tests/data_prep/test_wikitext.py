"""The WikiText-103 test documents built from the dataset's rows: parquet, save_to_disk and text copies."""

import json
import os
import subprocess
import sys
from pathlib import Path


from data_prep.wikitext import articles, main

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data" / "wikitext103_test_documents.jsonl"
SYNTHETIC = [" = First = \n \n Some text . \n \n = = Section = = \n \n More . \n \n ",
             " = Second = \n \n Other text , with = signs = inside . \n \n "]


def _documents() -> list[str]:
    """The reference articles: the paper's file on machines that have it, else a small synthetic pair."""
    if SHARED.is_file():
        return [json.loads(line)["text"] for line in SHARED.read_text().splitlines()]
    return SYNTHETIC


def _rows(documents: list[str]) -> list[str]:
    """The dataset's rows for these articles: lines of the original text, a blank line as an empty row."""
    text = " \n" + "\n".join(documents)
    return ["" if line == " \n" else line for line in text.splitlines(keepends=True)]


def test_articles_are_cut_at_level_one_headings_only():
    documents = _documents()
    assert articles(_rows(documents)) == documents


def test_builds_from_parquet_save_to_disk_and_text_copies(tmp_path, capsys):
    import datasets

    documents = _documents()
    rows = _rows(documents)
    data = datasets.Dataset.from_dict({"text": rows})
    (tmp_path / "wikitext-103-v1").mkdir()
    data.to_parquet(str(tmp_path / "wikitext-103-v1" / "test-00000-of-00001.parquet"))
    data.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "wiki.test.tokens").write_text("".join(r if r else " \n" for r in rows))
    for local in ("wikitext-103-v1", "saved", "wiki.test.tokens"):
        out = tmp_path / f"{local}.jsonl"
        assert main(["--local", str(tmp_path / local), "--output", str(out)]) == 0
        assert [json.loads(line)["text"] for line in out.read_text().splitlines()] == documents, local
    assert f"{len(documents)} WikiText-103 test articles" in capsys.readouterr().out


def test_unreachable_hub_and_bad_paths_are_one_line_errors(tmp_path, capsys):
    # Offline from the start of the process (the datasets library reads these at import), with an empty
    # cache: what a machine without hub access sees.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "data_prep.wikitext", "--output", str(tmp_path / "out.jsonl")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and err[-1].startswith("error: cannot load Salesforce/wikitext") and "--local" in err[-1]
    assert "Traceback" not in proc.stderr
    assert main(["--local", str(tmp_path / "missing"), "--output", str(tmp_path / "out.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("no headings here\n")
    assert main(["--local", str(empty), "--output", str(tmp_path / "out.jsonl")]) == 2
    assert not (tmp_path / "out.jsonl").exists()
