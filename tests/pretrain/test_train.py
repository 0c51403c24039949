"""Training on CPU with real DeepSpeed ZeRO-3 over gloo: stages, exactness, resume, launchers, failures.

The multi-process cases are few subprocess runs that each check several things (start-up dominates
their cost); `train_worker.py` holds the checks that need the engine's internals.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain.config import ConfigError, load_config
from pretrain.distributed import free_port
from pretrain.ds_config import build_ds_config
from pretrain.train import check_compatibility, lr_at

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("train_worker.py")
BIN = Path(sys.executable).parent
TINY_BASELINE = ["model.hidden_size=32", "model.intermediate_size=64", "model.max_position_embeddings=64",
                 "micro_batch_size=4", "wandb.mode=disabled", "optim.warmup_steps=1", "optim.lr=3e-3"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env


def _run(cmd: list[str], timeout: int = 240, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=timeout)


def _train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


@pytest.mark.slow
def test_zero3_two_gloo_ranks_train_every_stage(tiny_data_dir, tmp_path):
    """Partitioned parameters, falling loss, frozen AE outside the engine with exact targets, exports
    that reproduce the engine's outputs (autoencoder, baseline) and embed the autoencoder (CALM)."""
    proc = _run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                 str(WORKER), "stages", str(tiny_data_dir), str(tmp_path)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("stages ok") == 2


@pytest.mark.faults
@pytest.mark.slow
def test_zero3_world1_equals_plain_pytorch_and_nan_policies(tiny_data_dir, tmp_path):
    proc = _run([sys.executable, str(WORKER), "plain", str(tiny_data_dir), str(tmp_path)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "plain ok" in proc.stdout
    proc = _run([sys.executable, str(WORKER), "nonfinite", str(tiny_data_dir), str(tmp_path / "nonfinite")])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "nonfinite ok" in proc.stdout


def _train_cmd(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["bash", "run.sh", "train", "--stage", "baseline", "--config", "baseline-tiny", f"data.path={data_dir}",
            f"run_dir={run_dir}", "max_steps=20", "save_every=10", "eval_every=0", "log_every=1", "export=false",
            *TINY_BASELINE, *extra]


@pytest.mark.faults
@pytest.mark.slow
def test_launchers_sigterm_resume_and_world_size_check(tiny_data_dir, tmp_path):
    """Reference: two torchrun launchers with --nnodes 2 on 127.0.0.1 (world 2). Then NPROC=2 torchrun
    on one node, stopped by SIGTERM, refused at world 1, resumed by two deepspeed launchers with a
    hostfile (--no_ssh, as two nodes): the interrupted run's losses are bit-identical to the reference."""
    reference = tmp_path / "reference"
    port = str(free_port())
    nodes = [subprocess.Popen(_train_cmd(tiny_data_dir, reference), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=_env(NNODES="2", NODE_RANK=str(r), NPROC="1", MASTER_PORT=port))
             for r in (0, 1)]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)

    resumed = tmp_path / "resumed"
    proc = subprocess.Popen(_train_cmd(tiny_data_dir, resumed), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env=_env(NPROC="2", MASTER_PORT=str(free_port())))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        metrics = resumed / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    output = proc.communicate(timeout=120)[0]
    assert "SIGTERM: saved checkpoint at step" in output, output[-3000:]
    tag = (resumed / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(tag.split("_")[1])
    assert 3 <= stopped_at < 20
    assert [r["step"] for r in _train_records(resumed)] == list(range(1, stopped_at + 1))

    wrong_world = _run(_train_cmd(tiny_data_dir, resumed, "--resume"), MASTER_PORT=str(free_port()))
    assert wrong_world.returncode == 2, wrong_world.stderr[-3000:]
    assert "written by 2 ranks but this run has 1" in wrong_world.stderr
    assert "ds_to_universal" in wrong_world.stderr

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = str(free_port())
    nodes = [subprocess.Popen(_train_cmd(tiny_data_dir, resumed, "--resume"), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=_env(LAUNCHER="deepspeed", HOSTFILE=str(hostfile), NNODES="2", NODE_RANK=str(r),
                                       NPROC="1", MASTER_PORT=port))
             for r in (0, 1)]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "--local_rank=0" in outputs[0]
    keys = ("step", "tokens_seen", "loss", "grad_norm", "lr")
    got = [tuple(r[k] for k in keys) for r in _train_records(resumed)]
    want = [tuple(r[k] for k in keys) for r in _train_records(reference)]
    assert got == want
    assert want[-1][2] < want[0][2]
    kept = sorted(p.name for p in (resumed / "checkpoints").glob("step_*"))
    assert len(kept) == 2 and kept[-1] == "step_00000020"  # keep_last=2
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "step_00000020"
    assert all((resumed / "checkpoints" / name / "config.yaml").is_file() for name in kept)


def _config(tmp_path, data_dir, stage="baseline", *extra):
    preset = {"baseline": "baseline-tiny", "autoencoder": "ae-tiny", "calm": "calm-tiny"}[stage]
    return load_config(preset, [f"data.path={data_dir}", f"run_dir={tmp_path / 'run'}", *extra])


def _check(config, manifest):
    from pretrain.stages import get_stage

    check_compatibility(config, get_stage(config.stage).build_config(config.model, config.ae_path), manifest)


def test_incompatible_data_and_autoencoder_are_refused_before_training(tiny_data_dir, tmp_path):
    from pretrain.data import read_manifest
    from pretrain.models import AutoencoderConfig

    manifest = read_manifest(tiny_data_dir)
    _check(_config(tmp_path, tiny_data_dir), manifest)
    with pytest.raises(ConfigError, match="vocab_size 1024 but the tokenizer .* has 512 tokens"):
        _check(_config(tmp_path, tiny_data_dir, "baseline", "model.vocab_size=1024"), manifest)
    with pytest.raises(ConfigError, match="not a multiple of .*patch size K=3"):
        _check(_config(tmp_path, tiny_data_dir, "autoencoder", "model.patch_size=3"), manifest)
    with pytest.raises(ConfigError, match="needs ae_path"):
        _check(_config(tmp_path, tiny_data_dir, "calm", "ae_path=null"), manifest)
    with pytest.raises(ConfigError, match="no config.json"):
        _check(_config(tmp_path, tiny_data_dir, "calm", f"ae_path={tmp_path / 'none'}"), manifest)
    calm_export = tmp_path / "calm_export"
    calm_export.mkdir()
    (calm_export / "config.json").write_text(json.dumps({"model_type": "energy"}))
    with pytest.raises(ConfigError, match=r"holds a CALM model \(model_type 'energy'\), not an autoencoder"):
        _check(_config(tmp_path, tiny_data_dir, "calm", f"ae_path={calm_export}"), manifest)
    ae_dir = tmp_path / "ae"
    AutoencoderConfig(vocab_size=512, latent_size=16, patch_size=4).save_pretrained(ae_dir)
    with pytest.raises(ConfigError, match="latent_size: autoencoder 16 vs calm 32"):
        _check(_config(tmp_path, tiny_data_dir, "calm", f"ae_path={ae_dir}", "model.latent_size=32"),
                            manifest)
    AutoencoderConfig(vocab_size=512, latent_size=32, patch_size=4).save_pretrained(ae_dir)
    _check(_config(tmp_path, tiny_data_dir, "calm", f"ae_path={ae_dir}", "model.latent_size=32"), manifest)
    (ae_dir / "training.json").write_text(json.dumps({"data_tokenizer": {"sha256": "0" * 64}}))
    with pytest.raises(ConfigError, match="shards of another tokenizer"):
        _check(_config(tmp_path, tiny_data_dir, "calm", f"ae_path={ae_dir}", "model.latent_size=32"),
                            manifest)


def test_ds_config_gets_batch_sizes_from_the_training_config(tiny_data_dir, tmp_path):
    config = _config(tmp_path, tiny_data_dir, "baseline", "micro_batch_size=3", "grad_accum_steps=5")
    ds = build_ds_config(config, 4, "bf16", REPO)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (3, 5, 60)
    assert ds["bf16"]["enabled"] is True and ds["gradient_clipping"] == 1.0
    for name in ("zero2.json", "zero3_offload.json", "zero3_universal.json"):
        config.ds_config = f"ds_configs/{name}"
        assert build_ds_config(config, 2, "fp32", REPO)["train_batch_size"] == 30
    template = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    template["train_batch_size"] = 64
    (tmp_path / "fixed.json").write_text(json.dumps(template))
    config.ds_config = str(tmp_path / "fixed.json")
    with pytest.raises(ConfigError, match="train_batch_size=64 disagrees"):
        build_ds_config(config, 4, "fp32", REPO)


def test_bf16_accumulates_gradients_in_fp32_and_offload_uses_deepspeeds_cpu_adam(tiny_data_dir, tmp_path):
    from functools import partial

    from pretrain.train import optimizer_class

    config = _config(tmp_path, tiny_data_dir, "baseline", "grad_accum_steps=8")
    for name in ("zero2.json", "zero3.json", "zero3_offload.json", "zero3_universal.json"):
        config.ds_config = f"ds_configs/{name}"
        assert build_ds_config(config, 2, "bf16", REPO)["data_types"] == {"grad_accum_dtype": "fp32"}, name
        assert "data_types" not in build_ds_config(config, 2, "fp32", REPO), name
    assert optimizer_class(build_ds_config(config, 2, "bf16", REPO)) is torch.optim.AdamW  # universal: no offload
    config.ds_config = "ds_configs/zero3_offload.json"
    cpu_adam = optimizer_class(build_ds_config(config, 2, "bf16", REPO))
    assert isinstance(cpu_adam, partial) and cpu_adam.func.__name__ == "DeepSpeedCPUAdam"
    assert cpu_adam.keywords == {"adamw_mode": True}
    template = json.loads((REPO / "ds_configs" / "zero3.json").read_text()) | {"data_types": {"grad_accum_dtype": "bf16"}}
    (tmp_path / "bf16_accum.json").write_text(json.dumps(template))
    config.ds_config = str(tmp_path / "bf16_accum.json")
    with pytest.raises(ConfigError, match="grad_accum_dtype='bf16' disagrees"):
        build_ds_config(config, 2, "bf16", REPO)


def test_precision_bf16_only_where_the_gpu_has_it(tiny_data_dir, tmp_path, monkeypatch):
    from pretrain.train import resolve_precision

    auto = _config(tmp_path, tiny_data_dir, "baseline")
    bf16 = _config(tmp_path, tiny_data_dir, "baseline", "precision=bf16")
    assert resolve_precision(auto, torch.device("cpu")) == "fp32"
    assert resolve_precision(bf16, torch.device("cpu")) == "bf16"  # CPU autocast/AMX
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert resolve_precision(auto, gpu) == "fp32"
    with pytest.raises(ConfigError, match="V100.*no bf16 support"):
        resolve_precision(bf16, gpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_precision(auto, gpu) == "bf16"


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0), ("NVIDIA H800", 989.0),
    ("NVIDIA GH200 480GB", 989.0), ("NVIDIA B200", 2250.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA L40S", 362.0), ("NVIDIA L40", 181.0), ("NVIDIA L4", 121.0), ("Tesla V100-SXM2-16GB", None),
])
def test_mfu_peak_table_matches_whole_names(name, peak):
    from pretrain.metrics import peak_tflops_of

    assert peak_tflops_of(name) == peak


def test_learning_rate_schedule(tiny_data_dir, tmp_path):
    config = _config(tmp_path, tiny_data_dir, "baseline", "optim.lr=1.0", "optim.warmup_steps=4", "max_steps=14",
                     "optim.schedule=cosine", "optim.min_lr_ratio=0.1")
    lrs = [lr_at(config, s) for s in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0) and lrs[9] == pytest.approx(0.55) and lrs[13] > 0.1
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    config.optim.schedule = "constant"
    assert [lr_at(config, s) for s in (4, 13)] == [1.0, 1.0]


def test_metrics_log_and_wandb_offline_without_api_key(tmp_path, monkeypatch):
    from pretrain.config import WandbConfig
    from pretrain.metrics import MetricsLogger, wandb_mode

    dirs = ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")
    for name in ("WANDB_API_KEY", "WANDB_MODE", *dirs):
        monkeypatch.delenv(name, raising=False)
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    assert wandb_mode("disabled") == "disabled"
    monkeypatch.delenv("WANDB_API_KEY")
    logger = MetricsLogger(tmp_path / "run", True, WandbConfig(mode="auto"), {"stage": "baseline"})
    logger.log({"split": "train", "step": 1, "loss": float("nan"), "lr": 0.1})
    logger.log({"split": "validation", "step": 1, "ce": 2.5})
    run_id = logger.run_id
    logger.close()
    assert all(os.environ.pop(name).startswith(str(tmp_path / "run" / "wandb")) for name in dirs)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"split": "train", "step": 1, "loss": None, "lr": 0.1}, {"split": "validation", "step": 1, "ce": 2.5}]
    assert run_id and list((tmp_path / "run" / "wandb").rglob(f"offline-run-*{run_id}"))
    assert MetricsLogger(tmp_path / "other", False, WandbConfig(mode="auto")).run is None
    assert not (tmp_path / "other").exists()


@pytest.mark.slow
def test_brierlm_and_energy_terms_are_logged_while_training(tiny_data_dir, tmp_path):
    """Each validation of CALM and the baseline carries BrierLM of a fixed subsample; CALM's training
    records carry the energy loss's two terms."""
    common = [f"data.path={tiny_data_dir}", "max_steps=4", "eval_every=4", "eval_batches=1", "log_every=2",
              "micro_batch_size=4", "wandb.mode=disabled"]
    runs = (("autoencoder", "ae-tiny", []), ("baseline", "baseline-tiny", []),
            ("calm", "calm-tiny", [f"ae_path={tmp_path / 'autoencoder' / 'export'}"]))
    for stage, preset, extra in runs:
        proc = _run([sys.executable, "-m", "pretrain", "--stage", stage, "--config", preset, *common,
                     f"run_dir={tmp_path / stage}", *extra])
        assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("baseline", "calm"):
        records = [json.loads(line) for line in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]
        val = [r for r in records if r["split"] == "validation"][-1]
        assert {"brierlm", "brierlm_se", "brier_1", "brier_4"} <= set(val) and val["brier_positions"] > 0, val
        if stage == "calm":
            train = [r for r in records if r["split"] == "train"][-1]
            assert train["loss"] == pytest.approx(train["fidelity"] - train["diversity"], rel=1e-5)


@pytest.mark.slow
def test_match_flops_gives_a_run_within_one_step_of_the_target(tiny_data_dir, tmp_path):
    """--match-flops RUN reads RUN's training FLOPs and trains the fewest steps that reach them."""
    reference = tmp_path / "reference"
    reference.mkdir()
    common = ["--stage", "baseline", "--config", "baseline-tiny", f"data.path={tiny_data_dir}", *TINY_BASELINE,
              "eval_every=0", "log_every=1", "export=false"]
    dry = _run([sys.executable, "-m", "pretrain", *common, "--dry-run"])
    per_step = float(dry.stdout.split("per token, ")[1].split(" per optimizer step")[0])
    target = 3.4 * per_step  # what a CALM run might have spent
    (reference / "metrics.jsonl").write_text(json.dumps({"split": "train", "step": 7, "train_flops": target}) + "\n")
    proc = _run([sys.executable, "-m", "pretrain", *common, f"run_dir={tmp_path / 'matched'}",
                 "--match-flops", str(reference)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 steps of" in proc.stdout
    spent = _train_records(tmp_path / "matched")[-1]["train_flops"]
    assert target <= spent < target + per_step
    missing = _run([sys.executable, "-m", "pretrain", *common, "--match-flops", str(tmp_path / "none")])
    assert missing.returncode == 2 and "no metrics.jsonl there" in missing.stderr


def test_match_flops_can_charge_calm_its_autoencoder(tmp_path):
    from pretrain.metrics import run_train_flops

    ae, calm = tmp_path / "ae", tmp_path / "calm"
    for run, flops in ((ae, 2e9), (calm, 5e9)):
        run.mkdir()
        (run / "metrics.jsonl").write_text(json.dumps({"split": "train", "step": 3, "train_flops": flops}) + "\n")
    (calm / "config.yaml").write_text(f"stage: calm\nae_path: {ae / 'export'}\n")
    assert run_train_flops(calm) == 5e9
    assert run_train_flops(calm, with_autoencoder=True) == 7e9
    with pytest.raises(ConfigError, match="no autoencoder run found"):
        run_train_flops(ae, with_autoencoder=True)
