"""`python -m pretrain`'s checks before training: `--dry-run` on the README's paper-size commands
(config, parameter count and DeepSpeed JSON checked on a CPU machine without data, memory for the
weights, or an engine) and `--no-resume` refusing to overwrite checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from pretrain.__main__ import main
from pretrain.config import load_config
from pretrain.distributed import free_port
from pretrain.models import AutoencoderConfig
from pretrain.models.flops import param_count
from tests.readme import command

REPO = Path(__file__).resolve().parents[2]
README_TRAIN = {"autoencoder": "bash run.sh train --stage autoencoder --config ae",
                "calm": "bash run.sh train --stage calm --config calm-m",
                "baseline": "bash run.sh train --stage baseline --config transformer-s"}


def _parse(stdout: str) -> tuple[int, int, dict]:
    """(trained parameters, frozen parameters, DeepSpeed JSON) from the dry run's output."""
    model_line = next(line for line in stdout.splitlines() if line.startswith("# model: "))
    counts = [int(word.replace(",", "")) for word in model_line.split() if word.replace(",", "").isdigit()]
    ds_json = stdout[stdout.index("{", stdout.index("# DeepSpeed config")):]
    return counts[0], (counts[1] if len(counts) > 1 else 0), json.loads(ds_json)


@pytest.mark.parametrize("stage", sorted(README_TRAIN))
def test_readme_paper_size_commands_pass_a_dry_run(stage, tmp_path, monkeypatch, capsys):
    words = command(README_TRAIN[stage])
    args = words[words.index("train") + 1:]
    preset = args[args.index("--config") + 1]
    monkeypatch.chdir(tmp_path)  # the README's relative run_dir/data.path/ae_path resolve here
    # The presets' batch sizes are the paper's at 8 ranks (their comments): check them there.
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "0")
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr()
    trained, frozen, ds = _parse(out.out)
    config = load_config(preset)
    assert trained == param_count(config.model, stage)
    assert frozen == (75_831_552 if stage == "calm" else 0)  # the paper's autoencoder, as ae_path is missing
    assert ("holds no exported autoencoder" in out.err) == (stage == "calm")
    blocks = {"autoencoder": 256, "calm": 256, "baseline": 1024}[stage]
    assert ds["train_batch_size"] == blocks == config.micro_batch_size * config.grad_accum_steps * 8
    assert ds["zero_optimization"]["stage"] == 3 and ds["gradient_clipping"] == 1.0
    run_dir = next(arg for arg in args if arg.startswith("run_dir="))
    assert f"run_dir: {run_dir.split('=', 1)[1]}" in out.out
    assert list(tmp_path.iterdir()) == []  # nothing read, nothing written


def test_dry_run_rejects_what_training_would(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["--stage", "calm", "--config", "calm-m", "micro_batch_size=0", "--dry-run"]) == 2
    assert "micro_batch_size must be >= 1" in capsys.readouterr().err
    AutoencoderConfig(vocab_size=128256, latent_size=64).save_pretrained(tmp_path / "ae")
    assert main(["--stage", "calm", "--config", "calm-m", f"ae_path={tmp_path / 'ae'}", "--dry-run"]) == 2
    assert "latent_size: autoencoder 64 vs calm 128" in capsys.readouterr().err
    fixed = json.loads((REPO / "ds_configs" / "zero3.json").read_text()) | {"train_batch_size": 256}
    (tmp_path / "fixed.json").write_text(json.dumps(fixed))
    assert main(["--stage", "calm", "--config", "calm-m", f"ds_config={tmp_path / 'fixed.json'}", "--dry-run"]) == 2
    assert "train_batch_size=256 disagrees with the training config (32)" in capsys.readouterr().err


def test_no_resume_refuses_to_overwrite_checkpoints(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_00000020\n")
    assert main(["--stage", "baseline", "--config", "baseline-tiny", f"run_dir={tmp_path}", "--no-resume"]) == 2
    err = capsys.readouterr().err
    assert "--no-resume but" in err and "holds step_00000020" in err


@pytest.mark.slow
def test_dry_run_through_run_sh_takes_the_launchers_world_size(tmp_path):
    """NPROC=2: torchrun starts two ranks, the batch is filled for world 2 and printed once."""
    words = command(README_TRAIN["calm"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", NPROC="2", MASTER_PORT=str(free_port()))
    proc = subprocess.run([*words, f"run_dir={tmp_path / 'calm-m'}", "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("# model: CALM, 371,731,584 trained parameters") == 1
    assert _parse(proc.stdout)[2]["train_batch_size"] == 2 * 4 * 8
    assert "world size 2" in proc.stdout
    assert not (tmp_path / "calm-m").exists()
