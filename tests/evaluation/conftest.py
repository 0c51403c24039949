"""`tiny_runs`: real tiny baseline / autoencoder / CALM run directories, as training leaves them.

Each is trained for a few optimizer steps on `tiny_data_dir`'s shards (so its predictions are not
uniform) and laid out like a run of `python -m pretrain`: `metrics.jsonl` with training and
validation records (step, tokens_seen, loss, lr, train_flops) and `export/` with the model, the
data's tokenizer and `training.json`.
"""

import json

import pytest
import torch

TINY = dict(hidden_size=32, intermediate_size=64)
LLAMA = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)


def _train_and_export(stage, model, data_dir, run_dir, steps=12, batch=4):
    from pretrain.data import ShardLoader, load_tokenizer
    from pretrain.models.flops import train_flops_per_token

    torch.manual_seed(1)
    loader = ShardLoader(str(data_dir), "train", batch, seed=0)
    val = next(iter(ShardLoader(str(data_dir), "validation", batch, shuffle=False, drop_last=False)))
    k = getattr(model.config, "patch_size", 1)
    context = loader.block_len // k if stage == "calm" else loader.block_len
    per_token = train_flops_per_token(model.config, stage, context)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    run_dir.mkdir(parents=True)
    with (run_dir / "metrics.jsonl").open("w") as fh:
        for step, ids in zip(range(1, steps + 1), loader):
            model.train()
            loss = model(input_ids=ids, labels=ids).loss if stage == "baseline" else model(input_ids=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            tokens = step * ids.numel()
            fh.write(json.dumps({"split": "train", "step": step, "tokens_seen": tokens, "loss": loss.item(),
                                 "lr": 3e-3, "train_flops": per_token * tokens}) + "\n")
            if step % 4 == 0:
                model.eval()
                with torch.no_grad():
                    vloss = model(input_ids=val, labels=val).loss if stage == "baseline" else model(input_ids=val).loss
                fh.write(json.dumps({"split": "validation", "step": step, "tokens_seen": tokens,
                                     "loss": vloss.item()}) + "\n")
    export = run_dir / "export"
    model.eval().save_pretrained(export)
    load_tokenizer(data_dir).save_pretrained(export)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    (export / "training.json").write_text(json.dumps({"stage": stage, "step": steps, "tokens_seen": tokens,
                                                      "block_len": loader.block_len,
                                                      "data_tokenizer": manifest["tokenizer"]}))
    return model


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, tiny_data_dir):
    """{"baseline": run_dir, "autoencoder": run_dir, "calm": run_dir} under one runs/ directory."""
    from pretrain.stages import build_model

    vocab = json.loads((tiny_data_dir / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    baseline = build_model("baseline", dict(vocab_size=vocab, **TINY, **LLAMA), device="cpu")
    _train_and_export("baseline", baseline, tiny_data_dir, root / "baseline-tiny")
    ae_kwargs = dict(vocab_size=vocab, **TINY, latent_size=8, patch_size=4)
    ae = build_model("autoencoder", ae_kwargs, device="cpu")
    ae = _train_and_export("autoencoder", ae, tiny_data_dir, root / "ae-tiny")
    calm = build_model("calm", dict(vocab_size=vocab, **TINY, **LLAMA, latent_size=8, patch_size=4, num_mlp_layers=1,
                                    num_samples=4, num_target_samples=8, ae_config=ae_kwargs), device="cpu")
    calm.ae_model.load_state_dict(ae.state_dict())
    _train_and_export("calm", calm, tiny_data_dir, root / "calm-tiny")
    return {"baseline": root / "baseline-tiny", "autoencoder": root / "ae-tiny", "calm": root / "calm-tiny"}
