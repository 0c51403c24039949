"""The quick start: the whole CALM-vs-Transformer job on a tiny offline default, on one machine.

    bash run.sh quickstart                      # ~10 min on 2 CPU cores, no GPU, no hub
    bash run.sh quickstart --out runs/qs --small   # a shorter run, ~7 min (what the test uses)
    python -m quickstart --help

Steps, each through the same entry points a real run uses (so the quick start is also their
end-to-end check): `python -m data_prep` on the built-in Wikipedia excerpt with a freshly trained
byte-level BPE → `python -m pretrain` for the autoencoder, then CALM (K=4) on the frozen autoencoder
alongside the Llama baseline given the same training FLOPs as CALM (DeepSpeed ZeRO-3, W&B offline,
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
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext103_test_documents.jsonl"
PROMPT = "The history of the city"


def _train_flops_per_step(preset: str, vocab: int, block: int, ae_path: Path | None = None) -> float:
    """Training FLOPs of one optimizer step of a preset on one rank, counted as the trainer counts them
    (its model config built the same way, CALM's with the frozen autoencoder's encoder)."""
    from pretrain.config import load_config
    from pretrain.models import build_config
    from pretrain.train import flops_per_token

    config = load_config(preset, [f"model.vocab_size={vocab}"])
    model_config = build_config(config.stage, dict(config.model), str(ae_path) if ae_path else None)
    tokens_per_step = config.micro_batch_size * config.grad_accum_steps * block
    return flops_per_token(model_config, config.stage, block) * tokens_per_step


def _baseline_steps_for(calm_steps: int, vocab: int, block: int, ae_path: Path) -> int:
    """Optimizer steps that give the baseline preset the training FLOPs CALM spends in `calm_steps`."""
    flops = calm_steps * _train_flops_per_step("calm-tiny", vocab, block, ae_path)
    return max(int(round(flops / _train_flops_per_step("baseline-tiny", vocab, block))), 1)


def _free_ports(count: int) -> list[int]:
    """Distinct free TCP ports (held open together while chosen, so no two are the same)."""
    import socket

    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


class Pipeline:
    """Runs the steps as subprocesses, timing each and stopping at the first failure."""

    def __init__(self, out: Path):
        self.out = out
        self.timings: dict[str, float] = {}
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")

    def step(self, name: str, args: list[str], log_name: str | None = None) -> str:
        """Run `python ARGS`; stderr goes to the step's log, stdout too and is also returned."""
        return self.together({name: (args, log_name or name)})[name]

    def together(self, steps: dict[str, tuple[list[str], str]], env: dict[str, dict[str, str]] | None = None
                 ) -> dict[str, str]:
        """Run several `python ARGS` steps at once ({name: (args, log name)}, extra environment per name);
        each is timed on its own, and the first failure (after all have ended) stops the quick start."""
        procs = {}
        for name, (args, log_name) in steps.items():
            log = self.out / "logs" / f"{log_name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            print(f"[quickstart] {name}: {' '.join(args)}\n[quickstart]   log: {log}", flush=True)
            fh, stdout = log.open("w"), tempfile.TemporaryFile("w+")
            proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env={**self.env, **(env or {}).get(name, {})},
                                    stdout=stdout, stderr=fh, text=True)
            procs[name] = (proc, fh, stdout, log, time.perf_counter())
        ended: dict[str, float] = {}
        while len(ended) < len(procs):  # polled, so that each step's own time is recorded
            for name, (proc, *_) in procs.items():
                if name not in ended and proc.poll() is not None:
                    ended[name] = time.perf_counter()
            time.sleep(0.2)
        outputs, failures = {}, []
        for name, (proc, fh, stdout, log, start) in procs.items():
            stdout.seek(0)
            outputs[name] = stdout.read()
            stdout.close()
            fh.write(outputs[name])
            fh.close()
            elapsed = ended[name] - start
            self.timings[name] = self.timings.get(name, 0.0) + elapsed
            if proc.returncode != 0:
                tail = log.read_text(errors="replace").splitlines()[-25:]
                failures.append(f"[quickstart] {name} failed (exit {proc.returncode}) after {elapsed:.0f}s; "
                                f"last lines of {log}:\n" + "\n".join(tail))
            else:
                print(f"[quickstart]   {name}: done in {elapsed:.0f}s", flush=True)
        if failures:
            raise SystemExit("\n".join(failures))
        return outputs


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m quickstart", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="everything lands here")
    p.add_argument("--small", action="store_true",
                   help="a shorter run (what the test runs): fewer training steps, a shorter WikiText check")
    p.add_argument("--wikitext", type=Path, default=WIKITEXT,
                   help="the paper's WikiText-103 test documents (evaluated when the file exists)")
    # A byte-level BPE with two merges (256 bytes + EOS + PAD + 2): a 4-token chunk is ~4 characters, so
    # chunks repeat often (79k distinct among 689k) and within a few CPU minutes the tiny CALM learns
    # whole chunks from context: held-out Brier-4 ~3e-4 > 0 after 1,200 steps, where at 300 tokens
    # (44 merges, ~8 characters per chunk) it stayed at 0 even after 2,400 steps, and at 512 or 1024 it
    # never left the unigram level.
    p.add_argument("--vocab-size", type=int, default=260)
    p.add_argument("--block-len", type=int, default=256, help="tokens per training block (64 CALM steps at K=4)")
    p.add_argument("--ae-steps", type=int, default=None)
    p.add_argument("--calm-steps", type=int, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = args.out if args.out.is_absolute() else REPO / args.out
    out.mkdir(parents=True, exist_ok=True)
    small = args.small
    ae_steps = args.ae_steps or (200 if small else 400)
    # CALM learns whole chunks slowly: at 600 steps its held-out Brier-4 is still within 2 standard errors of 0
    calm_steps = args.calm_steps or (1200 if small else 2000)
    vocab, block = args.vocab_size, args.block_len
    pipe = Pipeline(out)
    started = time.perf_counter()

    data = out / "data"
    prep = ["-m", "data_prep", "--input", "builtin:wiki", "--train-tokenizer", "--vocab-size", str(vocab),
            "--block-len", str(block), "--patch-size", "4", "--val-fraction", "0.05", "--output", str(data),
            "--no-progress"]
    pipe.step("data_prep", prep)

    common = [f"data.path={data}", f"model.vocab_size={vocab}", "wandb.mode=offline", "log_every=10"]
    runs = {"autoencoder": out / "ae", "calm": out / "calm", "baseline": out / "baseline"}
    pipe.step("train autoencoder", ["-m", "pretrain", "--stage", "autoencoder", "--config", "ae-tiny", *common,
                                    f"run_dir={runs['autoencoder']}", f"max_steps={ae_steps}",
                                    f"save_every={ae_steps}", f"eval_every={max(ae_steps // 3, 1)}"], "train_ae")
    # The baseline gets the training FLOPs CALM spends (counted as the trainer counts them, evaluation.flops).
    # The two train side by side with half the threads each: these tiny models use a second thread
    # poorly, so this takes about a quarter less time than one after the other (381 s vs 317 + 210 s).
    base_steps = _baseline_steps_for(calm_steps, vocab, block, runs["autoencoder"] / "export")
    threads = max(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1) // 2, 1)
    ports = _free_ports(2)
    pipe.together({
        "train calm": (["-m", "pretrain", "--stage", "calm", "--config", "calm-tiny", *common,
                        f"run_dir={runs['calm']}", f"ae_path={runs['autoencoder'] / 'export'}", "optim.lr=3e-3",
                        # after the preset's 20 warm-up steps at this lr one run sat at the marginal (val
                        # 12.05 at step 300, flat to 1,200); with 100 its val loss was 11.69 at step 300
                        "optim.warmup_steps=100", "optim.schedule=cosine", f"max_steps={calm_steps}",
                        f"save_every={calm_steps}",
                        f"eval_every={max(calm_steps // 4, 1)}"], "train_calm"),
        "train baseline": (["-m", "pretrain", "--stage", "baseline", "--config", "baseline-tiny", *common,
                            f"run_dir={runs['baseline']}", f"max_steps={base_steps}", f"save_every={base_steps}",
                            f"eval_every={max(base_steps // 4, 1)}"], "train_baseline"),
    }, env={name: {"OMP_NUM_THREADS": str(threads), "MASTER_PORT": str(port)}
            for name, port in zip(("train calm", "train baseline"), ports)})

    models = [str(runs[s]) for s in ("baseline", "calm", "autoencoder")]
    # The whole held-out split (~700 blocks); the WikiText-103 check reads its first 64 blocks. CALM's
    # whole-chunk hits are rare at this size, so it draws 8 head samples per position, not 2: the same
    # expected Brier-n with about half the standard error.
    max_blocks = "8" if small else "64"
    evaluate = ["-m", "evaluation", "--model", *models, "--context", str(block), "--batch-size", "8",
                "--calm-samples", "8"]
    pipe.step("evaluate held-out split", [*evaluate, "--data", str(data), "--split", "validation", "--gen-tokens",
                                          "16" if small else "64", "--gen-batch", "4"], "eval_heldout")
    if args.wikitext.exists():
        pipe.step("evaluate WikiText-103 test", [*evaluate, "--data", str(args.wikitext), "--max-blocks", max_blocks],
                  "eval_wikitext")
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
