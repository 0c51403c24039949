"""Fault suite, bad input to `python -m pretrain`: damaged data directories, NaN losses, checkpoints
that cannot be resumed. Each is refused with exit code 2 (3 for NaN) and one line naming the file,
field or value, before step 1 (or, for NaN, with the last good state checkpointed).

All cases run through the real entry point, in-process in one worker (`cli_worker.py`), because
start-up dominates their cost.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.conftest import REPO, _env, train_argv

pytestmark = pytest.mark.faults
WORKER = Path(__file__).with_name("cli_worker.py")


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _damaged_data(tiny_data_dir: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (a copy of the data with one fault, the message that must name it)."""
    def copy(name: str) -> Path:
        return Path(shutil.copytree(tiny_data_dir, root / name))

    manifest = json.loads((tiny_data_dir / "manifest.json").read_text())
    train = [s["path"] for s in manifest["splits"]["train"]["shards"]]
    val = manifest["splits"]["validation"]["shards"][0]["path"]
    cases = {}
    d = copy("tokenizer_replaced")
    (d / "tokenizer" / "tokenizer.json").write_text((d / "tokenizer" / "tokenizer.json").read_text() + " ")
    cases["tokenizer_replaced"] = d, "differ from the ones recorded in the manifest"
    d = copy("validation_shard_corrupt")
    _flip_byte(d / val)
    cases["validation_shard_corrupt"] = d, f"shard {d / val} is corrupted"
    d = copy("train_shard_corrupt")
    _flip_byte(d / train[-1])
    cases["train_shard_corrupt"] = d, f"shard {d / train[-1]} is corrupted"
    d = copy("train_shard_truncated")
    (d / train[1]).write_bytes((d / train[1]).read_bytes()[:5000])
    cases["train_shard_truncated"] = d, f"shard {d / train[1]} is truncated"
    d = copy("train_shard_missing")
    (d / train[2]).unlink()
    cases["train_shard_missing"] = d, f"shard {d / train[2]} listed in the manifest is missing"
    d = copy("manifest_missing")
    (d / "manifest.json").unlink()
    cases["manifest_missing"] = d, "manifest.json not found: prepare the data first"
    d = copy("manifest_not_json")
    (d / "manifest.json").write_text('{"format": ')
    cases["manifest_not_json"] = d, "manifest.json is not valid JSON"
    d = copy("manifest_counts_edited")
    edited = json.loads((d / "manifest.json").read_text())
    edited["splits"]["train"]["samples"] += 64
    (d / "manifest.json").write_text(json.dumps(edited))
    cases["manifest_counts_edited"] = d, "splits.train.samples is"
    return cases


def _damaged_autoencoder(directory: Path) -> Path:
    """An autoencoder export (untrained, tiny) whose weights file was cut short."""
    from pretrain.stages import build_model

    build_model("autoencoder", dict(vocab_size=512, hidden_size=32, intermediate_size=64, latent_size=16,
                                    patch_size=4), device="cpu").save_pretrained(directory)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    return directory


def _cases(tiny_data_dir: Path, tmp: Path) -> tuple[list[dict], dict[str, tuple[int, str]]]:
    """(worker cases in order, name -> (exit code, message))."""
    runs, cases, want = tmp / "runs", [], {}

    def case(name, code, message, data=tiny_data_dir, run=None, extra=(), before=()):
        run = run or runs / name
        # eval_every=500, the default: a bad validation shard must not wait for the first validation
        cases.append({"name": name, "argv": [*train_argv(data, run, "eval_every=500"), *extra], "before": list(before)})
        want[name] = code, message

    for name, (data, message) in _damaged_data(tiny_data_dir, tmp / "data").items():
        case(name, 2, message, data=data)
    case("validation_split_missing", 2, "no split 'nosuch'", extra=["data.val_split=nosuch"])
    calm = ["--stage", "calm", "--config", "calm-tiny", f"ae_path={_damaged_autoencoder(tmp / 'ae')}",
            "model.latent_size=16", "model.num_target_samples=8"]
    case("autoencoder_weights_damaged", 2, "model.safetensors is damaged", extra=calm)
    nan = ["optim.lr=1e30", "optim.grad_clip=0"]
    case("nan_policy_skip_gives_up", 3, "nan_policy=skip gave up: steps 2-4 all had a non-finite loss",
         extra=[*nan, "nan_policy=skip", "nan_skip_limit=3", "export=true"])
    case("nan_policy_stop", 3, "non-finite loss or gradient norm at step 2; saved the last good state", extra=nan)
    stopped = runs / "nan_policy_stop"
    case("resume_other_model", 2, "was trained with model.head_dim=8, model.hidden_size=32", run=stopped,
         extra=["model.hidden_size=64"])
    case("resume_other_seed", 2, "cannot resume", run=stopped, extra=["seed=7"])
    case("no_resume_over_checkpoints", 2, "--no-resume but", run=stopped, extra=["--no-resume"])
    case("no_intact_checkpoint", 2, "no intact checkpoint to resume from", run=stopped,
         before=[["delete", str(stopped / "checkpoints" / "step_00000001" / "checkpoint.json")]])
    case("resume_without_checkpoint", 2, "--resume: no checkpoint in", extra=["--resume"])
    return cases, want


@pytest.fixture(scope="module")
def outcomes(tiny_data_dir, tmp_path_factory) -> tuple[dict[str, dict], dict[str, tuple[int, str]], Path]:
    tmp = tmp_path_factory.mktemp("bad_input")
    cases, want = _cases(tiny_data_dir, tmp)
    (tmp / "cases.json").write_text(json.dumps(cases))
    proc = subprocess.run([sys.executable, str(WORKER), str(tmp / "cases.json"), str(tmp / "results.jsonl")], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {r["name"]: r for r in map(json.loads, (tmp / "results.jsonl").read_text().splitlines())}
    return results, want, tmp / "runs"


NAMES = ["tokenizer_replaced", "validation_shard_corrupt", "train_shard_corrupt", "train_shard_truncated",
         "train_shard_missing", "manifest_missing", "manifest_not_json", "manifest_counts_edited",
         "validation_split_missing", "autoencoder_weights_damaged", "nan_policy_skip_gives_up", "nan_policy_stop", "resume_other_model",
         "resume_other_seed", "no_resume_over_checkpoints", "no_intact_checkpoint", "resume_without_checkpoint"]


@pytest.mark.parametrize("name", NAMES)
def test_refused_with_one_line_and_its_exit_code(outcomes, name):
    results, want, runs = outcomes
    result, (code, message) = results[name], want[name]
    assert result["traceback"] is None, result["traceback"]
    assert result["code"] == code, result
    errors = [line for line in result["stderr"].splitlines() if line.startswith("error")]
    assert len(errors) == 1 and message in errors[0], result["stderr"][-2000:]
    if code == 2 and not name.startswith(("resume", "no_")):
        assert not (runs / name / "checkpoints").exists()  # refused before any step


def test_nan_runs_keep_the_last_good_state_and_write_no_export(outcomes):
    _, _, runs = outcomes
    assert (runs / "nan_policy_skip_gives_up" / "checkpoints" / "latest").read_text() == "step_00000004"
    assert not (runs / "nan_policy_skip_gives_up" / "export").exists()
    assert (runs / "nan_policy_stop" / "checkpoints" / "latest").read_text() == "step_00000001"
