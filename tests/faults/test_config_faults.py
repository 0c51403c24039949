"""Fault suite, bad configuration and flags: each is refused by `--dry-run` (so also before a real
run starts) with exit code 2 and one line naming the field and the value; nothing reaches torch."""

from __future__ import annotations

import pytest

from pretrain.__main__ import main as pretrain_main

pytestmark = pytest.mark.faults
BASE = ["--stage", "baseline", "--config", "baseline-tiny", "--dry-run"]

BAD = [
    ("optim.lr=-1", "optim.lr must be > 0, got -1.0"),
    ("optim.warmup_steps=-5", "optim.warmup_steps must be >= 0, got -5"),
    ("optim.beta2=1.5", "optim.beta2 must be in [0, 1), got 1.5"),
    ("optim.eps=0", "optim.eps must be > 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),
    ("max_steps=abc", "max_steps must be an integer, got 'abc'"),
    ("max_steps=0", "max_steps must be >= 1, got 0"),
    ("micro_batch_size=2.5", "micro_batch_size must be an integer, got 2.5"),
    ("save_every=-1", "save_every must be >= 0, got -1"),
    ("nan_skip_limit=0", "nan_skip_limit must be >= 1, got 0"),
    ("nan_policy=sometimes", "nan_policy must be stop or skip"),
    ("precision=fp16", "precision must be auto, fp32 or bf16"),
    ("export=maybe", "export must be true or false, got 'maybe'"),
    ("wandb.tags=x", "wandb.tags must be a list, got 'x'"),
    ("optim.learning_rate=1e-3", "unknown key(s) ['learning_rate'] in optim"),
    ("model.hidden_sise=64", "unknown model key(s) ['hidden_sise']"),
]


@pytest.mark.parametrize("override, message", BAD, ids=[o for o, _ in BAD])
def test_bad_value_is_named_before_anything_runs(capsys, override, message):
    assert pretrain_main([*BASE, override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_good_values_still_resolve(capsys):
    """Integral floats for integers (1e3), integers for floats, names that look like numbers."""
    assert pretrain_main([*BASE, "max_steps=1e3", "optim.lr=1", "run_dir=2024", "wandb.entity=7"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 1000\n" in out and "  lr: 1.0\n" in out and "run_dir: '2024'" in out


@pytest.mark.parametrize("flag, message", [
    (["--max-blocks", "-1"], "--max-blocks must be positive, got -1"),
    (["--max-blocks", "0"], "--max-blocks must be positive, got 0"),
])
def test_evaluation_flags_are_checked(capsys, flag, message):
    from evaluation.__main__ import parse_args

    with pytest.raises(SystemExit) as exit_:
        parse_args(["--model", "runs/x", "--data", "data/x", *flag])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
