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
    assert report["plots"] == ["frontier.png", "brier_n.png", "training_curves.png", "ae_robustness.png"]
    for name in report["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    b = rows["baseline-tiny"]["brierlm"]
    assert f"| baseline-tiny | baseline | 1 |" in md
    assert f"{b['brierlm']:.3f} ± {b['brierlm_se']:.3f}" in md
    assert f"{rows['ae-tiny']['reconstruction']['accuracy']:.5f}" in md
    assert "![BrierLM vs training FLOPs](frontier.png)" in md


def test_report_accepts_result_files_and_names_bad_ones(evaluated, tmp_path):
    result = evaluated["baseline"] / "eval" / "notes-ctx32.json"
    report = build_report([str(result)], tmp_path / "one")
    assert [r["name"] for r in report["models"]] == ["baseline-tiny"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "calm-eval/1", "model": {"name": "x"}, "data": {}}))
    with pytest.raises(ValueError, match=r"bad.json: missing key model.path"):
        build_report([str(bad)], tmp_path / "two")
