"""lm-evaluation-harness end to end on a local generation task (YAML and JSONL written here, no hub):
the baseline export through lm-eval's own `hf` model, CALM through our registered `calm` model, and a
log-likelihood task refused for CALM with a reason."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QUESTIONS = [{"question": "The history of", "answer": "the"}, {"question": "A short story about", "answer": "a"}]


def _tasks(tmp_path: Path) -> Path:
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (tmp_path / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + common + "output_type: generate_until\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_target: \"{{answer}}\"\ngeneration_kwargs:\n  until: [\"\\n\"]\n  do_sample: false\n"
        "  max_gen_toks: 8\nmetric_list:\n  - metric: exact_match\n    aggregation: mean\n"
        "    higher_is_better: true\nmetadata:\n  version: 1.0\n")
    (tmp_path / "tiny_choice.yaml").write_text(
        "task: tiny_choice\n" + common + "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_choice: [\"the\", \"a\"]\ndoc_to_target: 0\nmetric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n")
    return tmp_path


def _lm_eval(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               HF_DATASETS_CACHE=str(tmp_path / "datasets"), PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_lm_eval_runs_the_baseline_with_hf_and_calm_with_ours(tiny_runs, tmp_path):
    tasks = _tasks(tmp_path)
    common = ["--include_path", str(tasks), "--limit", "2", "--device", "cpu", "--output_path", str(tmp_path / "out")]
    base = _lm_eval(["lm_eval", "--model", "hf", "--model_args", f"pretrained={tiny_runs['baseline'] / 'export'}",
                     "--tasks", "tiny_gen", *common], tmp_path)
    assert base.returncode == 0, base.stderr[-3000:]
    calm = _lm_eval(["evaluation.lm_eval_calm", "--model_args", f"pretrained={tiny_runs['calm'] / 'export'},seed=3",
                     "--tasks", "tiny_gen", *common], tmp_path)
    assert calm.returncode == 0, calm.stderr[-3000:]
    for proc in (base, calm):
        assert "tiny_gen" in proc.stdout and "exact_match" in proc.stdout
    results = list((tmp_path / "out").rglob("results_*.json"))
    assert len(results) == 2 and all("tiny_gen" in json.loads(p.read_text())["results"] for p in results)

    refused = _lm_eval(["evaluation.lm_eval_calm", "--model_args", f"pretrained={tiny_runs['calm'] / 'export'}",
                        "--tasks", "tiny_choice", *common], tmp_path)
    assert refused.returncode != 0 and "CALM has no token likelihoods" in refused.stderr
