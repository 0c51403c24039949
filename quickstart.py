"""The quick start: the whole CALM-vs-Transformer job on a tiny offline default, on one machine.

    bash run.sh quickstart                      # ~10 min on 2 CPU cores, no GPU, no hub
    bash run.sh quickstart --out runs/qs --small   # a shorter run, ~4 min (what the test uses)
    python -m quickstart --help

Steps, each through the same entry points a real run uses (so the quick start is also their
end-to-end check): `python -m data_prep` on the built-in Wikipedia excerpt with a freshly trained
byte-level BPE → `python -m pretrain` for the autoencoder, then CALM (K=4) on the frozen autoencoder
alongside the Llama baseline given the same training FLOPs as CALM (DeepSpeed ZeRO-3, W&B offline,
checkpoints, HF exports) → `python -m evaluation` on the held-out split and, when present, a
WikiText-103 test documents file (`--wikitext`, JSONL of {"text": ...}) → `python -m evaluation.report`
→ a sample from each model. A rerun reuses the finished data and runs (training resumes from its
checkpoints). How the tiny settings below were chosen, run by run: docs/notes.md.
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

from pretrain.distributed import free_ports

REPO = Path(__file__).resolve().parent
WIKITEXT = REPO / "data" / "wikitext103_test.jsonl"
"""Where `python -m data_prep.wikitext` writes the WikiText-103 test documents by default."""
PROMPT = "The history of the city"


def _train_flops_per_step(preset: str, vocab: int, block: int, ae_path: Path | None = None) -> float:
    """Training FLOPs of one optimizer step of a preset on one rank, counted as the trainer counts them
    (its model config built the same way, CALM's with the frozen autoencoder's encoder)."""
    from pretrain.config import load_config
    from pretrain.stages import get_stage

    config = load_config(preset, [f"model.vocab_size={vocab}"])
    stage = get_stage(config.stage)
    model_config = stage.build_config(config.model, str(ae_path) if ae_path else None)
    tokens_per_step = config.micro_batch_size * config.grad_accum_steps * block
    return stage.train_flops_per_token(model_config, block) * tokens_per_step


def _calm_budget(calm_steps: int, vocab: int, block: int, ae_path: Path) -> tuple[float, int]:
    """(the training FLOPs CALM spends in `calm_steps`, the baseline's steps to reach them): the budget
    goes to the baseline as `max_train_flops`, and the steps (the trainer's own rule) to its progress line."""
    from pretrain.train import steps_for_flops

    flops = calm_steps * _train_flops_per_step("calm-small", vocab, block, ae_path)
    return flops, steps_for_flops(flops, _train_flops_per_step("baseline-tiny", vocab, block))


class Pipeline:
    """Runs the steps as subprocesses, timing each and stopping at the first failure."""

    def __init__(self, out: Path):
        self.out = out
        self.timings: dict[str, float] = {}
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")

    def step(self, name: str, args: list[str], log_name: str | None = None, watch: "Watch | None" = None) -> str:
        """Run `python ARGS`; stderr goes to the step's log, stdout too and is also returned."""
        return self.together({name: (args, log_name or name)}, watch={name: watch} if watch else None)[name]

    def together(self, steps: dict[str, tuple[list[str], str]], env: dict[str, dict[str, str]] | None = None,
                 watch: dict[str, "Watch"] | None = None) -> dict[str, str]:
        """Run several `python ARGS` steps at once ({name: (args, log name)}, extra environment per name);
        each is timed on its own, and the first failure (after all have ended) stops the quick start.
        Training steps named in `watch` show their progress on one live line while they run."""
        procs = {}
        for name, (args, log_name) in steps.items():
            log = self.out / "logs" / f"{log_name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            print(f"[quickstart] {name}: {' '.join(args)}\n[quickstart]   log: {log}", flush=True)
            fh, stdout = log.open("w"), tempfile.TemporaryFile("w+")
            proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env={**self.env, **(env or {}).get(name, {})},
                                    stdout=stdout, stderr=fh, text=True)
            procs[name] = (proc, fh, stdout, log, time.perf_counter())
        ended = self._wait(procs, Progress(watch or {}))
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

    @staticmethod
    def _wait(procs: dict, progress: "Progress") -> dict[str, float]:
        """Poll until every process has ended (so that each step's own time is recorded)."""
        ended: dict[str, float] = {}
        while len(ended) < len(procs):
            for name, (proc, *_) in procs.items():
                if name not in ended and proc.poll() is not None:
                    ended[name] = time.perf_counter()
            progress.show(time.perf_counter() - min(p[-1] for p in procs.values()))
            time.sleep(0.2)
        progress.close()
        return ended


class Watch:
    """Where a training step's progress can be read: its run's metrics.jsonl and its step count."""

    def __init__(self, run_dir: Path, max_steps: int):
        self.metrics, self.max_steps = run_dir / "metrics.jsonl", max_steps

    def latest(self) -> tuple[int, float | None]:
        """(last logged step, its training loss), (0, None) before the first log line."""
        if not self.metrics.is_file():
            return 0, None
        for line in reversed(self.metrics.read_text().splitlines()):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line being written
                continue
            if record.get("split") == "train":
                return int(record["step"]), record.get("loss")
        return 0, None


class Progress:
    """One live terminal line for the running training steps: step, loss, elapsed and time left.

    On a terminal the line is redrawn in place about once a second; in a log (CI, a pipe) it is
    printed as a new line every 30 seconds instead."""

    def __init__(self, watches: dict[str, Watch]):
        self.watches = watches
        self.tty = sys.stdout.isatty()
        self.last = 0.0
        self.drawn = False

    def line(self, elapsed: float) -> str:
        parts = []
        for name, watch in self.watches.items():
            step, loss = watch.latest()
            left = f", ~{_clock(elapsed * (watch.max_steps - step) / step)} left" if step else ""
            loss_text = f" loss {loss:.4g}" if loss is not None else ""
            parts.append(f"{name} {step}/{watch.max_steps}{loss_text}{left}")
        return f"[quickstart]   {_clock(elapsed)} | " + " | ".join(parts)

    def show(self, elapsed: float) -> None:
        if not self.watches or time.perf_counter() - self.last < (1.0 if self.tty else 30.0):
            return
        self.last = time.perf_counter()
        text = self.line(elapsed)
        if self.tty:
            print("\r\033[K" + text, end="", flush=True)
            self.drawn = True
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.drawn:
            print(flush=True)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m quickstart", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="everything lands here")
    p.add_argument("--small", action="store_true",
                   help="a shorter run (what the test runs): fewer training steps, a shorter WikiText check")
    p.add_argument("--wikitext", type=Path, default=WIKITEXT,
                   help='WikiText-103 test documents, JSONL of {"text": ...}, evaluated when the file exists '
                        f"(default {WIKITEXT.relative_to(REPO)}, made by python -m data_prep.wikitext)")
    # A byte-level BPE with two merges (256 bytes + EOS + PAD + 2): a 4-token chunk is ~4 characters, so
    # chunks repeat often enough for the tiny CALM to learn whole chunks from context in CPU minutes.
    p.add_argument("--vocab-size", type=int, default=260)
    p.add_argument("--block-len", type=int, default=256, help="tokens per training block (64 CALM steps at K=4)")
    p.add_argument("--ae-steps", type=int, default=None)
    p.add_argument("--calm-steps", type=int, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = args.out if args.out.is_absolute() else REPO / args.out
    out.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline(out)
    started = time.perf_counter()
    data = prepare_data(pipe, out, args)
    runs, steps = train_models(pipe, out, data, args)
    evaluate_models(pipe, data, runs, args)
    report = out / "report"
    pipe.step("report", ["-m", "evaluation.report", *_models(runs), "--out", str(report)])
    samples = generate_samples(pipe, runs, args.small)
    summary = {"out": str(out), "seconds_total": round(time.perf_counter() - started, 1),
               "seconds": {k: round(v, 1) for k, v in pipe.timings.items()}, "steps": steps,
               "report": str(report / "report.md"), "samples": samples}
    (out / "quickstart.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary, data, runs)
    return 0


def _models(runs: dict[str, Path]) -> list[str]:
    return [str(runs[s]) for s in ("baseline", "calm", "autoencoder")]


def prepare_data(pipe: Pipeline, out: Path, args) -> Path:
    data = out / "data"
    pipe.step("data_prep", ["-m", "data_prep", "--input", "builtin:wiki", "--train-tokenizer", "--vocab-size",
                            str(args.vocab_size), "--block-len", str(args.block_len), "--patch-size", "4",
                            "--val-fraction", "0.05", "--output", str(data), "--no-progress"])
    return data


def train_models(pipe: Pipeline, out: Path, data: Path, args) -> tuple[dict[str, Path], dict[str, int]]:
    """The autoencoder, then CALM and the baseline side by side; the baseline gets CALM's training FLOPs."""
    ae_steps = args.ae_steps or (200 if args.small else 400)
    # CALM learns whole chunks slowly, so it gets more steps than the autoencoder
    calm_steps = args.calm_steps or (800 if args.small else 2000)
    vocab, block = args.vocab_size, args.block_len
    common = [f"data.path={data}", f"model.vocab_size={vocab}", "wandb.mode=offline", "log_every=10"]
    runs = {"autoencoder": out / "ae", "calm": out / "calm", "baseline": out / "baseline"}
    pipe.step("train autoencoder", ["-m", "pretrain", "--stage", "autoencoder", "--config", "ae-tiny", *common,
                                    f"run_dir={runs['autoencoder']}", f"max_steps={ae_steps}",
                                    f"save_every={ae_steps}", f"eval_every={max(ae_steps // 3, 1)}"], "train_ae",
              watch=Watch(runs["autoencoder"], ae_steps))
    # The baseline gets the training FLOPs CALM spends (counted as the trainer counts them, pretrain.models.flops).
    # The two train side by side with half the threads each: these tiny models use a second thread
    # poorly, so this is faster than training one after the other.
    budget, base_steps = _calm_budget(calm_steps, vocab, block, runs["autoencoder"] / "export")
    threads = max(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1) // 2, 1)
    ports = free_ports(2)
    pipe.together({
        # calm-small: the calm-tiny model with the small-corpus recipe (lr 3e-3, 100 warm-up steps, cosine)
        "train calm": (["-m", "pretrain", "--stage", "calm", "--config", "calm-small", *common,
                        f"run_dir={runs['calm']}", f"ae_path={runs['autoencoder'] / 'export'}",
                        f"max_steps={calm_steps}", f"save_every={calm_steps}",
                        f"eval_every={max(calm_steps // 4, 1)}"], "train_calm"),
        "train baseline": (["-m", "pretrain", "--stage", "baseline", "--config", "baseline-tiny", *common,
                            f"run_dir={runs['baseline']}", f"max_train_flops={budget!r}", f"save_every={base_steps}",
                            f"eval_every={max(base_steps // 4, 1)}"], "train_baseline"),
    }, env={name: {"OMP_NUM_THREADS": str(threads), "MASTER_PORT": str(port)}
            for name, port in zip(("train calm", "train baseline"), ports)},
        watch={"calm": Watch(runs["calm"], calm_steps), "baseline": Watch(runs["baseline"], base_steps)})
    return runs, {"autoencoder": ae_steps, "calm": calm_steps, "baseline": base_steps}


def evaluate_models(pipe: Pipeline, data: Path, runs: dict[str, Path], args) -> None:
    """BrierLM / reconstruction on the whole held-out split and, when given, on WikiText-103 documents."""
    # The whole held-out split (~700 blocks); the WikiText-103 check reads its first 64 blocks. CALM's
    # whole-chunk hits are rare at this size, so it draws 8 head samples per position, not 2: the same
    # expected Brier-n with about half the standard error.
    evaluate = ["-m", "evaluation", "--model", *_models(runs), "--context", str(args.block_len), "--batch-size", "8",
                "--calm-samples", "8"]
    pipe.step("evaluate held-out split", [*evaluate, "--data", str(data), "--split", "validation", "--gen-tokens",
                                          "16" if args.small else "64", "--gen-batch", "4"], "eval_heldout")
    if args.wikitext.exists():
        pipe.step("evaluate WikiText-103 test", [*evaluate, "--data", str(args.wikitext), "--max-blocks",
                                                 "8" if args.small else "64"], "eval_wikitext")
    else:
        print(f"[quickstart] {args.wikitext} not found: skipping the WikiText-103 evaluation (build it with "
              f"`python -m data_prep.wikitext --output {args.wikitext}` where the Hugging Face hub is reachable, "
              "or from a local copy with --local PATH)", flush=True)


def generate_samples(pipe: Pipeline, runs: dict[str, Path], small: bool) -> dict[str, str]:
    return {stage: pipe.step(f"generate ({stage})", [
        "-m", "evaluation.generate", "--model", str(runs[stage] / "export"), "--prompt", PROMPT,
        "--max-new-tokens", "16" if small else "48", "--temperature", "0.5", "--seed", "0"],
        f"generate_{stage}").strip() for stage in ("calm", "baseline")}


def print_summary(summary: dict, data: Path, runs: dict[str, Path]) -> None:
    print(f"\n[quickstart] finished in {summary['seconds_total'] / 60:.1f} min")
    print(f"  data and tokenizer:  {data}")
    for stage, run in runs.items():
        print(f"  {stage:<19}  {run}  (export: {run / 'export'}, metrics: {run / 'metrics.jsonl'})")
    print(f"  report:              {summary['report']} (+ report.json, *.png)")
    print(f"  timings and samples: {Path(summary['out']) / 'quickstart.json'}")
    for stage, text in summary["samples"].items():
        print(f"\n  sample from {stage} (T=0.5):\n    {text[-600:]}")


if __name__ == "__main__":
    sys.exit(main())
