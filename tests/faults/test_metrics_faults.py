"""Fault suite, logs after interruptions: metrics.jsonl keeps every step once across any number of
resumes (a line cut short by a kill is dropped), and the W&B run is continued, not duplicated."""

from __future__ import annotations

import json

import pytest

from pretrain import metrics
from pretrain.config import WandbConfig

pytestmark = pytest.mark.faults


class FakeWandb:
    """Records what `MetricsLogger` sends to W&B: the run ids it asks for and every logged step."""

    def __init__(self):
        self.inits, self.steps = [], []

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class Run:
            id = kwargs["id"] or "run-1"

            def log(self, values, step):
                fake.steps.append(step)

            def finish(self):
                pass

        return Run()


def _log(run_dir, steps, resume_step=0, run_id=None, validate_at=()):
    logger = metrics.MetricsLogger(run_dir, True, WandbConfig(mode="offline"), {}, run_id, resume_step=resume_step)
    for step in steps:
        logger.log({"split": "train", "step": step, "loss": 1.0 / step})
        if step in validate_at:
            logger.log({"split": "validation", "step": step, "loss": 2.0})
    run_id = logger.run_id
    logger.close()
    return run_id


def test_resumes_log_every_step_once_and_continue_the_same_wandb_run(tmp_path, monkeypatch):
    import wandb

    fake = FakeWandb()
    monkeypatch.setattr(wandb, "init", fake.init)
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb"))  # the logger only sets them where unset
    run_id = _log(tmp_path, range(1, 8), validate_at=(4,))     # killed after step 7; checkpoint at 4
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"split": "train", "st')                      # the line a kill -9 cut short
    assert _log(tmp_path, range(5, 10), resume_step=4, run_id=run_id) == run_id   # stopped at 9, saved
    _log(tmp_path, range(10, 13), resume_step=9, run_id=run_id, validate_at=(12,))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["split"], r["step"]) for r in rows] == (
        [("train", s) for s in range(1, 5)] + [("validation", 4)] + [("train", s) for s in range(5, 13)]
        + [("validation", 12)])
    assert [i["id"] for i in fake.inits] == [None, run_id, run_id]
    assert all(i["resume"] == "allow" for i in fake.inits)
    # steps 5-7 went to W&B before the kill and are not sent again; 4 and 12 carry a validation too
    assert fake.steps == [1, 2, 3, 4, 4, 5, 6, 7, 8, 9, 10, 11, 12, 12]


def test_a_fresh_run_over_an_old_log_starts_it_over(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"split": "train", "step": 3}\n')
    metrics.MetricsLogger(tmp_path, True, None, resume_step=0).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""
