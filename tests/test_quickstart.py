"""The quick start end to end (its --small setting): every stage runs and the report's numbers are sane."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext103_test_documents.jsonl"
"""The paper's test documents on the build machines (a user makes them with python -m data_prep.wikitext)."""


@pytest.fixture(scope="module")
def quickstart_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "qs"
    env = dict(os.environ, OMP_NUM_THREADS="2", WANDB_MODE="offline")
    wikitext = ["--wikitext", str(WIKITEXT)] if WIKITEXT.is_file() else []
    proc = subprocess.run([sys.executable, "-m", "quickstart", "--small", "--out", str(out), *wikitext], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "finished in" in proc.stdout
    return out


@pytest.mark.slow
def test_quickstart_small_produces_a_sane_report(quickstart_out):
    out = quickstart_out

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
        assert all(-1 <= b <= 1 for b in row["brierlm"]["brier_n"])
        assert row["brierlm"]["positions"] > 0
        assert row["train_flops"] > 0 and row["inference_flops_per_token"] > 0 and row["params"] > 0
    # A few CPU minutes are enough for both models to reproduce whole 4-token chunks from context, so
    # every Brier-n and hence BrierLM is positive; CALM's rarer hits are counted over 8 samples per position.
    for stage in ("calm", "baseline"):
        brier = rows[(stage, heldout)]["brierlm"]
        assert 0 < brier["brierlm"] < 100, brier
        assert brier["brierlm"] > 3 * brier["brierlm_se"], brier
    assert rows[("calm", heldout)]["brierlm"]["samples_per_position"] == 8
    if WIKITEXT.is_file():
        assert {("calm", WIKITEXT.name), ("baseline", WIKITEXT.name)} <= set(rows)
    # Sampling speed was timed (the report's gen tokens/s); CALM's backbone runs once per chunk.
    for stage in ("calm", "baseline"):
        assert rows[(stage, heldout)]["tokens_per_second"] > 0
    # CALM's backbone runs once per K tokens: less inference compute than the same-size baseline.
    assert (rows[("calm", heldout)]["inference_flops_per_token"]
            < rows[("baseline", heldout)]["inference_flops_per_token"])
    # The baseline was given CALM's training FLOPs (within one optimizer step).
    calm_flops, base_flops = rows[("calm", heldout)]["train_flops"], rows[("baseline", heldout)]["train_flops"]
    assert abs(base_flops - calm_flops) / calm_flops < 0.1

    ae = rows[("autoencoder", heldout)]["reconstruction"]
    # 99.66% after the --small run's 200 steps (the full quick start's 400 steps reach >= 99.5%)
    assert 0.99 <= ae["accuracy"] <= 1 and 0.99 <= ae["accuracy_mean"] <= 1
    assert ae["robustness"][0]["accuracy"] >= ae["robustness"][-1]["accuracy"]

    markdown = (out / "report" / "report.md").read_text()
    assert "BrierLM" in markdown and "frontier_1.png" in markdown  # one frontier per evaluation set
    for plot in ("frontier_1.png", "brier_n.png", "training_curves.png", "ae_robustness.png"):
        assert (out / "report" / plot).stat().st_size > 1000
    for run in ("ae", "calm", "baseline"):
        assert (out / run / "export" / "model.safetensors").exists()
        assert (out / run / "checkpoints" / "latest").exists()
        assert list((out / run / "wandb").rglob("offline-run-*"))


@pytest.mark.slow
def test_trained_calm_generates_k_tokens_per_backbone_step_and_stops_at_eos(quickstart_out):
    from evaluation.export_dir import load_generator
    from pretrain.models.generation import calm_generate

    model, kind = load_generator(quickstart_out / "calm" / "export")
    assert kind == "calm"
    k = model.patch_size
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22, 23, 24, 25, 26, 27]]  # whole chunks, no padding
    # eos_token_id=-1 never occurs: every row runs to max_new_tokens
    free = calm_generate(model, prompts, max_new_tokens=8 * k, temperature=1.0, seed=1, eos_token_id=-1,
                         pad_token_id=0)
    assert free.lengths.tolist() == [8 * k, 8 * k]
    assert free.steps == 8 and free.backbone_calls == 8  # prefill + 7 chunks fed back: K tokens per step
    # Declare the token a row generates most as EOS: generating that prompt alone with the same seed
    # draws the same chunks up to it (in a batch, a finished row would change the others' draws), so
    # the row must end right after its first occurrence, padded afterwards.
    for prompt in prompts:
        alone = calm_generate(model, [prompt], max_new_tokens=8 * k, temperature=1.0, seed=1, eos_token_id=-1,
                              pad_token_id=0)
        seq = alone.sequences[0].tolist()
        eos = int(torch.mode(alone.sequences[0]).values)
        end = seq.index(eos) + 1
        stopped = calm_generate(model, [prompt], max_new_tokens=8 * k, temperature=1.0, seed=1,
                                eos_token_id=eos, pad_token_id=0)
        assert stopped.lengths.tolist() == [end]
        assert stopped.sequences[0, :end].tolist() == seq[:end]
        assert (stopped.sequences[0, end:] == 0).all()
        assert stopped.steps == (end + k - 1) // k  # no chunk sampled after the one holding EOS
