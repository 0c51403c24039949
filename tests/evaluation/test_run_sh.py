"""The README's evaluation and report commands through run.sh: evaluation sharded over ranks by the
launcher (NPROC), then the report of the evaluated run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from evaluation.__main__ import main
from evaluation.results import read_result
from pretrain.distributed import free_port
from tests.readme import command

REPO = Path(__file__).resolve().parents[2]
TEXT = "The lighthouse keeper logged every ship that passed the point, and the storms that kept them in port. "


@pytest.mark.slow
def test_readme_sharded_eval_then_report(tiny_runs, tmp_path):
    run = shutil.copytree(tiny_runs["calm"], tmp_path / "calm-m", ignore=shutil.ignore_patterns("eval"))
    docs = tmp_path / "wiki.jsonl"
    docs.write_text("\n".join(json.dumps({"text": TEXT * n}) for n in (2, 3, 4, 5)) + "\n")
    words = command("NPROC=8 bash run.sh eval")
    assert words[:4] == ["NPROC=8", "bash", "run.sh", "eval"]
    # Two ranks instead of eight; the tiny model's context instead of the paper's 2048 steps.
    args = [{"runs/calm-m": str(run), "wiki.jsonl": str(docs)}.get(w, w) for w in words[1:]]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(NPROC="2", OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([*args, "--context", "32"], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = read_result(run / "eval" / "wiki-ctx32.json")
    assert result["brierlm"]["world_size"] == 2
    main(["--model", str(run), "--data", str(docs), "--context", "32", "--out", str(tmp_path / "one.json")])
    single = read_result(tmp_path / "one.json")["brierlm"]
    assert single["world_size"] == 1 and result["brierlm"]["positions"] == single["positions"] > 0

    words = command("bash run.sh report")
    args = [w for w in words if not w.startswith("runs/")]
    args[args.index("reports/main")] = str(tmp_path / "report")
    args.insert(args.index("--out"), str(run))
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    [row] = report["models"]
    assert row["name"] == "calm-m" and row["brierlm"] == result["brierlm"]
    assert "calm-m" in (tmp_path / "report" / "report.md").read_text()
