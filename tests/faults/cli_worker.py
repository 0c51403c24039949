"""Runs fault cases through the `python -m pretrain` entry point, in-process, one after another.

    python tests/faults/cli_worker.py CASES.json RESULTS.jsonl

Start-up (torch, DeepSpeed, the process group) dominates a small case's cost, so one process runs
them all, in one process group kept for the whole run (DeepSpeed caches its groups, so a group torn
down and made again would not do). A case is {"name", "argv", "before": [["delete", PATH] | ["truncate", PATH, BYTES] | ...]}:
the faults are injected just before its run. Each result line holds the exit code, what the entry
point printed and, when an exception escaped it (what a user would see as a traceback), its text.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pretrain import distributed  # noqa: E402


def keep_one_process_group() -> None:
    """The entry point's init/shutdown become: join the group once, keep it until the worker ends."""
    init, world = distributed.init, {}

    def init_once(*args, **kwargs):
        if "world" not in world:
            world["world"] = init(*args, **kwargs)
        return world["world"]

    distributed.init = init_once
    distributed.shutdown = distributed.barrier


def inject(action: list) -> None:
    kind, path = action[0], Path(action[1])
    if kind == "delete":
        path.unlink()
    elif kind == "truncate":
        path.write_bytes(path.read_bytes()[: int(action[2])])
    elif kind == "write":
        path.write_text(action[2])
    else:
        raise ValueError(f"unknown fault {kind!r}")


def run_case(case: dict) -> dict:
    from pretrain.__main__ import main

    for action in case.get("before", []):
        inject(action)
    out, err = io.StringIO(), io.StringIO()
    escaped = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(case["argv"])
        except SystemExit as exc:
            code = exc.code
        except BaseException:  # noqa: BLE001 - an escaped exception is exactly what is recorded
            code, escaped = None, traceback.format_exc()
    return {"name": case["name"], "code": code, "stdout": out.getvalue()[-4000:], "stderr": err.getvalue()[-4000:],
            "traceback": escaped}


if __name__ == "__main__":
    keep_one_process_group()
    cases = json.loads(Path(sys.argv[1]).read_text())
    with open(sys.argv[2], "w") as results:
        for case in cases:
            results.write(json.dumps(run_case(case)) + "\n")
            results.flush()
