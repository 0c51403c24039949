"""The README's SLURM launch and its resume at another world size, for real on one machine.

SLURM is reproduced as far as a job sees it: the environment sbatch gives the batch script (job id,
node count, hostlist) and an `srun` on PATH that starts one task per node with SLURM_NODEID set, as
srun does. Everything else (run.sh's slurm branch, torchrun's two-node rendezvous at the first host of
the hostlist, ZeRO-3 over gloo) is the real thing. The 2-rank checkpoint it leaves is then converted
with DeepSpeed's ds_to_universal and resumed by one process, as the README's Resume paragraph says.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.distributed import free_port
from tests.readme import command

REPO = Path(__file__).resolve().parents[2]
TINY = ["--stage", "baseline", "--config", "baseline-tiny", "model.hidden_size=32", "model.intermediate_size=64",
        "model.max_position_embeddings=64", "micro_batch_size=4", "wandb.mode=disabled", "optim.warmup_steps=1",
        "optim.lr=3e-3", "max_steps=8", "save_every=4", "eval_every=0", "log_every=1", "export=false"]
# srun as it runs a job step: --nodes N tasks, task i with SLURM_NODEID=SLURM_PROCID=i; fails if one does.
SRUN = r"""#!/usr/bin/env bash
nodes=1
while [[ "$1" == -* ]]; do
  case "$1" in
    --nodes) nodes="$2"; shift 2 ;;
    --ntasks-per-node) [[ "$2" == 1 ]] || exit 90; shift 2 ;;
    --export=ALL) shift ;;
    *) echo "srun (test): unexpected option $1" >&2; exit 91 ;;
  esac
done
pids=()
for ((i = 0; i < nodes; i++)); do
  SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_STEP_NUM_NODES=$nodes "$@" &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""
# An srun that only records what it was asked to run.
RECORDING_SRUN = '#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$SRUN_RECORD"\n'


def _shim(directory: Path, text: str) -> Path:
    directory.mkdir()
    (directory / "srun").write_text(text)
    (directory / "srun").chmod(0o755)
    return directory


def _slurm_env(shim_dir: Path, nodelist: str, nodes: int, **extra: str) -> dict[str, str]:
    """The batch script's environment in a `sbatch --nodes N --ntasks-per-node 1` job (it runs on node 0)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_"))}
    env.update(PATH=f"{shim_dir}{os.pathsep}{env['PATH']}", OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()),
               SLURM_JOB_ID="4242", SLURM_JOBID="4242", SLURM_JOB_NAME="calm", SLURM_JOB_NUM_NODES=str(nodes),
               SLURM_NNODES=str(nodes), SLURM_JOB_NODELIST=nodelist, SLURM_NODELIST=nodelist, SLURM_NODEID="0",
               SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NTASKS=str(nodes), SLURM_NTASKS_PER_NODE="1",
               SLURM_TASKS_PER_NODE=f"1(x{nodes})", SLURM_SUBMIT_DIR=str(REPO))
    return env | extra


def _train_records(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


@pytest.fixture(scope="module")
def slurm_run(tiny_data_dir, tmp_path_factory):
    """The README's `LAUNCHER=slurm NPROC=… bash run.sh train …` on two "nodes" of one process each."""
    tmp = tmp_path_factory.mktemp("slurm")
    words = command("LAUNCHER=slurm")
    env_words = [w for w in words[:words.index("bash")]]
    assert [w.split("=")[0] for w in env_words] == ["LAUNCHER", "NPROC"]
    run_dir = tmp / "run"
    env = _slurm_env(_shim(tmp / "bin", SRUN), "127.0.0.[1-2]", 2, LAUNCHER="slurm", NPROC="1")
    proc = subprocess.run(["bash", "run.sh", "train", *TINY, f"data.path={tiny_data_dir}", f"run_dir={run_dir}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return run_dir, proc


@pytest.mark.slow
def test_slurm_launch_trains_one_node_rank_per_srun_task(slurm_run):
    run_dir, proc = slurm_run
    assert "SLURM job 4242: 2 node(s) x 1 process(es), rendezvous at 127.0.0.1:" in proc.stderr
    state = json.loads((run_dir / "checkpoints" / "step_00000008" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 8
    assert len(list((run_dir / "checkpoints" / "step_00000008").glob("zero_pp_rank_*_optim_states.pt"))) == 2
    records = _train_records(run_dir)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert records[-1]["tokens_seen"] == 8 * 2 * 4 * 64  # steps x ranks x micro batch x block
    assert records[-1]["loss"] < records[0]["loss"]


@pytest.mark.skipif(shutil.which("scontrol") is not None, reason="scontrol expands hostlists where it is installed")
def test_slurm_branch_reads_the_hostlist_without_scontrol(tmp_path):
    record = tmp_path / "srun_args"
    shim = _shim(tmp_path / "bin", RECORDING_SRUN)
    for nodelist, head in (("gpu-[003-005,010],cpu1", "gpu-003"), ("rack[1-2]-n[07,9]", "rack1-n07"),
                           ("node7", "node7")):
        env = _slurm_env(shim, nodelist, 5, LAUNCHER="slurm", NPROC="8", MASTER_PORT="29511", SRUN_RECORD=str(record))
        proc = subprocess.run(["bash", "run.sh", "train", "--stage", "calm", "--config", "calm-m"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        srun_args = record.read_text().splitlines()
        assert srun_args[:5] == ["--nodes", "5", "--ntasks-per-node", "1", "--export=ALL"]
        assert srun_args[5:7] == ["bash", "-c"]
        script = " ".join(" ".join(srun_args[7:]).split())
        assert f"--master_addr '{head}' --master_port '29511'" in script
        assert "--nnodes '5' --node_rank \"$SLURM_NODEID\" --nproc_per_node '8'" in script
        assert script.endswith("-m 'pretrain' --stage calm --config calm-m")
    for env, message in ((_slurm_env(shim, "x[", 2, LAUNCHER="slurm"), "cannot read the first host"),
                         (_slurm_env(shim, "", 2, LAUNCHER="slurm"), "SLURM_JOB_NODELIST is empty"),
                         (_slurm_env(shim, "n1", 2, LAUNCHER="slurm", SLURM_JOB_ID=""), "inside a SLURM allocation")):
        proc = subprocess.run(["bash", "run.sh", "train"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def universal_run(slurm_run, tmp_path_factory, tiny_data_dir):
    """README's Resume: the SLURM run's step-4 checkpoint converted with ds_to_universal and resumed with
    zero3_universal.json by one process. One rank with 2 accumulation steps takes the same 8 samples
    per step as the two ranks did, so it should repeat the SLURM run's steps 5-8."""
    reference, _ = slurm_run
    tmp = tmp_path_factory.mktemp("universal")
    run_dir = tmp / "run"
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

    env = {k: v for k, v in _slurm_env(tmp, "", 1).items() if not k.startswith("SLURM_")}  # one process
    proc = subprocess.run(["bash", "run.sh", "train", *TINY, f"data.path={tiny_data_dir}", f"run_dir={run_dir}",
                           "grad_accum_steps=2", *resume[-2:]],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return run_dir


@pytest.mark.slow
def test_universal_checkpoint_resumes_the_two_rank_run_on_one_rank(slurm_run, universal_run, tmp_path):
    reference, _ = slurm_run
    got, want = _train_records(universal_run), _train_records(reference)
    assert [r["step"] for r in got] == list(range(1, 9))
    assert [r["tokens_seen"] for r in got] == [r["tokens_seen"] for r in want]
    # Step 5 is computed from the restored weights on the restored loader position.
    assert got[4]["loss"] == pytest.approx(want[4]["loss"], rel=1e-9)
    state = json.loads((universal_run / "checkpoints" / "step_00000008" / "trainer_state.json").read_text())
    assert state["world_size"] == 1

    from pretrain.export import main as export_main  # `python -m pretrain.export RUN_DIR --tag step_N`
    assert export_main([str(reference), "--tag", "step_00000004", "--output", str(tmp_path / "export4")]) == 0
    assert json.loads((tmp_path / "export4" / "training.json").read_text())["step"] == 4


@pytest.mark.slow
def test_universal_resume_continues_the_optimizer_exactly(slurm_run, universal_run):
    reference, _ = slurm_run
    for mine, theirs in zip(_train_records(universal_run)[5:], _train_records(reference)[5:]):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
