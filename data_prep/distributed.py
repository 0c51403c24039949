"""data_prep past one machine: tasks on datatrove's local or SLURM executor, then one merge writing the manifest.

    # one machine, 4 tasks run 2 at a time (outputs and inputs may be fsspec URLs: s3://, gs://, https://)
    python -m data_prep.distributed --tasks 4 --workers 2 --input corpus/*.jsonl.gz --tokenizer gpt2 \\
        --block-len 2048 --output s3://bucket/data/mine
    # a SLURM cluster: an array job of 64 tasks, then a 1-task merge job that depends on it
    python -m data_prep.distributed --executor slurm --partition cpu --time 04:00:00 --tasks 64 \\
        --input /shared/corpus --tokenizer gpt2 --output /shared/data/mine --wait

Every other option is `python -m data_prep`'s (which stays the command for small corpora). The driver
settles the tokenizer first (loaded, or trained on the train split, as data_prep does) and uploads it;
task t of N then takes the documents whose global index i has i % N == t, cuts them into chunks of
about --shard-mb of text (chunk j of task t is chunk number j*N + t) and packs each into its shards
with data_prep's own `process_chunk`, uploads them and records the chunk; the merge reads every
task's record and writes one manifest.json, which says how it was made (`made_by`). Same input and
task count give byte-identical shards. A rerun skips the tasks datatrove recorded as complete
(OUTPUT/.parts/datatrove/completions) and redoes the others from their start.

Why datatrove and not Ray Data: our tasks are whole, independent, file-writing units (not a
dataframe transform), which is datatrove's model; it runs the same pipeline locally or as a SLURM
array job (the scheduler pretraining users already run), records completions for skip-on-rerun,
and reads and writes through fsspec. Ray would add a cluster service to operate beside SLURM.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from datatrove.pipeline.base import PipelineStep

from data_prep import pipeline, shards, sources
from data_prep.manifest import ManifestError
from data_prep.remote import RemoteError, _atomic_get, _filesystem, cache_root, is_url

REPO = Path(__file__).resolve().parent.parent


def _local_inputs(inputs: list[str]) -> list[str]:
    """Remote input files (fsspec URLs) fetched into the local cache; local inputs unchanged."""
    out = []
    for spec in inputs:
        if not is_url(spec):
            out.append(spec)
            continue
        fs, root = _filesystem(spec)
        local = cache_root() / "inputs" / hashlib.sha256(spec.encode()).hexdigest()[:16] / root.rsplit("/", 1)[-1]
        if not local.is_file() or local.stat().st_size != fs.size(root):
            _atomic_get(fs, root, local)
        out.append(str(local))
    return out


def _config(job: dict, output: Path) -> pipeline.PrepConfig:
    from data_prep.__main__ import parse_args

    cfg = parse_args([*job["prep_args"], "--output", str(output), "--no-progress", "--workers", "1"])
    cfg.inputs = _local_inputs(cfg.inputs)
    return cfg


def _put(fs, root: str, local: Path, name: str) -> None:
    fs.makedirs(f"{root}/{name}".rsplit("/", 1)[0], exist_ok=True)
    fs.put_file(str(local), f"{root}/{name}")


def _put_json(fs, root: str, name: str, value) -> None:
    fs.makedirs(f"{root}/{name}".rsplit("/", 1)[0], exist_ok=True)
    with fs.open(f"{root}/{name}", "wb") as f:
        f.write(json.dumps(value, indent=1).encode())


def _get_json(fs, root: str, name: str):
    with fs.open(f"{root}/{name}", "rb") as f:
        return json.loads(f.read())


def prepare(job: dict) -> dict:
    """Driver, before the tasks: the tokenizer settled in a local staging copy and uploaded with its entry."""
    fs, root = _filesystem(job["output"])
    staging = cache_root() / "prep" / hashlib.sha256(job["output"].encode()).hexdigest()[:16]
    cfg = _config(job, staging)
    bad = sources.BadInput(fail_fast=cfg.fail_fast)
    resolved = sources.resolve_inputs(cfg.inputs, bad)
    if not resolved:
        raise sources.DataError(f"no usable input among {cfg.inputs}")
    tok_entry = pipeline._start_or_resume(cfg, resolved)
    for path in sorted((staging / "tokenizer").iterdir()):
        _put(fs, root, path, f"tokenizer/{path.name}")
    job_record = {"tokenizer": tok_entry, "dtype": pipeline._pack_spec(cfg, tok_entry).dtype, **job}
    _put_json(fs, root, ".parts/job.json", job_record)
    return job_record


def run_task(job: dict, rank: int, tasks: int) -> None:
    """Task `rank` of `tasks`: its documents -> chunks -> shards, uploaded; then its record (last)."""
    fs, root = _filesystem(job["output"])
    job = _get_json(fs, root, ".parts/job.json")
    with tempfile.TemporaryDirectory(prefix=f"calm-prep-{rank}-") as tmp:
        staging = Path(tmp)
        cfg = _config(job, staging)
        for split in shards.SPLITS:
            (staging / split).mkdir()
        fs.get(f"{root}/tokenizer/", str(staging / "tokenizer"), recursive=True)
        spec = pipeline._pack_spec(cfg, job["tokenizer"])
        bad = sources.BadInput(fail_fast=cfg.fail_fast, quiet=True)
        resolved = sources.resolve_inputs(cfg.inputs, bad)
        per_source = [0] * len(resolved)
        mine = (d for d in pipeline.documents(resolved, cfg, bad, per_source) if d[0] % tasks == rank)
        chunks = []
        for j, docs in enumerate(pipeline.chunked(mine, int(cfg.shard_mb * 1e6))):
            record = shards.process_chunk(spec, j * tasks + rank, docs)
            for entry in record["splits"].values():
                if entry["shard"]:
                    _put(fs, root, staging / entry["shard"]["path"], entry["shard"]["path"])
                    (staging / entry["shard"]["path"]).unlink()
            chunks.append(record)
            if os.environ.get("CALM_PREP_FAIL_TASK") == str(rank):  # tests: a task dying mid-way
                raise RuntimeError(f"CALM_PREP_FAIL_TASK: task {rank} stops after chunk {j}")
        task = {"rank": rank, "tasks": tasks, "chunks": chunks, "per_source": per_source, "bad": bad.summary()}
        _put_json(fs, root, f".parts/task-{rank:05d}.json", task)


class _Bad:
    """Bad-input counts of all tasks together, in `BadInput.summary()`'s form, for `pipeline._manifest`."""

    def __init__(self, summaries: list[dict]):
        counts: dict[str, int] = {}
        for s in summaries:
            for kind, n in s["counts"].items():
                counts[kind] = counts.get(kind, 0) + n
        self._summary = {"counts": counts, "total": sum(counts.values()),
                         "examples": [e for s in summaries for e in s["examples"]][:10]}

    def summary(self) -> dict:
        return self._summary


def merge(job: dict) -> dict:
    """After all tasks: one manifest.json over every task's chunks, in chunk order; refuses a partial set."""
    from data_prep.manifest import write_manifest

    fs, root = _filesystem(job["output"])
    job = _get_json(fs, root, ".parts/job.json")
    tasks = job["tasks"]
    missing = [r for r in range(tasks) if not fs.exists(f"{root}/.parts/task-{r:05d}.json")]
    if missing:
        raise sources.DataError(f"{job['output']}: task(s) {missing} of {tasks} did not finish; rerun the same "
                                "command (finished tasks are skipped)")
    records = [_get_json(fs, root, f".parts/task-{r:05d}.json") for r in range(tasks)]
    with tempfile.TemporaryDirectory(prefix="calm-merge-") as tmp:
        cfg = _config(job, Path(tmp))
        resolved = sources.resolve_inputs(cfg.inputs, sources.BadInput(quiet=True))
        chunks = sorted((c for t in records for c in t["chunks"]), key=lambda c: c["chunk"])
        manifest = pipeline._manifest(cfg, job["prep_args"], resolved, records[0]["per_source"], job["tokenizer"],
                                      job["dtype"], chunks, _Bad([t["bad"] for t in records]))
        manifest["made_by"] = {"engine": "datatrove", "version": _datatrove_version(), "executor": job["executor"],
                               "tasks": tasks, "task_rule": "document i goes to task i % tasks; chunk j of task t "
                               "is chunk j * tasks + t", "inputs": job["inputs"],
                               "command": job["command"]}
        write_manifest(Path(tmp), manifest)
        _put(fs, root, Path(tmp) / "manifest.json", "manifest.json")
    cfg.output = _Where(job["output"])  # the summary names the real manifest, not the staging copy
    pipeline._print_summary(cfg, manifest)
    return manifest


class _Where(str):
    """An output directory or URL that `/ name` joins like a Path, keeping a URL's `//`."""

    def __truediv__(self, name: str) -> str:
        return f"{self.rstrip('/')}/{name}"


def _datatrove_version() -> str:
    from importlib.metadata import version

    return version("datatrove")


class ShardTask(PipelineStep):
    """The datatrove step of one task (or, with merge=True, of the single merge task)."""

    name = "calm tokenize to shards"
    type = "CALM"

    def __init__(self, job: dict, merge: bool = False):
        super().__init__()
        self.job, self.merge = job, merge

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if self.merge:
            merge(self.job)
        else:
            run_task(self.job, rank, world_size)
        yield from ()


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m data_prep.distributed", description=__doc__.split("\n")[0],
                                     epilog="Other options are passed to `python -m data_prep` (see its --help).")
    parser.add_argument("--output", required=True, help="output directory or fsspec URL")
    parser.add_argument("--tasks", type=int, required=True, help="tasks the documents are split into")
    parser.add_argument("--parallel", type=int, default=-1, help="tasks run at once (default: all)")
    parser.add_argument("--executor", choices=("local", "slurm"), default="local")
    parser.add_argument("--partition", default="debug", help="SLURM partition")
    parser.add_argument("--time", default="24:00:00", help="SLURM time limit per task")
    parser.add_argument("--cpus-per-task", type=int, default=1)
    parser.add_argument("--mem-per-cpu-gb", type=int, default=2)
    parser.add_argument("--wait", action="store_true", help="SLURM: wait for the jobs and check the manifest")
    args, prep_args = parser.parse_known_args(argv)
    if args.tasks < 1:
        parser.error("--tasks must be >= 1")
    return args, prep_args


def _inputs(prep_args: list[str]) -> list[str]:
    """The --input values among data_prep's options (checked by its parser here, before anything runs)."""
    from data_prep.__main__ import parse_args as prep_parse_args

    return list(prep_parse_args([*prep_args, "--output", "unused"]).inputs)


def _check_rerun(args, job: dict) -> None:
    """A rerun must be the same job: completions of another task count or input would be wrong to skip."""
    fs, root = _filesystem(args.output)
    if fs.exists(f"{root}/.parts/job.json"):
        old = _get_json(fs, root, ".parts/job.json")
        if (old["tasks"], old["prep_args"]) != (job["tasks"], job["prep_args"]):
            raise sources.DataError(f"{args.output} holds the output of another job (tasks {old['tasks']}, "
                                    f"args {old['prep_args']}); use another --output or delete it")


def _executors(args, job: dict):
    """(tasks executor, merge executor or None): datatrove's local or SLURM executors for this job."""
    logs = f"{args.output.rstrip('/')}/.parts/datatrove"
    if args.executor == "local":
        from datatrove.executor import LocalPipelineExecutor

        return LocalPipelineExecutor(pipeline=[ShardTask(job)], tasks=args.tasks, workers=args.parallel,
                                     logging_dir=f"{logs}/tasks"), None
    from datatrove.executor import SlurmPipelineExecutor

    env = (f"cd {REPO} && export PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}} "
           f"PATH={Path(sys.executable).parent}:$PATH")
    common = dict(time=args.time, partition=args.partition, cpus_per_task=args.cpus_per_task, qos="",
                  mem_per_cpu_gb=args.mem_per_cpu_gb, env_command=env, requeue=False,
                  slurm_logs_folder=str(Path(tempfile.gettempdir()) / "calm-prep-slurm-logs"))
    tasks = SlurmPipelineExecutor(pipeline=[ShardTask(job)], tasks=args.tasks, workers=args.parallel,
                                  job_name="calm-prep", logging_dir=f"{logs}/tasks", **common)
    merge_exec = SlurmPipelineExecutor(pipeline=[ShardTask(job, merge=True)], tasks=1, job_name="calm-prep-merge",
                                       logging_dir=f"{logs}/merge", depends=tasks, skip_completed=False, **common)
    return tasks, merge_exec


def _wait_job(job_id) -> None:
    while job_id not in (None, -1) and subprocess.run(["squeue", "-h", "-j", str(job_id)], capture_output=True,
                                                      text=True).stdout.strip():
        time.sleep(2)


def _wait_slurm(tasks_exec, merge_exec, output: str) -> dict:
    """Waits for the task array, then (if every task completed; else the merge would wait forever) the merge."""
    _wait_job(tasks_exec.job_id)
    incomplete = tasks_exec.get_incomplete_ranks()
    if incomplete:
        subprocess.run(["scancel", str(merge_exec.job_id)], capture_output=True)
        raise sources.DataError(f"SLURM task(s) {incomplete} failed (logs: {output}/.parts/datatrove/tasks/logs); "
                                "rerun the same command: finished tasks are skipped")
    _wait_job(merge_exec.job_id)
    fs, root = _filesystem(output)
    if not fs.exists(f"{root}/manifest.json"):
        raise sources.DataError(f"the SLURM jobs {tasks_exec.job_id}, {merge_exec.job_id} ended without writing "
                                f"{output}/manifest.json; see {output}/.parts/datatrove/*/logs")
    return _get_json(fs, root, "manifest.json")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return _run(argv)
    except (sources.DataError, ManifestError, RemoteError) as exc:  # bad input or output: one line, no traceback
        print(f"[data_prep] error: {exc}", file=sys.stderr)
        return 1


def _run(argv: list[str]) -> int:
    args, prep_args = parse_args(argv)
    job = {"prep_args": prep_args, "output": args.output.rstrip("/"), "tasks": args.tasks,
           "executor": args.executor, "inputs": _inputs(prep_args),
           "command": " ".join(["python", "-m", "data_prep.distributed", *argv])}
    _check_rerun(args, job)
    job = prepare(job)
    tasks_exec, merge_exec = _executors(args, job)
    if merge_exec is None:
        try:
            tasks_exec.run()
        except Exception as exc:  # noqa: BLE001 - datatrove re-raises a task's error and stops the pool
            print(f"[data_prep] a task failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        incomplete = tasks_exec.get_incomplete_ranks()
        if incomplete:
            print(f"[data_prep] task(s) {incomplete} failed (logs: {args.output}/.parts/datatrove/tasks/logs); "
                  "rerun the same command: finished tasks are skipped", file=sys.stderr)
            return 1
        merge(job)
        return 0
    merge_exec.run()  # submits the task array first, then the merge job depending on it
    print(f"[data_prep] submitted SLURM jobs {tasks_exec.job_id} (tasks) and {merge_exec.job_id} (merge)",
          file=sys.stderr)
    if args.wait:
        _wait_slurm(tasks_exec, merge_exec, args.output)
    return 0


if __name__ == "__main__":
    # Through the importable module, not __main__: SLURM tasks unpickle ShardTask by its module name.
    from data_prep.distributed import main as _main

    sys.exit(_main())
