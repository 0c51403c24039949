"""Each kind of bad input is skipped with a message naming file and line, counted in the manifest,
and stops the run under --fail-fast."""

import json
import subprocess
import sys

import pytest

from data_prep.sources import DataError
from tests.data_prep.test_pipeline import make_texts, prep, write_jsonl

pytestmark = pytest.mark.faults
GOOD = make_texts(8, seed=5)


def _jsonl_with(tmp_path, bad_line: bytes, at: int = 3):
    lines = [json.dumps({"text": t}).encode() for t in GOOD]
    lines.insert(at - 1, bad_line)
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


CASES = {
    "malformed_json": (lambda tmp: _jsonl_with(tmp, b'{"text": "unterminated'), ":3: malformed JSON"),
    "non_utf8": (lambda tmp: _jsonl_with(tmp, b'{"text": "caf\xe9"}'), ":3: invalid UTF-8 byte 0xe9"),
    "empty_document": (lambda tmp: _jsonl_with(tmp, b'{"text": "  \\n "}'), ":3: empty document"),
    "missing_text_field": (lambda tmp: _jsonl_with(tmp, b'{"body": "x"}'), ":3: no text field 'text'"),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_bad_line_is_skipped_counted_and_named(tmp_path, capsys, kind):
    make, message = CASES[kind]
    path = make(tmp_path)
    m = prep([path], tmp_path / "out")
    counts = m["bad_input"]["counts"]
    assert counts[kind] == 1 and m["bad_input"]["total"] == 1
    assert m["bad_input"]["examples"][kind][0].startswith(f"{path}{message}")
    assert f"{path}{message}" in capsys.readouterr().err
    assert m["splits"]["train"]["documents"] + m["splits"]["validation"]["documents"] == len(GOOD)


@pytest.mark.parametrize("kind", list(CASES))
def test_fail_fast_stops_at_bad_line(tmp_path, kind):
    make, message = CASES[kind]
    path = make(tmp_path)
    with pytest.raises(DataError, match=f"{path}{message}".replace(".", r"\.")):
        prep([path], tmp_path / "out", "--fail-fast")


def test_unknown_format_and_missing_path(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", GOOD)
    (tmp_path / "notes.docx").write_bytes(b"PK\x03\x04")
    missing = tmp_path / "nope.jsonl"
    m = prep([good, tmp_path / "notes.docx", missing], tmp_path / "out")
    counts = m["bad_input"]["counts"]
    assert counts["unknown_format"] == 1 and counts["missing_path"] == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'notes.docx'}: unknown format" in err
    assert f"{missing}: no such file or directory" in err
    with pytest.raises(DataError, match="no such file"):
        prep([good, missing], tmp_path / "out2", "--fail-fast")


def test_non_utf8_txt_names_the_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("line one\nline two caf\xe9\n".encode("latin-1"))
    good = write_jsonl(tmp_path / "good.jsonl", GOOD)
    m = prep([good, path], tmp_path / "out")
    assert m["bad_input"]["examples"]["non_utf8"][0].startswith(f"{path}:2: invalid UTF-8 byte 0xe9")


def test_parquet_without_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    good = write_jsonl(tmp_path / "good.jsonl", GOOD)
    m = prep([good, tmp_path / "t.parquet"], tmp_path / "out")
    assert m["bad_input"]["counts"]["missing_text_field"] == 1


def test_nothing_usable_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(DataError, match="no documents"):
        prep([tmp_path / "empty.jsonl"], tmp_path / "out")


def test_cli_reports_error_and_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "data_prep", "--input", str(tmp_path / "missing.jsonl"),
                        "--output", str(tmp_path / "out"), "--train-tokenizer", "--fail-fast"],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert f"error: {tmp_path / 'missing.jsonl'}: no such file or directory" in r.stderr


def test_unreachable_hub_dataset_is_a_clear_error(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network wait on machines without one
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="cannot load Hugging Face dataset 'someone/not-a-dataset'"):
        prep(["someone/not-a-dataset"], tmp_path / "out", "--streaming")
