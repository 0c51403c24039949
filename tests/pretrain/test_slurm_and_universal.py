"""The README's SLURM launch under a real SLURM, and its resume at another world size.

SLURM is the real thing (`tests.slurm_cluster`: munged, slurmctld and two slurmd on this machine):
the README's `LAUNCHER=slurm NPROC=1 bash run.sh train` runs in a `sbatch --nodes 2` job, run.sh's
slurm branch starts one torchrun per node through the real `srun`, with the rendezvous host read by
the real `scontrol`, and its losses must equal a plain 2-rank torchrun launch of the same run. The
SLURM tests skip, with the reason, where SLURM cannot run. The 2-rank torchrun run's checkpoint is
converted with DeepSpeed's ds_to_universal and resumed by one process, as the README's Resume
paragraph says (no SLURM needed). run.sh's own hostlist reader and its error paths are checked
without any srun being reached.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.distributed import free_port
from tests.readme import command
from tests.slurm_cluster import LocalSlurm, SlurmUnavailable

REPO = Path(__file__).resolve().parents[2]
TINY = ["--stage", "baseline", "--config", "baseline-tiny", "model.hidden_size=32", "model.intermediate_size=64",
        "model.max_position_embeddings=64", "micro_batch_size=4", "wandb.mode=disabled", "optim.warmup_steps=1",
        "optim.lr=3e-3", "max_steps=8", "save_every=4", "eval_every=0", "log_every=1", "export=false"]


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's or SLURM's variables, one thread per process."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_"))}
    return env | {"OMP_NUM_THREADS": "1"} | extra


def _train_records(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


@pytest.fixture(scope="module")
def local_slurm(tmp_path_factory):
    """A running two-node SLURM cluster (tests.slurm_cluster), or a skip naming why there is none."""
    try:
        with LocalSlurm(tmp_path_factory.mktemp("slurm")) as slurm:
            yield slurm
    except SlurmUnavailable as exc:
        pytest.skip(f"no SLURM on this machine: {exc}")


@pytest.fixture(scope="module")
def two_rank_run(tiny_data_dir, tmp_path_factory):
    """The README's `NPROC=N bash run.sh train ...` with 2 ranks (torchrun): 8 steps, checkpoints at 4 and 8."""
    assert command("NPROC=8 bash run.sh train")[:3] == ["NPROC=8", "bash", "run.sh"]
    run_dir = tmp_path_factory.mktemp("torchrun") / "run"
    proc = subprocess.run(["bash", "run.sh", "train", *TINY, f"data.path={tiny_data_dir}", f"run_dir={run_dir}"],
                          cwd=REPO, env=_clean_env(NPROC="2", MASTER_PORT=str(free_port())), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return run_dir


@pytest.mark.slow
def test_sbatch_two_node_job_equals_torchrun_launch(local_slurm, two_rank_run, tiny_data_dir, tmp_path):
    words = command("LAUNCHER=slurm")
    assert [w.split("=")[0] for w in words[:words.index("bash")]] == ["LAUNCHER", "NPROC"]
    run_dir = tmp_path / "run"
    train = shlex.join([*TINY, f"data.path={tiny_data_dir}", f"run_dir={run_dir}"])
    script = (f"#!/usr/bin/env bash\nset -e\ncd {shlex.quote(str(REPO))}\n"
              f"LAUNCHER=slurm NPROC=1 MASTER_PORT={free_port()} bash run.sh train {train}\n")
    job = local_slurm.sbatch(script, tmp_path, nodes=2, env=_clean_env())
    out = (tmp_path / "slurm.out").read_text() if (tmp_path / "slurm.out").is_file() else ""
    assert job.returncode == 0, job.stdout + job.stderr + out[-6000:]
    assert f"2 node(s) x 1 process(es), rendezvous at {local_slurm.nodes[0]}:" in out
    # One torchrun per node (node ranks from SLURM_NODEID), one rank each: a world of 2.
    state = json.loads((run_dir / "checkpoints" / "step_00000008" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 8
    assert len(list((run_dir / "checkpoints" / "step_00000008").glob("zero_pp_rank_*_optim_states.pt"))) == 2
    got, want = _train_records(run_dir), _train_records(two_rank_run)
    assert [r["step"] for r in got] == list(range(1, 9))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    assert got[-1]["tokens_seen"] == 8 * 2 * 4 * 64  # steps x ranks x micro batch x block


HOSTLISTS = (("gpu-[003-005,010],cpu1", "gpu-003"), ("rack[1-2]-n[07,9]", "rack1-n07"), ("node7", "node7"))


def _run_sh_slurm(tmp_path: Path, nodelist: str, **extra: str) -> subprocess.CompletedProcess:
    """`LAUNCHER=slurm bash run.sh train` in a batch script's environment where scontrol cannot work
    (an empty SLURM_CONF, as in a container without the cluster's configuration): run.sh reads the
    hostlist itself. Nothing is started: srun refuses that configuration (or is not installed)."""
    (tmp_path / "empty.conf").touch()
    env = _clean_env(LAUNCHER="slurm", NPROC="8", MASTER_PORT="29511", DS_ACCELERATOR="cpu",
                     SLURM_CONF=str(tmp_path / "empty.conf"), SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="5",
                     SLURM_JOB_NODELIST=nodelist) | extra
    return subprocess.run(["bash", "run.sh", "train", "--stage", "calm", "--config", "calm-m"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_slurm_branch_reads_the_hostlist_and_names_bad_allocations(tmp_path):
    for nodelist, head in HOSTLISTS:
        proc = _run_sh_slurm(tmp_path, nodelist)
        assert f"SLURM job 4242: 5 node(s) x 8 process(es), rendezvous at {head}:29511" in proc.stderr, proc.stderr
        assert proc.returncode != 0  # srun cannot run without a configuration (or is missing)
    for extra, message in (({"SLURM_JOB_NODELIST": "x["}, "cannot read the first host of SLURM_JOB_NODELIST='x['"),
                           ({"SLURM_JOB_NODELIST": ""}, "SLURM_JOB_NODELIST is empty"),
                           ({"SLURM_JOB_ID": ""}, "must run inside a SLURM allocation"),
                           ({"SLURM_JOB_NUM_NODES": ""}, "neither SLURM_JOB_NUM_NODES nor SLURM_NNODES")):
        proc = _run_sh_slurm(tmp_path, "n1", **extra)
        lines = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert proc.returncode == 1 and len(lines) == 1 and message in lines[0], proc.stderr


def test_hostlist_reader_agrees_with_scontrol(local_slurm):
    for nodelist, head in HOSTLISTS:
        expanded = subprocess.run(["scontrol", "show", "hostnames", nodelist], env=local_slurm.env,
                                  capture_output=True, text=True, timeout=30, check=True).stdout.split()
        assert expanded[0] == head


@pytest.mark.slow
def test_data_prep_on_the_datatrove_slurm_executor(local_slurm, tmp_path):
    from tests.data_prep.test_distributed import ARGS, counts

    env = {**local_slurm.env, "OMP_NUM_THREADS": "1", "CALM_DATA_CACHE": str(tmp_path / "cache")}
    common = ["--output", str(tmp_path / "slurm"), "--executor", "slurm", "--tasks", "2", "--partition", "debug",
              "--time", "00:10:00", "--mem-per-cpu-gb", "1", "--wait", *ARGS]
    proc = subprocess.run([sys.executable, "-m", "data_prep.distributed", *common], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert re.search(r"submitted SLURM jobs \d+ \(tasks\) and \d+ \(merge\)", proc.stderr)
    local = subprocess.run([sys.executable, "-m", "data_prep.distributed", "--output", str(tmp_path / "local"),
                            "--tasks", "2", *ARGS], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-4000:]
    on_slurm, here = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("slurm", "local"))
    assert on_slurm["made_by"]["executor"] == "slurm" and counts(on_slurm) == counts(here)
    assert [s["sha256"] for s in on_slurm["splits"]["train"]["shards"]] == \
        [s["sha256"] for s in here["splits"]["train"]["shards"]]  # same task count: the same shards


@pytest.fixture(scope="module")
def universal_run(two_rank_run, tmp_path_factory, tiny_data_dir):
    """README's Resume: the 2-rank run's step-4 checkpoint converted with ds_to_universal and resumed with
    zero3_universal.json by one process. One rank with 2 accumulation steps takes the same 8 samples
    per step as the two ranks did, so it should repeat the 2-rank run's steps 5-8."""
    reference = two_rank_run
    run_dir = tmp_path_factory.mktemp("universal") / "run"
    shutil.copytree(reference / "checkpoints" / "step_00000004", run_dir / "checkpoints" / "step_00000004")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _train_records(reference)[:4]))

    words = command("python -m deepspeed.checkpoint.ds_to_universal")
    ckpt = str(run_dir / "checkpoints" / "step_00000004")
    argv = [a.replace("RUN_DIR/checkpoints/step_N", ckpt) for a in words[3:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-m", words[2], *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    echo = command("echo step_N_universal >")
    Path(echo[3].replace("RUN_DIR", str(run_dir))).write_text(echo[1].replace("step_N", "step_00000004") + "\n")
    resume = command("NPROC=4 bash run.sh train ... --resume")
    assert resume[-2:] == ["--resume", "ds_config=ds_configs/zero3_universal.json"]

    proc = subprocess.run(["bash", "run.sh", "train", *TINY, f"data.path={tiny_data_dir}", f"run_dir={run_dir}",
                           "grad_accum_steps=2", *resume[-2:]],
                          cwd=REPO, env=_clean_env(MASTER_PORT=str(free_port())), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return run_dir


@pytest.mark.slow
def test_universal_checkpoint_resumes_the_two_rank_run_on_one_rank(two_rank_run, universal_run, tmp_path):
    got, want = _train_records(universal_run), _train_records(two_rank_run)
    assert [r["step"] for r in got] == list(range(1, 9))
    assert [r["tokens_seen"] for r in got] == [r["tokens_seen"] for r in want]
    # Step 5 is computed from the restored weights on the restored loader position.
    assert got[4]["loss"] == pytest.approx(want[4]["loss"], rel=1e-9)
    state = json.loads((universal_run / "checkpoints" / "step_00000008" / "trainer_state.json").read_text())
    assert state["world_size"] == 1

    from pretrain.export import main as export_main  # `python -m pretrain.export RUN_DIR --tag step_N`
    assert export_main([str(two_rank_run), "--tag", "step_00000004", "--output", str(tmp_path / "export4")]) == 0
    assert json.loads((tmp_path / "export4" / "training.json").read_text())["step"] == 4


@pytest.mark.slow
def test_universal_resume_continues_the_optimizer_exactly(two_rank_run, universal_run):
    for mine, theirs in zip(_train_records(universal_run)[5:], _train_records(two_rank_run)[5:]):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
