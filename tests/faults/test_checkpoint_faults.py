"""Fault suite, checkpoints: each file an exact resume needs, damaged in turn, makes `select` fall
back to the checkpoint before with a warning naming the file; none intact is refused; a checkpoint
holding a pickle that would run code is refused without running it. In-process (no training), on
copies of the suite's reference run."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

from pretrain import checkpoint
from pretrain.config import load_config
from pretrain.distributed import World
from tests.faults.conftest import STEPS, copy_run

pytestmark = pytest.mark.faults
LATEST, PREVIOUS = f"step_{STEPS:08d}", f"step_{STEPS - 2:08d}"
WORLD = World(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def _select(run_dir):
    return checkpoint.select(load_config("baseline-tiny", [f"run_dir={run_dir}"]), WORLD, universal=False)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _same_size_edit(path):
    data = bytearray(path.read_bytes())
    data[-2] ^= 1
    path.write_bytes(bytes(data))


DAMAGE = {
    "optim_states_truncated": ("zero_pp_rank_0_mp_rank_00_optim_states.pt", _truncate, "bytes, the manifest says"),
    "model_states_truncated": ("zero_pp_rank_0_mp_rank_00_model_states.pt", _truncate, "bytes, the manifest says"),
    "rank_file_truncated": ("rank_00000.pt", _truncate, "bytes, the manifest says"),
    "rank_file_missing": ("rank_00000.pt", lambda p: p.unlink(), "rank_00000.pt: missing"),
    "trainer_state_truncated": ("trainer_state.json", _truncate, "bytes, the manifest says"),
    "config_edited": ("config.yaml", _same_size_edit, "sha256 differs from the manifest's"),
    "save_cut_short": ("checkpoint.json", lambda p: p.unlink(), "no checkpoint.json (the save was cut short"),
    "manifest_damaged": ("checkpoint.json", _truncate, "checkpoint.json is unreadable"),
}


@pytest.mark.parametrize("fault", list(DAMAGE))
def test_damaged_latest_falls_back_with_a_warning(reference_run, tmp_path, capsys, fault):
    name, damage, message = DAMAGE[fault]
    run_dir = copy_run(reference_run, tmp_path / "run")
    damage(run_dir / "checkpoints" / LATEST / name)
    assert _select(run_dir) == PREVIOUS
    warning = capsys.readouterr().err.strip()
    assert warning.startswith(f"warning: checkpoint {LATEST} is unusable: ") and message in warning, warning
    assert warning.endswith(f"resuming from {PREVIOUS}, the newest intact checkpoint")


def test_no_intact_checkpoint_is_refused_naming_each(reference_run, tmp_path):
    run_dir = copy_run(reference_run, tmp_path / "run")
    for tag in (LATEST, PREVIOUS):
        (run_dir / "checkpoints" / tag / "rank_00000.pt").unlink()
    with pytest.raises(checkpoint.ResumeError, match=f"no intact checkpoint .*{LATEST} is unusable: rank_00000.pt: "
                                                      f"missing; checkpoint {PREVIOUS} is unusable"):
        _select(run_dir)


def test_latest_naming_a_missing_directory_falls_back(reference_run, tmp_path, capsys):
    run_dir = copy_run(reference_run, tmp_path / "run")
    shutil.rmtree(run_dir / "checkpoints" / LATEST)
    assert _select(run_dir) == PREVIOUS
    assert "does not exist" in capsys.readouterr().err


def test_an_emptied_latest_file_falls_back_to_the_newest_intact_checkpoint(reference_run, tmp_path, capsys):
    run_dir = copy_run(reference_run, tmp_path / "run")
    (run_dir / "checkpoints" / "latest").write_text("")
    assert checkpoint.has_checkpoints(run_dir)  # so the entry point resumes instead of starting over
    assert _select(run_dir) == LATEST
    assert "latest is missing or empty; resuming from" in capsys.readouterr().err


def test_latest_set_back_by_hand_is_a_rewind_not_a_fault(reference_run, tmp_path, capsys):
    run_dir = copy_run(reference_run, tmp_path / "run")
    (run_dir / "checkpoints" / "latest").write_text(PREVIOUS)
    assert _select(run_dir) == PREVIOUS and capsys.readouterr().err == ""


class _RunsCode:
    """What an attacker with write access to a run directory would plant: unpickling it runs code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (shutil.copyfile, (__file__, self.marker))


def test_a_pickle_that_runs_code_is_refused_unrun(reference_run, tmp_path, capsys):
    run_dir = copy_run(reference_run, tmp_path / "run")
    marker = tmp_path / "code_ran"
    ckpt = run_dir / "checkpoints" / LATEST
    state = torch.load(ckpt / "rank_00000.pt", weights_only=True)
    torch.save({**state, "payload": _RunsCode(str(marker))}, ckpt / "rank_00000.pt")
    # Re-seal, as an attacker able to write the file could: the checksums alone would not catch it.
    manifest = json.loads((ckpt / "checkpoint.json").read_text())
    from data_prep.sources import sha256_file

    manifest["files"]["rank_00000.pt"] = {"bytes": (ckpt / "rank_00000.pt").stat().st_size,
                                          "sha256": sha256_file(ckpt / "rank_00000.pt")}
    (ckpt / "checkpoint.json").write_text(json.dumps(manifest))
    assert _select(run_dir) == PREVIOUS
    assert "loading it would unpickle shutil.copyfile" in capsys.readouterr().err
    with pytest.raises(checkpoint.ResumeError, match="refused"):
        checkpoint.safe_load(ckpt / "rank_00000.pt")
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # the plain loader would have run it; weights_only does not
        torch.load(ckpt / "rank_00000.pt", weights_only=True)


def test_deepspeeds_own_files_load_without_unpickling_code(reference_run):
    ckpt = reference_run / "checkpoints" / LATEST
    model = checkpoint.safe_load(ckpt / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    optim = checkpoint.safe_load(ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert model["step"] == STEPS and "optimizer_state_dict" in optim
