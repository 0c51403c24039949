"""Worker processes for test_init_from.py: runs that start from existing weights, under a launcher.

    python tests/pretrain/init_worker.py exact DATA_DIR OUT_DIR
    torchrun --nproc_per_node 2 tests/pretrain/init_worker.py zero3 DATA_DIR OUT_DIR

`exact`: for each stage, an export of random tiny weights (and, for CALM, the same weights in the
authors' layout; for the baseline, a plain Hugging Face Llama saved in shards) is the `init_from` of
a ZeRO-3 run; its step-0 validation loss must equal the loaded model's own loss on the same batches
(fp32, CPU, <= 1e-6). `zero3`: on 2 ranks the loaded weights are partitioned and equal the export's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from authors_layout import save_in_authors_layout  # noqa: E402
from train_worker import check_partitioned, tiny_config, write_ds_config  # noqa: E402

from pretrain import distributed  # noqa: E402


def make_exports(data_dir: str, out: Path) -> dict[str, Path]:
    """Random tiny models of each stage saved as our exports (and two foreign layouts); paths by name."""
    from pretrain.data import load_tokenizer, read_manifest
    from pretrain.export import save_export
    from pretrain.models import CALM
    from pretrain.stages import build_model

    manifest, tokenizer = read_manifest(data_dir), load_tokenizer(data_dir)
    training = {"block_len": manifest["block_len"], "data_tokenizer": manifest["tokenizer"]}
    paths = {}
    torch.manual_seed(7)
    for stage in ("autoencoder", "calm", "baseline"):
        extra = [f"ae_path={out / 'autoencoder'}"] if stage == "calm" else []
        config = tiny_config(stage, data_dir, out / "unused", *extra)
        model = build_model(stage, config.model, config.ae_path if stage == "calm" else None)
        for name, param in model.named_parameters():  # not the initialisation a fresh run would draw anyway
            if not name.startswith("ae_model."):  # CALM's frozen autoencoder stays the one at ae_path
                param.data.add_(torch.randn_like(param) * 0.02)
        paths[stage] = save_export(model, stage, tokenizer, out / stage, {"stage": stage, **training}, manifest, None)
    # The authors' layout: .bin state dicts, the head repeated as generative_head.*, an absolute ae_path.
    paths["authors-calm"] = save_in_authors_layout(CALM.from_pretrained(paths["calm"]), out / "authors-calm")
    # A plain Hugging Face Llama directory, sharded, with the data's tokenizer.
    from transformers import LlamaForCausalLM

    hf = out / "hf-llama"
    LlamaForCausalLM.from_pretrained(paths["baseline"]).save_pretrained(hf, max_shard_size="20KB")
    tokenizer.save_pretrained(hf)
    paths["hf-llama"] = hf
    return paths


def reference_loss(trainer, model) -> float:
    """The model's own validation loss on the batches the trainer validates with (same seed and order)."""
    from pretrain.stages import get_stage

    config = trainer.config
    loader = trainer.val_loaders[""]
    loader.load_state_dict(trainer.val_starts[""])
    total = 0.0
    with torch.no_grad():
        torch.manual_seed(config.seed)
        for _, batch in zip(range(config.eval_batches), loader):
            if config.stage == "autoencoder":
                total += model(input_ids=batch, ce_chunk_rows=config.ce_chunk_rows).loss.item()
            else:
                total += get_stage(config.stage).objective(model, batch, ce_chunk_rows=config.ce_chunk_rows).loss.item()
    return total / config.eval_batches


def case_exact(data_dir: str, out: Path) -> None:
    from pretrain.models import CALM
    from pretrain.stages import load_model
    from pretrain.train import Trainer

    world = distributed.init()
    write_ds_config(out)
    paths = make_exports(data_dir, out)
    ae = str(paths["autoencoder"])
    runs = [("autoencoder", "autoencoder", []), ("calm", "calm", [f"ae_path={ae}"]),
            ("calm", "authors-calm", [f"ae_path={ae}"]), ("baseline", "baseline", []), ("baseline", "hf-llama", [])]
    for stage, source, extra in runs:
        run_dir = out / f"run-{source}"
        config = tiny_config(stage, data_dir, run_dir, f"init_from={paths[source]}", "max_steps=1",
                             "eval_every=1", *extra)
        trainer = Trainer(config, world)
        assert trainer.run() == 0
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        start = next(r for r in records if r["split"] == "validation" and r["step"] == 0)
        if source == "authors-calm":
            model = CALM.from_pretrained(paths[source], ae_path=ae).eval()
        else:
            model = load_model(stage, paths[source], **({"ae_path": ae} if stage == "calm" else {})).eval()
        want = reference_loss(trainer, model)
        assert abs(start["loss"] - want) <= 1e-6, (source, start["loss"], want)
        print(f"{source}: step-0 loss {start['loss']:.8f}, the checkpoint's own {want:.8f}", flush=True)
        trainer.engine.destroy()
        if source == "baseline":
            # A checkpoint in run_dir wins over init_from: the run resumes at step 1 (no second step 0).
            config = tiny_config(stage, data_dir, run_dir, f"init_from={paths[source]}", "max_steps=2", "eval_every=1")
            resumed = Trainer(config, world, resume=True)
            assert resumed.run() == 0
            steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                     if json.loads(line)["split"] == "validation"]
            assert steps == [0, 1, 2], steps
            resumed.engine.destroy()
    print("exact ok", flush=True)


def case_zero3(data_dir: str, out: Path) -> None:
    import deepspeed

    from pretrain.init_from import TensorStore
    from pretrain.train import Trainer

    world = distributed.init()
    if world.is_main:
        write_ds_config(out)
        make_exports(data_dir, out / "exports")
    distributed.barrier()
    paths = out / "exports"
    for stage in ("calm", "baseline"):
        extra = [f"ae_path={paths / 'autoencoder'}"] if stage == "calm" else []
        config = tiny_config(stage, data_dir, out / f"run-{stage}", f"init_from={paths / stage}", *extra)
        trainer = Trainer(config, world)
        module = trainer.engine.module
        check_partitioned(trainer.engine, world)
        store = TensorStore(paths / stage)
        for name, param in module.named_parameters():
            with deepspeed.zero.GatheredParameters([param]):
                assert torch.equal(param.data, store.get(name)), f"{stage}: {name} differs from the export"
        trainer.engine.destroy()
        distributed.barrier()
    print("zero3 ok", flush=True)


if __name__ == "__main__":
    case, data, out_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    out_dir.mkdir(parents=True, exist_ok=True)
    {"exact": case_exact, "zero3": case_zero3}[case](data, out_dir)
    distributed.shutdown()
