"""`python -m evaluation` on real tiny exported runs: documents, shards, WikiText-103, two ranks."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evaluation import documents as docs
from evaluation.__main__ import main
from pretrain.brier.brier_stats import BrierAccumulator
from pretrain.brier.brierlm import baseline_brier_batched
from evaluation.reconstruction import reconstruction_eval
from evaluation.results import read_result

REPO = Path(__file__).resolve().parents[2]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext103_test_documents.jsonl"
TEXT = ("The river rises in the hills north of the town and flows south through farmland. "
        "In 1820 a mill was built on its bank; the mill burned down in 1871 and was never rebuilt. ")


@pytest.fixture(scope="module")
def doc_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": TEXT * n}) for n in (1, 3, 2)) + "\n")
    return path


def test_documents_reader_names_bad_lines(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*'text'"):
        docs.read_documents(bad)
    blocks = docs.split_blocks([list(range(10)), list(range(3))], context=4, multiple=2)
    assert [b.tolist() for b in blocks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [0, 1]]


def test_baseline_cli_matches_direct_estimate(tiny_runs, doc_file, tmp_path):
    out = tmp_path / "base.json"
    main(["--model", str(tiny_runs["baseline"]), "--data", str(doc_file), "--context", "48",
          "--batch-size", "2", "--seed", "3", "--out", str(out)])
    result = read_result(out)
    assert result["model"]["stage"] == "baseline" and result["model"]["params"] > 0
    assert result["data"]["documents"] == 3 and result["data"]["context"] == 48

    from transformers import AutoTokenizer

    from pretrain.stages import load_model

    export = tiny_runs["baseline"] / "export"
    model = load_model("baseline", str(export)).eval()
    blocks = docs.split_blocks(docs.tokenize_documents(AutoTokenizer.from_pretrained(export),
                                                        docs.read_documents(doc_file)), 48)
    assert result["data"]["tokens"] == sum(b.numel() for b in blocks)
    acc, gen = BrierAccumulator(), torch.Generator().manual_seed(3)
    for ids, lengths in docs.batches(blocks, 2):
        acc.add(baseline_brier_batched(model, ids, lengths, gen).estimates)
    expect = acc.summary()
    got = result["brierlm"]
    assert got["positions"] == expect["positions"] == sum(max(0, b.numel() - 4) for b in blocks)
    assert got["brier_n"] == pytest.approx(expect["brier_n"], abs=1e-9)
    assert got["brierlm"] == pytest.approx(expect["brierlm"], abs=1e-9)
    assert got["seed"] == 3 and got["forward_calls"] >= len(blocks) / 2


def test_calm_and_autoencoder_on_shards(tiny_runs, tiny_data_dir, tmp_path):
    main(["--model", str(tiny_runs["calm"]), str(tiny_runs["autoencoder"]), "--data", str(tiny_data_dir),
          "--split", "validation", "--context", "32", "--batch-size", "4", "--noise-stds", "0", "0.5", "4"])
    calm = read_result(tiny_runs["calm"] / "eval" / f"{tiny_data_dir.name}-ctx32.json")
    ae = read_result(tiny_runs["autoencoder"] / "eval" / f"{tiny_data_dir.name}-ctx32.json")
    assert calm["data"]["kind"] == "shards" and calm["model"]["patch_size"] == 4
    # 32-token blocks = 8 chunks; chunks 1..7 are predicted
    assert calm["brierlm"]["positions"] == calm["data"]["blocks"] * 7
    assert all(-1.0 <= b <= 2.0 for b in calm["brierlm"]["brier_n"])
    rec = ae["reconstruction"]
    assert rec["tokens"] == ae["data"]["tokens"]
    assert [p["noise_std"] for p in rec["robustness"]] == [0.0, 0.5, 4.0]
    assert rec["robustness"][0]["accuracy"] == rec["accuracy"]
    assert rec["robustness"][2]["accuracy"] < rec["accuracy_mean"]


def test_generation_speed_is_recorded_for_the_report(tiny_runs, tiny_data_dir, tmp_path):
    for stage in ("calm", "baseline"):
        out = tmp_path / f"{stage}.json"
        assert main(["--model", str(tiny_runs[stage]), "--data", str(tiny_data_dir), "--split", "validation",
                     "--context", "64", "--max-blocks", "2", "--gen-tokens", "16", "--gen-batch", "2",
                     "--out", str(out)]) == 0
        gen = read_result(out)["generation"]
        assert gen["batch"] == 2 and 0 < gen["tokens"] <= 32 and gen["tokens_per_second"] > 0
        # CALM's backbone reads one vector per K = 4 tokens (plus the prompt's pass); the baseline one per token.
        if stage == "calm":
            assert gen["backbone_calls_per_token"] <= 0.25 + 1 / (gen["tokens"] / 2)
        else:
            assert gen["backbone_calls_per_token"] == pytest.approx(1.0, abs=1 / 16 + 1e-9)


def test_reconstruction_counts_only_real_tokens(tiny_runs):
    from pretrain.stages import load_model

    ae = load_model("autoencoder", str(tiny_runs["autoencoder"] / "export")).eval()
    blocks = [torch.randint(0, 100, (n,), generator=torch.Generator().manual_seed(n)) for n in (16, 8, 4)]
    rec = reconstruction_eval(ae, docs.batches(blocks, 3), noise_stds=(0.0,))
    per_block = [float(ae.reconstruction_accuracy(b[None], sample=False)) * b.numel() for b in blocks]
    assert rec["tokens"] == 28
    assert rec["accuracy_mean"] == pytest.approx(sum(per_block) / 28)


@pytest.mark.skipif(not WIKITEXT.is_file(), reason="shared WikiText-103 test documents not present")
def test_baseline_on_wikitext_documents(tiny_runs, tmp_path):
    out = tmp_path / "wiki.json"
    main(["--model", str(tiny_runs["baseline"]), "--data", str(WIKITEXT), "--context", "128",
          "--max-blocks", "2", "--out", str(out)])
    result = read_result(out)
    assert result["data"]["documents"] == 62
    assert result["data"]["tokens"] == 256
    assert result["brierlm"]["positions"] == 2 * (128 - 4)


def test_two_ranks_all_reduce(tiny_runs, doc_file, tmp_path):
    """Brier-1 is exact (no sampling), so two gloo ranks must reproduce the single-process value."""
    single, double = tmp_path / "one.json", tmp_path / "two.json"
    args = ["--model", str(tiny_runs["baseline"]), "--data", str(doc_file), "--context", "32"]
    main([*args, "--out", str(single)])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    # In-process world-1 runs earlier in the session leave RANK/WORLD_SIZE/MASTER_* in os.environ.
    stale = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in stale} | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           port, "-m", "evaluation", *args, "--out", str(double)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = read_result(single)["brierlm"], read_result(double)["brierlm"]
    assert two["world_size"] == 2
    assert two["positions"] == one["positions"]
    assert two["brier_n"][0] == pytest.approx(one["brier_n"][0], abs=1e-9)


def test_cli_names_what_is_wrong(tiny_runs, tmp_path, capsys):
    assert main(["--model", str(tmp_path), "--data", "x.jsonl"]) == 2
    assert "neither an exported model" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert main(["--model", str(tiny_runs["baseline"]), "--data", str(bad), "--out", str(tmp_path / "o.json")]) == 2
    assert "bad.jsonl:1: not valid JSON" in capsys.readouterr().err


def test_safe_defaults_context_positions_and_tokenizer(tiny_runs, tiny_data_dir, doc_file, tmp_path, capsys):
    """The context defaults to the trained block length; a context past the positions, a list with one bad
    model, or shards of another tokenizer are refused before anything is evaluated or written."""
    out = tmp_path / "r.json"
    assert main(["--model", str(tiny_runs["baseline"]), "--data", str(doc_file), "--max-blocks", "2",
                 "--out", str(out)]) == 0
    data = json.loads(out.read_text())["data"]
    assert (data["context"], data["context_source"], data["protocol"]) == (64, "trained", "documents")
    assert len(data["sha256"]) == 64 and len(data["tokenizer_sha256"]) == 64 and not data["beyond_positions"]

    capsys.readouterr()
    assert main(["--model", str(tiny_runs["baseline"]), "--data", str(doc_file), "--context", "1024"]) == 2
    assert "past the 512 tokens" in capsys.readouterr().err
    assert main(["--model", str(tiny_runs["baseline"]), "--data", str(doc_file), "--context", "1024", "--max-blocks",
                 "1", "--allow-long-context", "--out", str(tmp_path / "long.json")]) == 0
    assert json.loads((tmp_path / "long.json").read_text())["data"]["beyond_positions"] is True

    runs = tmp_path / "runs"
    good = shutil.copytree(tiny_runs["baseline"], runs / "good", ignore=shutil.ignore_patterns("eval"))
    assert main(["--model", str(good), str(runs / "missing"), "--data", str(doc_file)]) == 2
    assert "missing: neither an exported model" in capsys.readouterr().err
    assert not (good / "eval").exists()  # nothing written for the good entry either

    other = shutil.copytree(tiny_data_dir, tmp_path / "other_data")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = "f" * 64  # same vocabulary size, another tokenizer
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert main(["--model", str(good), "--data", str(other)]) == 2
    assert "trained on shards of another tokenizer" in capsys.readouterr().err


def test_stream_protocol_is_recorded(tiny_runs, doc_file, tmp_path):
    out = tmp_path / "s.json"
    assert main(["--model", str(tiny_runs["baseline"]), "--data", str(doc_file), "--protocol", "stream",
                 "--context", "32", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["data"]["protocol"] == "stream" and result["data"]["tokens"] == 32 * result["data"]["blocks"]


def test_shards_served_over_http_score_as_the_local_ones(tiny_runs, tiny_data_dir, tmp_path, monkeypatch):
    """Evaluation reads a data directory given as a URL through the verified shard cache (127.0.0.1)."""
    from tests.http_server import StaticServer

    monkeypatch.setenv("CALM_DATA_CACHE", str(tmp_path / "cache"))
    args = ["--model", str(tiny_runs["baseline"]), "--split", "validation", "--max-blocks", "4"]
    assert main([*args, "--data", str(tiny_data_dir), "--out", str(tmp_path / "local.json")]) == 0
    with StaticServer(tiny_data_dir) as url:
        assert main([*args, "--data", url, "--out", str(tmp_path / "remote.json")]) == 0
    local, remote = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("local", "remote"))
    assert remote["brierlm"]["brier_n"] == local["brierlm"]["brier_n"]
    assert remote["data"]["sha256"] == local["data"]["sha256"] and remote["data"]["source"] == url
