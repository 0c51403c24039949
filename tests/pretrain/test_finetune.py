"""Training on fine-tuning (loss-masked) shards: loader, masked objectives, checks, generation, a tiny run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml

from data_prep.__main__ import main as data_prep
from data_prep.toy_tasks import lines
from pretrain.config import ConfigError
from pretrain.data import MaskedBatch, ShardLoader
from pretrain.finetune import check_data
from pretrain.models.generation import calm_generate, left_pad
from pretrain.stages import build_model, get_stage

REPO = Path(__file__).resolve().parents[2]
K = 4
BASELINE = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=64)
AE = dict(vocab_size=512, hidden_size=32, intermediate_size=64, latent_size=8, patch_size=K)
CALM_KW = {**BASELINE, "latent_size": 8, "patch_size": K, "num_mlp_layers": 1, "num_samples": 4,
           "num_target_samples": 16, "ae_config": AE, "pad_token_id": 1, "eos_token_id": 0}


@pytest.fixture(scope="module")
def sft_dir(tiny_data_dir, tmp_path_factory):
    """Fine-tuning shards of 200 toy records (blocks of 64, K = 4) with the tiny data's tokenizer."""
    out = tmp_path_factory.mktemp("sft")
    (out / "toy.jsonl").write_text("\n".join(lines(200, 0)) + "\n")
    data_prep(["--finetune", "--input", str(out / "toy.jsonl"), "--tokenizer", str(tiny_data_dir), "--block-len",
               "64", "--patch-size", str(K), "--val-fraction", "0.1", "--no-progress", "--output", str(out / "data")])
    return out / "data"


def _batch(sft_dir, n=4) -> MaskedBatch:
    return next(iter(ShardLoader(sft_dir, "train", n, shuffle=False)))


def test_loader_gives_masks_and_resumes_exactly(sft_dir):
    loader = ShardLoader(sft_dir, "train", 4, seed=3)
    assert loader.masked
    stream = iter(loader)
    first = [next(stream) for _ in range(3)]
    assert all(isinstance(b, MaskedBatch) and b.input_ids.shape == b.loss_mask.shape == (4, 64) for b in first)
    assert first[0].input_ids.dtype == torch.long and first[0].loss_mask.dtype == torch.bool
    state = loader.state_dict()
    expected = [next(stream) for _ in range(2)]
    resumed = ShardLoader(sft_dir, "train", 4, seed=3)
    resumed.load_state_dict(state)
    again = iter(resumed)
    for want in expected:
        got = next(again)
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.loss_mask, want.loss_mask)


def _loss_and_grads(model, batch, **options):
    model.zero_grad()
    loss = get_stage(options.pop("stage")).objective(model, batch, **options).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _after_response(batch: MaskedBatch) -> torch.Tensor:
    """Positions after each row's last scored token (right padding)."""
    pos = torch.arange(batch.loss_mask.shape[1])
    last = (batch.loss_mask * pos).amax(1, keepdim=True)
    return pos > last


@pytest.mark.parametrize("rows", [0, 16])
def test_baseline_scores_only_response_tokens(sft_dir, rows):
    torch.manual_seed(0)
    model = build_model("baseline", BASELINE)
    batch = _batch(sft_dir)
    loss, grads = _loss_and_grads(model, batch, stage="baseline", ce_chunk_rows=rows)
    logits = model(input_ids=batch.input_ids).logits[:, :-1]
    scored = batch.loss_mask[:, 1:]
    manual = F.cross_entropy(logits[scored].float(), batch.input_ids[:, 1:][scored])
    torch.testing.assert_close(loss, manual.detach(), rtol=1e-5, atol=1e-6)
    # unscored targets (the padding after each response) give nothing: other tokens there change nothing
    noisy = batch.input_ids.masked_fill(_after_response(batch), 17)
    loss2, grads2 = _loss_and_grads(model, MaskedBatch(noisy, batch.loss_mask), stage="baseline", ce_chunk_rows=rows)
    assert torch.equal(loss, loss2) and all(torch.equal(grads[n], grads2[n]) for n in grads)


def _calm():
    torch.manual_seed(0)
    model = build_model("calm", CALM_KW)
    with torch.no_grad():
        for p in model.mlp_generator.final_layer.parameters():
            p.normal_(0, 0.1)
    return model


def test_calm_scores_only_chunks_holding_response_tokens(sft_dir, monkeypatch):
    model, batch = _calm(), _batch(sft_dir)
    chunks = batch.loss_mask[:, K:].reshape(4, -1, K)
    scored = chunks.any(-1)
    assert (chunks.all(-1) | ~chunks.any(-1))[:, :2].all()  # the response starts on a chunk boundary

    def run(perturb: bool):
        torch.manual_seed(5)
        if perturb:  # other targets for every unscored chunk (prompt chunks, padding)
            original = type(model).target_posterior

            def moved(ids):
                mu, log_sigma = original(model, ids)
                return torch.where(scored[..., None], mu, mu + 3.0), torch.where(scored[..., None], log_sigma, 0.5)

            monkeypatch.setattr(model, "target_posterior", moved)
        out = _loss_and_grads(model, batch, stage="calm")
        monkeypatch.undo()
        return out

    loss, grads = run(False)
    loss2, grads2 = run(True)
    assert torch.equal(loss, loss2) and all(torch.equal(grads[n], grads2[n]) for n in grads)
    # all-ones mask: the pretraining loss
    torch.manual_seed(5)
    full = model(input_ids=batch.input_ids, loss_mask=torch.ones_like(batch.loss_mask)).loss
    torch.manual_seed(5)
    torch.testing.assert_close(full, model(input_ids=batch.input_ids).loss)


def test_masked_data_is_refused_where_it_cannot_train(sft_dir):
    loader = ShardLoader(sft_dir, "train", 4)
    config = SimpleNamespace(stage="calm", data=SimpleNamespace(path=str(sft_dir)))
    assert check_data(config, SimpleNamespace(patch_size=K), loader)
    with pytest.raises(ConfigError, match="aligned to K=4 .* patch_size 2"):
        check_data(config, SimpleNamespace(patch_size=2), loader)
    with pytest.raises(ConfigError, match="autoencoder stage trains on pretraining shards only"):
        check_data(SimpleNamespace(stage="autoencoder", data=config.data), None, loader)



def test_a_mixture_of_finetuning_sets_keeps_every_row_with_its_mask(sft_dir, tiny_data_dir):
    """Two fine-tuning sources: each row of a mixed batch is its source's (ids and mask together);
    a fine-tuning set does not mix with pretraining data."""
    from pretrain.data import ManifestError
    from pretrain.mixture import MixtureLoader

    sources = [(str(sft_dir), 0.5), (str(sft_dir), 0.5)]
    mixed = next(iter(MixtureLoader(sources, "train", 16, seed=3)))
    assert isinstance(mixed, MaskedBatch) and mixed.loss_mask.dtype == torch.bool
    everything = ShardLoader(sft_dir, "train", 1, shuffle=False, epochs=1)
    rows = {tuple(b.input_ids[0].tolist()): b.loss_mask[0] for b in everything}
    for ids, mask in zip(mixed.input_ids, mixed.loss_mask):
        assert torch.equal(rows[tuple(ids.tolist())], mask)
    with pytest.raises(ManifestError, match="loss_mask"):
        MixtureLoader([(str(sft_dir), 0.5), (str(tiny_data_dir), 0.5)], "train", 4)


def test_generate_left_pad_equals_the_manually_aligned_prompt():
    model = _calm().eval()
    prompts = [[0, 5, 6, 7, 8, 9], [0, 20], [0, 30, 31, 32]]
    aligned = [left_pad(p, K, 1) for p in prompts]
    assert [len(p) % K for p in aligned] == [0, 0, 0] and aligned[1] == [1, 1, 0, 20]
    a = calm_generate(model, prompts, 8, seed=3, eos_token_id=0, pad_token_id=1, prompt_alignment="left_pad")
    b = calm_generate(model, aligned, 8, seed=3, eos_token_id=0, pad_token_id=1)
    assert torch.equal(a.sequences, b.sequences)
    c = model.generate(torch.tensor([prompts[0]]), max_new_tokens=8, seed=3, prompt_alignment="left_pad")
    d = model.generate(torch.tensor([aligned[0]]), max_new_tokens=8, seed=3)
    assert torch.equal(c[:, len(prompts[0]):], d[:, len(aligned[0]):])
    # A plain-text prompt (no EOS in front) gets the document separator that fine-tuning blocks carry.
    e = calm_generate(model, [p[1:] for p in prompts], 8, seed=3, eos_token_id=0, pad_token_id=1,
                      prompt_alignment="left_pad")
    assert torch.equal(e.sequences, b.sequences)
    with pytest.raises(ValueError, match="prompt_alignment"):
        calm_generate(model, prompts, 4, prompt_alignment="right")


def _train(stage: str, preset: str, sft_dir: Path, run_dir: Path, *extra: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pretrain", "--stage", stage, "--config", preset, f"data.path={sft_dir}",
           f"run_dir={run_dir}", "max_steps=4", "eval_every=4", "eval_batches=2", "log_every=2", "micro_batch_size=4",
           "wandb.mode=disabled", "export=false", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tiny_baseline_and_calm_train_on_masked_shards(sft_dir, tmp_path):
    """Both stages train and validate on masked shards (response-only loss; no BrierLM probe there);
    the autoencoder stage is refused with one line."""
    ae_model = yaml.safe_load((REPO / "configs" / "ae-tiny.yaml").read_text())["model"]
    torch.manual_seed(0)
    build_model("autoencoder", ae_model).save_pretrained(tmp_path / "ae")
    for stage, preset, extra in (("baseline", "baseline-tiny", ()), ("calm", "calm-tiny", (f"ae_path={tmp_path / 'ae'}",))):
        records = _train(stage, preset, sft_dir, tmp_path / stage, *extra)
        train = [r for r in records if r["split"] == "train"]
        val = [r for r in records if r["split"] == "validation"][-1]
        assert len(train) == 2 and all(r["loss"] == r["loss"] for r in train)  # finite, logged
        assert val["loss"] > 0 and "brierlm" not in val
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pretrain", "--stage", "autoencoder", "--config", "ae-tiny",
                           f"data.path={sft_dir}", f"run_dir={tmp_path / 'ae_run'}", "wandb.mode=disabled"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2 and "trains on pretraining shards only" in proc.stderr


def test_cli_aligns_prompts_as_data_prep_does(tmp_path, monkeypatch, capsys):
    """`python -m evaluation.generate --prompt-alignment left_pad`: what reaches the model is EOS + prompt,
    left-padded to a multiple of K (the CALM's; --patch-size for the baseline)."""
    import evaluation.generate as cli
    from tests.evaluation.test_generate import EOS, PAD, tiny_calm, tiny_tokenizer

    tiny_calm().save_pretrained(tmp_path / "calm")
    tiny_tokenizer(tmp_path / "calm")
    seen = []
    original = cli.generate

    def spy(model, kind, tokenizer, prompts, args, stream):
        seen.append(prompts)
        return original(model, kind, tokenizer, prompts, args, stream)

    monkeypatch.setattr(cli, "generate", spy)
    assert cli.main(["--model", str(tmp_path / "calm"), "--prompt", "w5 w6 w7", "--prompt", "w9", "--max-new-tokens",
                     "4", "--temperature", "1", "--prompt-alignment", "left_pad"]) == 0
    assert seen == [[[EOS, 5, 6, 7], [PAD, PAD, EOS, 9]]]


def test_answer_match_reads_records_back_and_scores_exact_answers(sft_dir, tmp_path, capsys):
    from evaluation.answer_match import answer_prefix, exact_match, main, records

    pairs = records(str(sft_dir), "validation", 5)
    assert len(pairs) == 5 and all(len(q) % K == 0 and q[-1] != 1 and r[-1] == 0 for q, r in pairs)
    assert exact_match([[5, 0, 9], [5, 6, 0], [5]], [[5, 0], [5, 0], [5, 0]], eos=0) == 1 / 3
    assert answer_prefix([[5, 7, 9], [5, 6, 0], [6]], [[5, 7, 0], [5, 0], [5, 0]]) == 2 / 3
    torch.manual_seed(0)
    build_model("baseline", {**BASELINE, "eos_token_id": 0, "pad_token_id": 1}).save_pretrained(tmp_path / "base")
    assert main(["--model", str(tmp_path / "base"), "--data", str(sft_dir), "--limit", "4"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["records"] == 4 and result["kind"] == "baseline" and 0 <= result["exact_match"] <= 1
    assert main(["--model", str(tmp_path / "base"), "--data", str(sft_dir.parent.parent / "missing")]) == 2


def test_export_of_a_finetuned_calm_aligns_prompts_by_itself(sft_dir, tmp_path):
    """Trained on masked shards, a CALM export says prompt_alignment=left_pad in its generation config,
    and generate() reads it from there without being told."""
    from pretrain.data import load_tokenizer, read_manifest
    from pretrain.export import save_export
    from pretrain.models import CALM

    torch.manual_seed(0)
    model = build_model("calm", dict(CALM_KW)).eval()
    manifest = read_manifest(sft_dir)
    save_export(model, "calm", load_tokenizer(sft_dir), tmp_path / "export", {"stage": "calm"}, manifest, None)
    assert json.loads((tmp_path / "export" / "generation_config.json").read_text())["prompt_alignment"] == "left_pad"
    loaded = CALM.from_pretrained(tmp_path / "export").eval()
    prompt = [5, 6, 7, 8, 9]
    told = loaded.generate(torch.tensor([prompt]), max_new_tokens=8, seed=3, prompt_alignment="left_pad")
    assert torch.equal(loaded.generate(torch.tensor([prompt]), max_new_tokens=8, seed=3), told)
    assert loaded.generation_config.prompt_alignment == "left_pad"
