"""One command that checks and measures the CUDA path on one GPU: `bash run.sh gpu-check`.

    bash run.sh gpu-check [--out FILE] [--budget-s 480]        # one GPU, paper sizes, at most ~8 minutes
    bash run.sh gpu-check --dry-run                             # CPU, tiny sizes, every step (the tests run it)
    # a GPU machine's own Python (torch/CUDA there), missing packages from a wheels folder made
    # beforehand with `bash run.sh wheels DIR` on a machine with a package index:
    CALM_PYTHON=python3 CALM_WHEELS=DIR bash run.sh gpu-check

Steps (one table row per check, all rows also in the JSON, `ok` true/false for checks, null for
measurements):

1. environment: GPU, memory, torch/CUDA/cuDNN/NCCL/transformers/DeepSpeed/flash-attn versions, and the
   attention kernel CALM and the baseline pick in bf16 and actually run (profiled): flash required.
2. correctness: each model's bf16 forward against fp32; the autoencoder and CALM's energy loss on the
   GPU equal the CPU's in fp32; SDPA's flash backend (and flash-attn's kernel, if installed) against the
   math backend. Tolerances: `bench/gpu_check_numerics.py`. Packed fine-tuning records stay apart
   under the kernel the models pick (`bench/gpu_check_packing.py`).
3. training through DeepSpeed ZeRO-3 (NCCL, bf16): the paper-size autoencoder (vocabulary 128256) with
   whole and chunked logits, calm-m (8192-token blocks) and transformer-s (2048) with activation
   checkpointing off and on: tokens/s, TFLOP/s, MFU, peak memory; then a deliberately non-finite step
   through the real Trainer is refused and every checkpoint left is finite.
4. evaluation and generation: BrierLM positions/s of the baseline and CALM; CALM against a
   same-size baseline in generation tokens/s at T = 1 and 0.5, batch 1 and 16.

`--dry-run` runs every step on the CPU with the tiny presets (training in bf16 through gloo), so the
script cannot rot between GPU sessions. A step that would start after `--budget-s` is skipped and
reported as such; the JSON is rewritten after every step, so a killed run leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench import gpu_check_numerics as numerics
from bench import gpu_check_packing as packing
from bench import gpu_check_speed as speed


@dataclass
class Sizes:
    """Everything that differs between the GPU run and the dry run."""

    presets: dict[str, str]
    seq: int
    correctness_tokens: dict[str, int]
    kernel_shape: tuple[int, int, int, int]
    ce_shape: tuple[int, int, int]
    """(rows, d, vocab) of the chunked cross-entropy check."""
    train: list[dict]
    steps: int
    warmup: int
    brier_tokens: dict[str, int]
    gen_tokens: int
    gen_repeats: int
    train_overrides: list[str] = field(default_factory=list)


def _variants(presets: dict, blocks: dict, micro: dict, common: list[str], chunk: str) -> list[dict]:
    """Autoencoder: whole vs chunked logits; CALM: checkpointing off/on; baseline: whole logits, then
    chunked with checkpointing off/on. `chunk`: the chunked variants' ce_chunk_rows."""
    chunked = [f"ce_chunk_rows={chunk}"]
    plan = [("autoencoder", "whole logits", ["ce_chunk_rows=0"]), ("autoencoder", "chunked logits", chunked),
            ("calm", "AC off", []), ("calm", "AC on", ["activation_checkpointing=true"]),
            ("baseline", "whole logits, AC off", ["ce_chunk_rows=0"]), ("baseline", "chunked, AC off", chunked),
            ("baseline", "chunked, AC on", [*chunked, "activation_checkpointing=true"])]
    return [{"preset": presets[stage], "label": label, "block_len": blocks[stage], "micro_batch": micro[stage],
             "overrides": ["grad_accum_steps=1", "wandb.mode=disabled", *common, *extra]}
            for stage, label, extra in plan]


GPU = Sizes(presets={"autoencoder": "ae", "calm": "calm-m", "baseline": "transformer-s"}, seq=2048,
            correctness_tokens={"autoencoder": 2048, "calm": 2048, "baseline": 1024}, kernel_shape=(2, 16, 2048, 64),
            ce_shape=(16384, 768, 128256),
            train=_variants({"autoencoder": "ae", "calm": "calm-m", "baseline": "transformer-s"},
                            {"autoencoder": 2048, "calm": 8192, "baseline": 2048},
                            {"autoencoder": 8, "calm": 4, "baseline": 8}, [], "auto"),
            steps=3, warmup=2, brier_tokens={"baseline": 2048, "calm": 8192}, gen_tokens=128, gen_repeats=2)
DRY = Sizes(presets={"autoencoder": "ae-tiny", "calm": "calm-tiny", "baseline": "baseline-tiny"}, seq=64,
            correctness_tokens={"autoencoder": 64, "calm": 64, "baseline": 64}, kernel_shape=(1, 2, 64, 32),
            ce_shape=(300, 32, 1000),
            train=_variants({"autoencoder": "ae-tiny", "calm": "calm-tiny", "baseline": "baseline-tiny"},
                            {"autoencoder": 64, "calm": 64, "baseline": 64},
                            {"autoencoder": 2, "calm": 2, "baseline": 2},
                            ["precision=bf16"], "32"),
            steps=1, warmup=1, brier_tokens={"baseline": 64, "calm": 64}, gen_tokens=8, gen_repeats=1)


def model_kwargs(sizes: Sizes) -> dict[str, dict]:
    """The presets' model sections; CALM's with its autoencoder given in memory (the AE preset's shape)."""
    from pretrain.config import load_config

    kw = {stage: dict(load_config(preset).model) for stage, preset in sizes.presets.items()}
    kw["calm"]["ae_config"] = dict(kw["autoencoder"], vocab_size=kw["calm"]["vocab_size"])
    llama = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings", "rms_norm_eps")
    kw["same_size_baseline"] = {k: kw["calm"][k] for k in llama if k in kw["calm"]}
    return kw


def build_models(kwargs: dict, device: torch.device, names: tuple[str, ...], dtype=torch.float32) -> dict:
    from pretrain.stages import build_model

    torch.manual_seed(0)
    models = {}
    for name in names:
        stage = "baseline" if name == "same_size_baseline" else name
        with torch.device(device):
            models[name] = build_model(stage, kwargs[name], device=device, dtype=dtype).eval()
        if stage == "calm":
            models[name].ae_model.float()
    return models


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def step_environment(device: torch.device) -> list[dict]:
    """Step 1a: what this machine is and which versions run."""
    from pretrain.metrics import peak_tflops_of

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": _version("transformers"), "deepspeed": _version("deepspeed"),
            "flash_attn": _version("flash-attn"), "cpus": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                    cudnn=torch.backends.cudnn.version(), nccl=".".join(map(str, torch.cuda.nccl.version())),
                    peak_bf16_tflops=peak_tflops_of(props.name))
    rows = [{"check": "device", "value": info.get("gpu", "CPU (dry run)") + (f", {info['memory_gib']} GiB"
                                                                         if "memory_gib" in info else ""),
             "ok": None, "detail": info}]
    rows.append({"check": "versions", "value": f"torch {info['torch']} (CUDA {info['cuda']}), transformers "
                 f"{info['transformers']}, DeepSpeed {info['deepspeed']}, flash-attn {info['flash_attn']}",
                 "ok": info["deepspeed"] != "not installed", "detail": info})
    return rows


class Report:
    """Rows of all steps: printed as they come, rewritten to the JSON after every step, one table at the end."""

    def __init__(self, out: Path, mode: str, budget_s: float):
        self.out, self.rows, self.start, self.budget_s = out, [], time.perf_counter(), budget_s
        self.meta = {"mode": mode, "budget_s": budget_s, "argv": sys.argv}
        out.parent.mkdir(parents=True, exist_ok=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def run(self, step: str, fn, *args) -> None:
        """Run one step's function; its rows, or one row saying it failed or was skipped."""
        t0 = time.perf_counter()
        if self.elapsed() > self.budget_s:
            rows = [{"check": "skipped", "value": f"time budget of {self.budget_s:.0f} s spent", "ok": False}]
        else:
            try:
                rows = fn(*args)
            except Exception as exc:  # noqa: BLE001 - a failed step is reported, the next ones still run
                rows = [{"check": "FAILED", "value": f"{type(exc).__name__}: {str(exc)[:300]}", "ok": False}]
        for row in rows:
            row["step"] = step
            print(f"[gpu-check] {step:<12} {row['check']:<34} {row['value']}", flush=True)
        self.rows += rows
        self.meta.setdefault("step_seconds", {})[step] = round(time.perf_counter() - t0, 1)
        self.write()

    def ok(self) -> bool:
        return all(r["ok"] is not False for r in self.rows)

    def write(self) -> None:
        doc = {**self.meta, "elapsed_s": round(self.elapsed(), 1), "ok": self.ok(), "rows": self.rows}
        self.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")

    def table(self) -> str:
        lines = [f"{'step':<12} {'check':<34} {'ok':<5} value", "-" * 100]
        for r in self.rows:
            mark = {True: "yes", False: "NO", None: "-"}[r["ok"]]
            lines.append(f"{r['step']:<12} {r['check']:<34} {mark:<5} {r['value']}")
        lines.append(f"{'all checks passed' if self.ok() else 'SOME CHECKS FAILED'} in {self.elapsed():.0f} s; "
                     f"JSON: {self.out}")
        return "\n".join(lines)


def run_steps(report: Report, sizes: Sizes, device: torch.device, world, scratch: Path) -> None:
    kw = model_kwargs(sizes)
    report.run("1 env", step_environment, device)
    report.run("1 attention", numerics.step_attention, kw, device, sizes.seq)
    models = build_models(kw, device, ("autoencoder", "calm", "baseline"))
    gen = torch.Generator().manual_seed(0)
    ids = {n: torch.randint(0, kw[n]["vocab_size"], (2, t), generator=gen) for n, t in sizes.correctness_tokens.items()}
    report.run("2 numerics", numerics.step_correctness, models, device, ids)
    report.run("2 kernels", numerics.step_kernels, device, sizes.kernel_shape)
    report.run("2 chunked CE", numerics.step_chunked_ce, device, sizes.ce_shape)
    report.run("2 packing", packing.step_packing, kw, device, sizes.seq)
    del models
    speed._release(device)
    deadline = report.start + report.budget_s
    report.run("3 train", speed.step_training, sizes.train, world, scratch, sizes.steps, sizes.warmup, deadline)
    report.run("3 nonfinite", speed.step_nonfinite, scratch, world, "bf16")
    low = build_models(kw, device, ("calm", "baseline", "same_size_baseline"), torch.bfloat16)
    blocks = {n: torch.randint(0, kw[n]["vocab_size"], (1, t), generator=gen) for n, t in sizes.brier_tokens.items()}
    report.run("4 brierlm", speed.step_brierlm, low, device, blocks)
    report.run("4 generate", speed.step_generation, {"calm": low["calm"], "baseline": low["same_size_baseline"]},
               device, sizes.gen_tokens, 32, sizes.gen_repeats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bash run.sh gpu-check", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: every step, in about a minute")
    parser.add_argument("--out", default=None, help="the JSON (default runs/gpu_check/gpu_check[-dry-run].json)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="steps that would start later are skipped")
    args = parser.parse_args(argv)
    from pretrain import distributed
    from pretrain.config import REPO_ROOT

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu-check: torch sees no CUDA device here; use --dry-run for the CPU rehearsal", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    out = Path(args.out or REPO_ROOT / "runs" / "gpu_check" / f"gpu_check{'-dry-run' if args.dry_run else ''}.json")
    report = Report(out, "dry-run" if args.dry_run else "gpu", args.budget_s)
    world = distributed.init(device=device)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        run_steps(report, DRY if args.dry_run else GPU, device, world, Path(scratch))
    print(report.table(), flush=True)
    distributed.shutdown()
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
