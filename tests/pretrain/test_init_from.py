"""Starting from existing weights (`init_from`): exact step-0 losses for every stage and layout, ZeRO-3
partitioning of the loaded weights, and a one-line refusal for every kind of mismatch before step 1."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from pretrain.config import ConfigError
from pretrain.distributed import free_port
from pretrain.init_from import check_tokenizer, check_weights, prepare
from pretrain.stages import WeightsMismatch, build_model, load_model
from pretrain.train import check_compatibility

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from init_worker import make_exports  # noqa: E402
from train_worker import tiny_config  # noqa: E402


def _worker(*args: str, launcher: list[str]) -> subprocess.CompletedProcess:
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    return subprocess.run([*launcher, str(HERE / "init_worker.py"), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def test_step0_loss_equals_the_checkpoints_for_every_stage_and_layout(tiny_data_dir, tmp_path):
    """Our exports of the three stages, the authors' CALM layout and a sharded Hugging Face Llama."""
    proc = _worker("exact", str(tiny_data_dir), str(tmp_path), launcher=[sys.executable])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "exact ok" in proc.stdout


@pytest.mark.slow
def test_zero3_two_ranks_partition_the_loaded_weights(tiny_data_dir, tmp_path):
    launcher = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    proc = _worker("zero3", str(tiny_data_dir), str(tmp_path), launcher=launcher)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("zero3 ok") == 2


@pytest.fixture(scope="module")
def exports(tiny_data_dir, tmp_path_factory):
    return make_exports(str(tiny_data_dir), tmp_path_factory.mktemp("exports"))


def _config(stage, data, tmp_path, *extra):
    return tiny_config(stage, str(data), tmp_path / "run", *extra)


def _checks(config, data):
    """What Trainer checks before it builds the engine, in its order, without a process group."""
    from pretrain.data import read_manifest
    from pretrain.stages import get_stage

    source = prepare(config)
    manifest = read_manifest(data)
    model_config = get_stage(config.stage).build_config(config.model, config.ae_path)
    check_compatibility(config, model_config, manifest)
    check_tokenizer(source, manifest, data)
    return source, model_config


def test_the_checkpoint_supplies_the_model_fields(exports, tiny_data_dir, tmp_path):
    config = tiny_config("calm", str(tiny_data_dir), tmp_path, f"ae_path={exports['autoencoder']}",
                         f"init_from={exports['calm']}")
    config.model = {}  # as with configs/finetune.yaml: nothing said about the architecture
    _, model_config = _checks(config, tiny_data_dir)
    assert model_config.hidden_size == 32 and model_config.latent_size == 16 and model_config.vocab_size == 512
    check_weights(build_model("calm", model_config, frozen_ae_outside=True, ae_path=str(exports["autoencoder"])),
                  prepare(config))


@pytest.mark.faults
@pytest.mark.parametrize("case, message", [
    ("kind", "holds an autoencoder (model_type 'autoencoder'), not a calm model"),
    ("nowhere", "no config.json there"),
    ("K", "patch_size: run 2, checkpoint 4"),
    ("latent", "latent_size: run 8, checkpoint 16"),
    ("tokenizer", "was trained on shards of another tokenizer"),
    ("ae_kind", "holds a CALM model (model_type 'energy'), not an autoencoder"),
    ("ae_K", "does not fit this CALM model: patch_size"),
])
def test_refusals_name_the_mismatch(exports, tiny_data_dir, tmp_path, case, message):
    ae, calm = exports["autoencoder"], exports["calm"]
    extra = {"kind": [f"init_from={ae}"], "nowhere": [f"init_from={tmp_path / 'nothing'}"],
             "K": [f"init_from={calm}", "model.patch_size=2"], "latent": [f"init_from={calm}", "model.latent_size=8"],
             "tokenizer": [f"init_from={tmp_path / 'other'}"], "ae_kind": [f"init_from={calm}"],
             "ae_K": [f"init_from={calm}"]}[case]
    ae_path = {"ae_kind": calm, "ae_K": tmp_path / "ae-k2"}.get(case, ae)
    if case == "tokenizer":
        shutil.copytree(calm, tmp_path / "other")
        record = json.loads((calm / "training.json").read_text())
        record["data_tokenizer"]["sha256"] = "0" * 64
        (tmp_path / "other" / "training.json").write_text(json.dumps(record))
    if case == "ae_K":
        shutil.copytree(ae, ae_path)
        config = json.loads((ae / "config.json").read_text())
        (ae_path / "config.json").write_text(json.dumps({**config, "patch_size": 2}))
    config = _config("calm", tiny_data_dir, tmp_path, f"ae_path={ae_path}", *extra)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        _checks(config, tiny_data_dir)
    assert "\n" not in str(err.value)


@pytest.mark.faults
def test_missing_or_unexpected_tensors_are_refused(exports, tiny_data_dir, tmp_path):
    for change, message in (("drop", "missing \\['model.norm.weight'\\]"), ("add", "unexpected \\['extra.weight'\\]"),
                            ("shape", "wrong shape")):
        damaged = tmp_path / change
        shutil.copytree(exports["baseline"], damaged)
        tensors = load_file(damaged / "model.safetensors")
        if change == "drop":
            del tensors["model.norm.weight"]
        elif change == "add":
            tensors["extra.weight"] = tensors["model.norm.weight"].clone()
        else:
            tensors["model.norm.weight"] = tensors["model.norm.weight"][:-1].clone()
        save_file(tensors, damaged / "model.safetensors")
        config = _config("baseline", tiny_data_dir, tmp_path, f"init_from={damaged}")
        source, model_config = _checks(config, tiny_data_dir)
        with pytest.raises(ConfigError, match=message):
            check_weights(build_model("baseline", model_config), source)
        # The loader of exports (evaluation, generation, ae_path) is as strict.
        if change != "shape":
            with pytest.raises(WeightsMismatch, match=message.split(" ")[0]):
                load_model("baseline", damaged)


@pytest.mark.faults
def test_cli_refuses_before_step_one_in_one_line(exports, tiny_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "pretrain", "--stage", "calm", "--config", "finetune", f"init_from={exports['autoencoder']}",
           f"ae_path={exports['autoencoder']}", f"data.path={tiny_data_dir}", f"run_dir={run_dir}", "wandb.mode=disabled"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "holds an autoencoder" in errors[0], proc.stderr[-3000:]
    assert not (run_dir / "metrics.jsonl").exists()


def test_readme_continue_pretraining_command_runs(exports, tiny_data_dir, tmp_path):
    """The README's continue-pretraining command, pointed at a tiny export and data."""
    from tests.readme import command

    words = command("bash run.sh train --stage baseline --config finetune init_from=runs/quickstart/baseline/export "
                     "data.path=runs/quickstart/data")
    run_dir = tmp_path / "continue"
    proc = subprocess.run([*words, f"init_from={exports['baseline']}", f"data.path={tiny_data_dir}", f"run_dir={run_dir}",
                           "max_steps=2", "eval_every=2", "eval_batches=1", "micro_batch_size=4", "wandb.mode=disabled",
                           "export=false"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "validation"]
    assert steps == [0, 2]
