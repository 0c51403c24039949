"""The comparison report built from real tiny runs evaluated by `python -m evaluation`."""

import json
import shutil

import pytest

from evaluation.__main__ import main as evaluate
from evaluation.report import build_report, main
from evaluation.results import read_result

TEXT = "A short history of the harbour, its ships and the storms that closed it twice in one winter. "


@pytest.fixture(scope="module")
def evaluated(tiny_runs, tmp_path_factory):
    """Copies of the tiny runs (other tests add their own results to the originals), evaluated once."""
    root = tmp_path_factory.mktemp("report_runs")
    runs = {stage: shutil.copytree(path, root / path.name, ignore=shutil.ignore_patterns("eval"))
            for stage, path in tiny_runs.items()}
    docs = root / "notes.jsonl"
    docs.write_text("\n".join(json.dumps({"text": TEXT * n}) for n in (2, 4)) + "\n")
    evaluate(["--model", *(str(runs[s]) for s in ("baseline", "calm", "autoencoder")),
              "--data", str(docs), "--context", "32", "--noise-stds", "0", "1"])
    return runs


def test_report_numbers_and_files(evaluated, tmp_path):
    out = tmp_path / "report"
    main([str(evaluated[s]) for s in ("baseline", "calm", "autoencoder")] + ["--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in report["models"]}
    assert set(rows) == {"baseline-tiny", "calm-tiny", "ae-tiny"}
    for name, stage in (("baseline-tiny", "baseline"), ("calm-tiny", "calm"), ("ae-tiny", "autoencoder")):
        run = evaluated[stage]
        result = read_result(run / "eval" / "notes-ctx32.json")
        last_train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                      if json.loads(line)["split"] == "train"][-1]
        row = rows[name]
        assert row["stage"] == stage
        assert row["train_flops"] == pytest.approx(last_train["train_flops"])
        assert row["params"] == result["model"]["params"]
        assert row["brierlm"] == result["brierlm"]
        assert row["reconstruction"] == result["reconstruction"]
    curves = {r["name"]: r for r in report["runs"]}
    assert len(curves["calm-tiny"]["train"]["loss"]) == 12 and len(curves["calm-tiny"]["validation"]["loss"]) == 3
    assert curves["baseline-tiny"]["train"]["flops"][-1] == pytest.approx(rows["baseline-tiny"]["train_flops"])
    assert report["plots"] == ["frontier_1.png", "brier_n.png", "training_curves.png", "ae_robustness.png"]
    for name in report["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    b = rows["baseline-tiny"]["brierlm"]
    assert "| baseline-tiny | baseline | 1 |" in md
    assert f"{b['brierlm']:.3f} ± {b['brierlm_se']:.3f}" in md
    assert f"{rows['ae-tiny']['reconstruction']['accuracy']:.5f}" in md
    assert "![BrierLM vs training FLOPs: notes.jsonl, context 32](frontier_1.png)" in md


def test_report_keeps_evaluation_sets_apart_and_flags_stale_results(evaluated, tmp_path):
    """One frontier per evaluation set and context; a result older than its model is flagged and left
    out of the plots; the autoencoder's curves compare cross-entropy with cross-entropy."""
    import os
    import time

    runs = {stage: shutil.copytree(path, tmp_path / path.name) for stage, path in evaluated.items()}
    metrics = runs["autoencoder"] / "metrics.jsonl"  # as training logs it: ce beside loss (= K·ce + w·KL)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    metrics.write_text("".join(json.dumps({**r, "ce": r["loss"] / 4}) + "\n" for r in records))
    docs = tmp_path / "notes.jsonl"
    docs.write_text(json.dumps({"text": TEXT * 3}) + "\n")
    evaluate(["--model", str(runs["baseline"]), str(runs["calm"]), "--data", str(docs), "--context", "16"])
    report = build_report([str(runs[s]) for s in ("baseline", "calm", "autoencoder")], tmp_path / "out")
    assert report["plots"][:2] == ["frontier_1.png", "frontier_2.png"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "notes.jsonl, context 16" in md and "notes.jsonl, context 32" in md
    ae_curves = next(r for r in report["runs"] if r["stage"] == "autoencoder")
    assert ae_curves["quantity"] == "ce" and ae_curves["train"]["loss"][0] == records[0]["loss"] / 4
    model_file = runs["calm"] / "export" / "model.safetensors"
    later = time.time() + 60
    os.utime(model_file, (later, later))  # the model changed after it was evaluated
    report = build_report([str(runs[s]) for s in ("baseline", "calm")], tmp_path / "stale")
    flags = {(r["name"], r["context"]): r["flag"] for r in report["models"]}
    assert flags[("calm-tiny", 16)] == "older than the model" and flags[("baseline-tiny", 16)] is None
    assert "left out of the plots: older than the model" in (tmp_path / "stale" / "report.md").read_text()


def test_report_accepts_result_files_and_names_bad_ones(evaluated, tmp_path):
    result = evaluated["baseline"] / "eval" / "notes-ctx32.json"
    report = build_report([str(result)], tmp_path / "one")
    assert [r["name"] for r in report["models"]] == ["baseline-tiny"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "calm-eval/1", "model": {"name": "x"}, "data": {}}))
    with pytest.raises(ValueError, match=r"bad.json: missing key model.path"):
        build_report([str(bad)], tmp_path / "two")


def test_report_states_and_offers_both_flops_accountings(evaluated, tmp_path):
    """CALM's autoencoder training FLOPs: listed apart by default, charged to CALM with --with-ae-flops."""
    import shutil

    runs = {stage: tmp_path / evaluated[stage].name for stage in ("calm", "autoencoder")}
    for stage, run in runs.items():
        shutil.copytree(evaluated[stage], run)
    (runs["calm"] / "config.yaml").write_text(f"stage: calm\nae_path: {runs['autoencoder'] / 'export'}\n")
    spent = {stage: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                     if json.loads(line)["split"] == "train"][-1]["train_flops"] for stage, run in runs.items()}
    for flag, charged in (([], spent["calm"]), (["--with-ae-flops"], spent["calm"] + spent["autoencoder"])):
        out = tmp_path / f"report{len(flag)}"
        assert main([str(runs["calm"]), "--out", str(out), *flag]) == 0
        report = json.loads((out / "report.json").read_text())
        row = report["models"][0]
        assert row["ae_train_flops"] == pytest.approx(spent["autoencoder"])
        assert row["train_flops"] == pytest.approx(charged)
        assert report["calm_flops_include_autoencoder"] is bool(flag)
        assert ("INCLUDE its autoencoder" if flag else "NOT counted") in (out / "report.md").read_text()
