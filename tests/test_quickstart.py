"""The quick start end to end (its --small setting): every stage runs and the report's numbers are sane."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quickstart_small_produces_a_sane_report(tmp_path):
    out = tmp_path / "qs"
    env = dict(os.environ, OMP_NUM_THREADS="2", WANDB_MODE="offline")
    proc = subprocess.run([sys.executable, "-m", "quickstart", "--small", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "finished in" in proc.stdout

    summary = json.loads((out / "quickstart.json").read_text())
    assert set(summary["seconds"]) >= {"data_prep", "train autoencoder", "train calm", "train baseline", "report"}
    for stage in ("calm", "baseline"):
        assert summary["samples"][stage].startswith("The history of the city")

    report = json.loads((out / "report" / "report.json").read_text())
    assert report["schema"] == "calm-report/1"
    rows = {(m["stage"], m["data"]): m for m in report["models"]}
    heldout = "data:validation"
    for stage in ("calm", "baseline"):
        row = rows[(stage, heldout)]
        assert 0 <= row["brierlm"]["brierlm"] < 100, row["brierlm"]
        assert all(-1 <= b <= 1 for b in row["brierlm"]["brier_n"])
        assert row["brierlm"]["positions"] > 0
        assert row["train_flops"] > 0 and row["inference_flops_per_token"] > 0 and row["params"] > 0
    # A few minutes of CPU training is enough for the baseline's Brier-1..4 to be positive; the
    # tiny CALM's Brier-3/4 are still ~0 at this scale, so its BrierLM may floor at 0.
    assert rows[("baseline", heldout)]["brierlm"]["brierlm"] > 0
    # CALM's backbone runs once per K tokens: less inference compute than the same-size baseline.
    assert (rows[("calm", heldout)]["inference_flops_per_token"]
            < rows[("baseline", heldout)]["inference_flops_per_token"])
    # The baseline was given CALM's training FLOPs (within one optimizer step).
    calm_flops, base_flops = rows[("calm", heldout)]["train_flops"], rows[("baseline", heldout)]["train_flops"]
    assert abs(base_flops - calm_flops) / calm_flops < 0.1

    ae = rows[("autoencoder", heldout)]["reconstruction"]
    assert 0.5 < ae["accuracy"] <= 1 and 0.5 < ae["accuracy_mean"] <= 1
    assert ae["robustness"][0]["accuracy"] >= ae["robustness"][-1]["accuracy"]

    markdown = (out / "report" / "report.md").read_text()
    assert "BrierLM" in markdown and "frontier.png" in markdown
    for plot in ("frontier.png", "brier_n.png", "training_curves.png", "ae_robustness.png"):
        assert (out / "report" / plot).stat().st_size > 1000
    for run in ("ae", "calm", "baseline"):
        assert (out / run / "export" / "model.safetensors").exists()
        assert (out / run / "checkpoints" / "latest").exists()
        assert list((out / run / "wandb").rglob("offline-run-*"))
