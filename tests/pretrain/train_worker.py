"""Worker processes for test_train.py: checks that need the engine's internals, run under a launcher.

    torchrun --nproc_per_node 2 tests/pretrain/train_worker.py stages DATA_DIR OUT_DIR
    python tests/pretrain/train_worker.py plain DATA_DIR OUT_DIR

Each case trains real (tiny) models through `pretrain.train.Trainer` and asserts; a failed assertion
makes the process exit non-zero, which the calling test reports with this process's output.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pretrain import distributed  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.state import TrainState  # noqa: E402

TINY = {
    "autoencoder": ["model.hidden_size=32", "model.intermediate_size=64", "model.latent_size=16"],
    "calm": ["model.hidden_size=32", "model.intermediate_size=64", "model.latent_size=16",
             "model.num_target_samples=8", "model.max_position_embeddings=64"],
    "baseline": ["model.hidden_size=32", "model.intermediate_size=64", "model.max_position_embeddings=64"],
}
PRESET = {"autoencoder": "ae-tiny", "calm": "calm-tiny", "baseline": "baseline-tiny"}


def tiny_config(stage: str, data_dir: str, run_dir: Path, *extra: str):
    overrides = [f"data.path={data_dir}", f"run_dir={run_dir}", "wandb.mode=disabled", "micro_batch_size=4",
                 "max_steps=8", "optim.lr=3e-3", "optim.warmup_steps=1", "save_every=0", "eval_every=0",
                 "eval_batches=2", "log_every=1", f"ds_config={run_dir.parent / 'zero3_t0.json'}", *TINY[stage], *extra]
    return load_config(PRESET[stage], overrides)


def write_ds_config(out: Path) -> None:
    """zero3.json with partitioning down to the smallest tensor, so a tiny model is really sharded."""
    ds = json.loads((Path(__file__).resolve().parents[2] / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (out / "zero3_t0.json").write_text(json.dumps(ds))


def train_losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"]


def check_partitioned(engine, world) -> None:
    params = list(engine.module.parameters())
    local = sum(p.ds_tensor.numel() for p in params)
    total = sum(p.ds_numel for p in params)
    counts = [torch.zeros(1, dtype=torch.long) for _ in range(world.world_size)]
    torch.distributed.all_gather(counts, torch.tensor([local]))
    # Each tensor is split into world_size equal pieces (the last one padded).
    assert local == sum(math.ceil(p.ds_numel / world.world_size) for p in params), (local, total)
    assert all(c.item() == local for c in counts)
    assert total <= sum(c.item() for c in counts) < total + world.world_size * len(params)
    assert all(p.numel() == 0 for p in params), "parameters are still gathered outside forward"


def case_stages(data_dir: str, out: Path) -> None:
    """ZeRO-3 on 2 gloo ranks, each stage: real partitioning, falling loss, exact AE targets, export."""
    from transformers import AutoModel, AutoModelForCausalLM

    from pretrain.export import export_run
    from pretrain.models import Autoencoder
    from pretrain.stages import build_model
    from pretrain.train import Trainer

    world = distributed.init()
    if world.is_main:
        write_ds_config(out)
    distributed.barrier()
    batch = None
    for stage in ("autoencoder", "calm", "baseline"):
        run_dir = out / stage
        extra = [f"ae_path={out / 'autoencoder' / 'export'}"] if stage == "calm" else []
        config = tiny_config(stage, data_dir, run_dir, *extra)
        trainer = Trainer(config, world)
        engine = trainer.engine
        check_partitioned(engine, world)
        batch = next(iter(trainer.loader))
        if stage == "calm":
            names = [n for n, _ in engine.module.named_parameters()]
            assert not any(n.startswith("ae_model.") for n in names), "frozen AE reached the engine"
            reference = Autoencoder.from_pretrained(config.ae_path).eval()
            with torch.no_grad():
                got = engine.module.target_posterior(batch)
                want = reference.encode(batch)
            assert all(torch.equal(g, w) for g, w in zip(got, want)), "CALM targets differ from the trained AE"
        if stage == "baseline":
            # Partitioned at construction: the model never existed whole on a rank.
            model = build_model("baseline", config.model, zero3_config=trainer.ds_config, device=world.device)
            assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters())
            del model
        assert trainer.run() == 0
        if world.is_main:
            losses = train_losses(run_dir)
            assert len(losses) == config.max_steps
            assert sum(losses[-3:]) / 3 < losses[0], f"{stage}: loss did not fall: {losses}"
            export_run(run_dir)
        distributed.barrier()
        engine.eval()
        with torch.no_grad():
            trained = engine(input_ids=batch).logits if stage != "calm" else None
        if world.is_main and stage != "calm":
            loader = AutoModelForCausalLM if stage == "baseline" else AutoModel
            exported = loader.from_pretrained(str(run_dir / "export")).eval()
            with torch.no_grad():
                torch.testing.assert_close(exported(input_ids=batch).logits, trained, rtol=1e-5, atol=1e-5)
        if world.is_main and stage == "calm":
            exported = AutoModel.from_pretrained(str(run_dir / "export"))
            reference = Autoencoder.from_pretrained(config.ae_path)
            for name, tensor in reference.state_dict().items():
                assert torch.equal(exported.ae_model.state_dict()[name], tensor), name
        engine.destroy()
        distributed.barrier()
    print("stages ok", flush=True)


def case_plain(data_dir: str, out: Path) -> None:
    """ZeRO-3 at world 1 takes the same steps as plain PyTorch; a NaN loss stops with a checkpoint."""
    import deepspeed
    from transformers import LlamaForCausalLM

    from pretrain.data import ShardLoader
    from pretrain.train import Trainer, TrainingError, lr_at, param_groups

    world = distributed.init()
    write_ds_config(out)
    config = tiny_config("baseline", data_dir, out / "zero", "max_steps=5")
    trainer = Trainer(config, world)
    module = trainer.engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        initial = {k: v.detach().clone() for k, v in module.state_dict().items()}
    plain = LlamaForCausalLM(module.config)
    plain.load_state_dict(initial)
    optimizer = torch.optim.AdamW(param_groups(plain, config.optim.weight_decay), lr=config.optim.lr,
                                  betas=(config.optim.beta1, config.optim.beta2), eps=config.optim.eps)
    loader = iter(ShardLoader(config.data.path, "train", config.micro_batch_size, seed=config.seed))
    expected = []
    for step in range(config.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(config, step)
        batch = next(loader)
        loss = plain(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), config.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad()
        expected.append(loss.item())
    assert trainer.run() == 0
    got = train_losses(out / "zero")
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-6, atol=0)
    trainer.engine.destroy()

    # An absurd learning rate overflows the weights after the first update: non-finite loss at step 2.
    for policy in ("stop", "skip"):
        run_dir = out / f"nan_{policy}"
        config = tiny_config("baseline", data_dir, run_dir, "max_steps=4", "optim.lr=1e30", "optim.grad_clip=0",
                             f"nan_policy={policy}")
        trainer = Trainer(config, world)
        if policy == "stop":
            try:
                trainer.run()
            except TrainingError as exc:
                assert "non-finite" in str(exc) and "at step 2" in str(exc), exc
            else:
                raise AssertionError("a NaN loss did not stop training")
            assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000001"
        else:
            assert trainer.run() == 0
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            assert sum(r.get("skipped_steps", 0) for r in records) >= 1, records
        trainer.engine.destroy()
    print("plain ok", flush=True)


def case_nonfinite(data_dir: str, out: Path) -> None:
    """bf16 on ZeRO-3 (fp32 gradient accumulation): a step whose gradients are NaN is refused, and no
    checkpoint written afterwards holds a non-finite value; weights that are not finite are never saved."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    import pretrain.train as train
    from pretrain.train import Trainer, TrainingError

    world = distributed.init()
    write_ds_config(out)
    real_forward, calls = train.forward, {"n": 0}

    def poisoned_forward(engine, stage, batch, **options):  # NaN loss on the 2nd micro-batch of step 3
        out = real_forward(engine, stage, batch, **options)
        calls["n"] += 1
        if calls["n"] == 6:
            out.loss = out.loss * float("nan")
        return out

    train.forward = poisoned_forward
    for policy in ("skip", "stop"):
        calls["n"] = 0
        run_dir = out / f"bf16_{policy}"
        config = tiny_config("baseline", data_dir, run_dir, "max_steps=5", "precision=bf16", "grad_accum_steps=2",
                             f"nan_policy={policy}")
        trainer = Trainer(config, world)
        assert trainer.ds_config["data_types"]["grad_accum_dtype"] == "fp32"
        assert trainer.engine.optimizer.gradient_accumulation_dtype == torch.float32
        if policy == "skip":
            assert trainer.run() == 0
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            assert [r["skipped_steps"] for r in records] == [0, 0, 1, 0, 0], records
        else:
            try:
                trainer.run()
            except TrainingError as exc:
                assert "at step 3" in str(exc), exc
            else:
                raise AssertionError("a NaN step did not stop training")
        tag = (run_dir / "checkpoints" / "latest").read_text()
        assert tag == ("step_00000005" if policy == "skip" else "step_00000002"), tag
        state = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=tag)
        assert all(torch.isfinite(t).all() for t in state.values()), "a saved checkpoint holds NaN/Inf"
        if policy == "skip":
            # Weights that are no longer finite are refused at save time; the earlier checkpoint stays latest.
            param = next(iter(trainer.engine.module.parameters()))
            param.ds_tensor.data.fill_(float("nan"))
            try:
                trainer._save(TrainState(step=6, rng={}))
            except TrainingError as exc:
                assert "NaN/Inf" in str(exc), exc
            else:
                raise AssertionError("non-finite weights were saved")
            assert not (run_dir / "checkpoints" / "step_00000006").exists()
            assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000005"
        trainer.engine.destroy()
    train.forward = real_forward
    print("nonfinite ok", flush=True)


if __name__ == "__main__":
    case, data, out_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    out_dir.mkdir(parents=True, exist_ok=True)
    {"stages": case_stages, "plain": case_plain, "nonfinite": case_nonfinite}[case](data, out_dir)
    distributed.shutdown()
