"""The README's GPU commands on this CPU machine: `bash run.sh gpu-check --dry-run` goes through every
step of the GPU check with tiny sizes (so the script cannot rot between GPU sessions), and
`bash run.sh wheels DIR` makes a consistent, installable wheels folder for the GPU machine's Python
(CPython 3.12, manylinux x86_64) that `CALM_PYTHON`/`CALM_WHEELS` install with no index."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.readme import command

REPO = Path(__file__).resolve().parents[2]
STEPS = {"1 env", "1 attention", "2 numerics", "2 kernels", "2 chunked CE", "2 packing", "3 train", "3 nonfinite",
         "4 brierlm", "4 generate"}
OFFLINE = ("NewConnectionError", "Temporary failure in name resolution", "Max retries exceeded",
           "Could not fetch URL", "Network is unreachable")


def _run(words: list[str], timeout: int, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    base.update(OMP_NUM_THREADS="1", **env)
    return subprocess.run(words, cwd=REPO, env=base, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_gpu_check_dry_run_goes_through_every_step(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = _run([*command("bash run.sh gpu-check --dry-run"), "--out", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert doc["mode"] == "dry-run" and doc["ok"], [r for r in doc["rows"] if r["ok"] is False]
    assert {r["step"] for r in doc["rows"]} == STEPS
    assert not [r for r in doc["rows"] if r["check"] in ("FAILED", "skipped")]
    train = [r for r in doc["rows"] if r["step"] == "3 train"]
    assert len(train) == 7 and all(r["detail"]["tokens_per_s"] > 0 for r in train)
    assert {r["check"] for r in doc["rows"] if r["step"] == "3 nonfinite"} == {
        "non-finite step, nan_policy=skip", "non-finite step, nan_policy=stop"}
    assert "all checks passed" in proc.stdout


@pytest.mark.slow
def test_wheels_folder_for_the_gpu_python(tmp_path):
    words = command("bash run.sh wheels")
    folder = tmp_path / "whl"
    proc = _run([*words[:3], str(folder)], timeout=420)  # default target: CPython 3.12, manylinux x86_64
    if proc.returncode and any(s in proc.stdout + proc.stderr for s in OFFLINE):
        pytest.skip("no package index reachable: " + proc.stderr[-300:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["problems"] == [] and report["python"] == "3.12"
    assert {"deepspeed", "webdataset", "transformers", "pydantic-core"} <= set(report["wheels"])
    assert report["wheels_mib"] + report["repository_mib"] < 64
    assert next(folder.glob("deepspeed-*.whl")).name.endswith("-py3-none-any.whl")

    # Two versions of one package would stop the whole install there: refused here.
    hjson = next(folder.glob("hjson-*.whl"))
    shutil.copy(hjson, folder / "hjson-0.0.1-py3-none-any.whl")
    proc = _run([*words[:3], str(folder), "--check-only"], timeout=120)
    assert proc.returncode == 1 and "several versions" in proc.stdout
    (folder / "hjson-0.0.1-py3-none-any.whl").unlink()

    # CALM_PYTHON/CALM_WHEELS install a folder with no index (here: its pure-Python wheels, for this Python).
    pure, site = tmp_path / "pure", tmp_path / "site"
    pure.mkdir()
    for wheel in folder.glob("*-py3-none-any.whl"):
        shutil.copy(wheel, pure)
    proc = _run(["bash", "run.sh", "wheels", "--help"], timeout=120, CALM_PYTHON=sys.executable,
                CALM_WHEELS=str(pure), CALM_SITE=str(site))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (site / "deepspeed" / "__init__.py").is_file() and (site / ".wheels").is_file()
