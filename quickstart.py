"""The quick start: the whole CALM-vs-Transformer job on a tiny offline default, on one machine.

    bash run.sh quickstart                      # ~8 min on 2 CPU cores, no GPU, no hub
    bash run.sh quickstart --out runs/qs --small   # a shorter smoke run (what the test uses)
    python -m quickstart --help

Steps, each through the same entry points a real run uses (so the quick start is also their
end-to-end check): `python -m data_prep` on the built-in Wikipedia excerpt with a freshly trained
byte-level BPE → `python -m pretrain` for the autoencoder, then CALM (K=4) on the frozen autoencoder,
then the Llama baseline given the same training FLOPs as CALM (DeepSpeed ZeRO-3, W&B offline,
checkpoints, HF exports) → `python -m evaluation` on the held-out split and, when present, the
paper's WikiText-103 test documents → `python -m evaluation.report` → a sample from each model.
A rerun reuses the finished data and runs (training resumes from its checkpoints).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext103_test_documents.jsonl"
PROMPT = "The history of the city"


def _train_flops_spent(run_dir: Path) -> float:
    """Cumulative training FLOPs of a finished run (its last training record in metrics.jsonl)."""
    from evaluation.report import read_metrics

    train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("split") == "train"]
    if not train:
        raise SystemExit(f"[quickstart] {run_dir}/metrics.jsonl has no training record")
    return float(train[-1]["train_flops"])


def _baseline_steps_for(flops: float, vocab: int, block: int) -> int:
    """Optimizer steps that give the baseline preset `flops` training FLOPs (same batch as the preset)."""
    from evaluation.flops import train_flops_per_token
    from pretrain.config import load_config

    config = load_config("baseline-tiny", [f"model.vocab_size={vocab}"])
    tokens_per_step = config.micro_batch_size * config.grad_accum_steps * block
    return max(int(round(flops / (train_flops_per_token(config.model, "baseline", block) * tokens_per_step))), 1)


class Pipeline:
    """Runs the steps as subprocesses, timing each and stopping at the first failure."""

    def __init__(self, out: Path):
        self.out = out
        self.timings: dict[str, float] = {}
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")

    def step(self, name: str, args: list[str], log_name: str | None = None) -> str:
        """Run `python ARGS`; stderr goes to the step's log, stdout too and is also returned."""
        log = self.out / "logs" / f"{log_name or name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"[quickstart] {name}: {' '.join(args)}\n[quickstart]   log: {log}", flush=True)
        start = time.perf_counter()
        with log.open("w") as fh:
            proc = subprocess.run([sys.executable, *args], cwd=REPO, env=self.env, stdout=subprocess.PIPE,
                                  stderr=fh, text=True)
            fh.write(proc.stdout)
        elapsed = time.perf_counter() - start
        self.timings[name] = self.timings.get(name, 0.0) + elapsed
        if proc.returncode != 0:
            tail = log.read_text(errors="replace").splitlines()[-25:]
            raise SystemExit(f"[quickstart] {name} failed (exit {proc.returncode}) after {elapsed:.0f}s; "
                             f"last lines of {log}:\n" + "\n".join(tail))
        print(f"[quickstart]   done in {elapsed:.0f}s", flush=True)
        return proc.stdout


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m quickstart", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="everything lands here")
    p.add_argument("--small", action="store_true",
                   help="a few minutes' smoke run: fewer documents and steps (numbers are not meaningful)")
    p.add_argument("--wikitext", type=Path, default=WIKITEXT,
                   help="the paper's WikiText-103 test documents (evaluated when the file exists)")
    # A near-byte-level BPE (256 bytes + 44 merges, ~2.2 characters per token): 4-token chunks repeat
    # far more often than at 512 or 1024, and within a few CPU minutes the tiny CALM then learns from
    # context (held-out Brier-1 0.049 vs 0.008 at 512 and 0.005 at 1024, where it stayed at the
    # unigram level).
    p.add_argument("--vocab-size", type=int, default=300)
    p.add_argument("--block-len", type=int, default=256, help="tokens per training block (64 CALM steps at K=4)")
    p.add_argument("--ae-steps", type=int, default=None)
    p.add_argument("--calm-steps", type=int, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = args.out if args.out.is_absolute() else REPO / args.out
    out.mkdir(parents=True, exist_ok=True)
    small = args.small
    ae_steps = args.ae_steps or (150 if small else 400)
    calm_steps = args.calm_steps or (100 if small else 1200)
    vocab, block = args.vocab_size, args.block_len
    pipe = Pipeline(out)
    started = time.perf_counter()

    data = out / "data"
    prep = ["-m", "data_prep", "--input", "builtin:wiki", "--train-tokenizer", "--vocab-size", str(vocab),
            "--block-len", str(block), "--patch-size", "4", "--val-fraction", "0.05", "--output", str(data),
            "--no-progress"]
    if small:
        prep += ["--max-docs", "40", "--val-fraction", "0.1"]
    pipe.step("data_prep", prep)

    common = [f"data.path={data}", f"model.vocab_size={vocab}", "wandb.mode=offline", "log_every=10"]
    runs = {"autoencoder": out / "ae", "calm": out / "calm", "baseline": out / "baseline"}
    pipe.step("train autoencoder", ["-m", "pretrain", "--stage", "autoencoder", "--config", "ae-tiny", *common,
                                    f"run_dir={runs['autoencoder']}", f"max_steps={ae_steps}",
                                    f"save_every={ae_steps}", f"eval_every={max(ae_steps // 3, 1)}"], "train_ae")
    pipe.step("train calm", ["-m", "pretrain", "--stage", "calm", "--config", "calm-tiny", *common,
                             f"run_dir={runs['calm']}", f"ae_path={runs['autoencoder'] / 'export'}", "optim.lr=3e-3", "optim.schedule=cosine",
                             f"max_steps={calm_steps}", f"save_every={calm_steps}",
                             f"eval_every={max(calm_steps // 4, 1)}"], "train_calm")
    # The baseline gets the training FLOPs CALM spent (counted the same way, evaluation.flops).
    base_steps = _baseline_steps_for(_train_flops_spent(runs["calm"]), vocab, block)
    pipe.step("train baseline", ["-m", "pretrain", "--stage", "baseline", "--config", "baseline-tiny", *common,
                                 f"run_dir={runs['baseline']}", f"max_steps={base_steps}",
                                 f"save_every={base_steps}", f"eval_every={max(base_steps // 4, 1)}"],
              "train_baseline")

    models = [str(runs[s]) for s in ("baseline", "calm", "autoencoder")]
    # The whole held-out split (~550 blocks); the WikiText-103 check reads its first 64 blocks.
    max_blocks = "8" if small else "64"
    pipe.step("evaluate held-out split", ["-m", "evaluation", "--model", *models, "--data", str(data),
                                          "--split", "validation", "--context", str(block), "--batch-size", "8",
                                          *(["--max-blocks", max_blocks] if small else []), "--gen-tokens",
                                          "16" if small else "64", "--gen-batch", "4"], "eval_heldout")
    if args.wikitext.exists():
        pipe.step("evaluate WikiText-103 test", ["-m", "evaluation", "--model", *models, "--data",
                                                 str(args.wikitext), "--context", str(block), "--batch-size", "8",
                                                 "--max-blocks", max_blocks], "eval_wikitext")
    else:
        print(f"[quickstart] {args.wikitext} not found: skipping the WikiText-103 evaluation", flush=True)
    report = out / "report"
    pipe.step("report", ["-m", "evaluation.report", *models, "--out", str(report)])
    samples = {}
    for stage in ("calm", "baseline"):
        samples[stage] = pipe.step(f"generate ({stage})", [
            "-m", "evaluation.generate", "--model", str(runs[stage] / "export"), "--prompt", PROMPT,
            "--max-new-tokens", "16" if small else "48", "--temperature", "0.5", "--seed", "0"],
            f"generate_{stage}").strip()

    total = time.perf_counter() - started
    summary = {"out": str(out), "seconds_total": round(total, 1),
               "seconds": {k: round(v, 1) for k, v in pipe.timings.items()},
               "steps": {"autoencoder": ae_steps, "calm": calm_steps, "baseline": base_steps},
               "report": str(report / "report.md"), "samples": samples}
    (out / "quickstart.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n[quickstart] finished in {total / 60:.1f} min")
    print(f"  data and tokenizer:  {data}")
    for stage, run in runs.items():
        print(f"  {stage:<19}  {run}  (export: {run / 'export'}, metrics: {run / 'metrics.jsonl'})")
    print(f"  report:              {report / 'report.md'} (+ report.json, *.png)")
    print(f"  timings and samples: {out / 'quickstart.json'}")
    for stage, text in samples.items():
        print(f"\n  sample from {stage} (T=0.5):\n    {text[-600:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
