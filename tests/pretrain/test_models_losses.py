"""The chunked output layer (pretrain/models/losses.py) and the memory switches that use it.

Chunked cross-entropy equals the whole-logits path in fp32 (loss and gradients within 1e-5 relative),
for the bare function, the autoencoder's objective and the baseline's; "auto" keeps small logits
whole (the tiny presets' exact numerics); activation checkpointing leaves losses and gradients as they were.
"""

import pytest
import torch

from pretrain.config import ConfigError, load_config
from pretrain.models.losses import AUTO_MIN_ELEMENTS, chunk_rows_for, linear_cross_entropy, resolve_chunk_rows
from pretrain.stages import build_model, get_stage

REL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def loss_and_grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("rows", [1, 7, 64, 1000])
def test_chunked_cross_entropy_equals_whole_logits(rows):
    torch.manual_seed(0)
    hidden, weight = torch.randn(300, 24), torch.randn(1000, 24) * 0.3
    targets = torch.randint(0, 1000, (300,))
    targets[::11] = -100  # ignored positions count in neither the loss nor its mean

    def ce(chunk):
        return lambda h, w: 2.5 * linear_cross_entropy(h, w, targets, chunk)[0]

    want, (want_h, want_w) = loss_and_grads(ce(0), hidden, weight)
    got, (got_h, got_w) = loss_and_grads(ce(rows), hidden, weight)
    assert abs(float(got - want)) <= REL * abs(float(want))
    assert rel(got_h, want_h) <= REL and rel(got_w, want_w) <= REL
    with torch.no_grad():
        plain, correct = linear_cross_entropy(hidden, weight, targets, rows, count_correct=True)
        _, correct_whole = linear_cross_entropy(hidden, weight, targets, 0, count_correct=True)
    assert abs(float(plain - want / 2.5)) <= REL * abs(float(want)) and int(correct) == int(correct_whole)


def test_auto_chunks_only_large_logits():
    assert chunk_rows_for(32000) == 1024 and chunk_rows_for(128256) == 256 and chunk_rows_for(128256, "cuda") == 2048
    assert resolve_chunk_rows("auto", 32 * 256, 512) == 0  # tiny presets: whole logits, exact numerics
    assert resolve_chunk_rows("auto", AUTO_MIN_ELEMENTS // 1000 + 1, 1000) == chunk_rows_for(1000)
    assert resolve_chunk_rows(0, 10**6, 128256) == 0 and resolve_chunk_rows(48, 10, 10) == 48
    with pytest.raises(ValueError):
        resolve_chunk_rows(-1, 10, 10)


def _ae():
    torch.manual_seed(0)
    return build_model("autoencoder", dict(vocab_size=300, hidden_size=32, intermediate_size=64, latent_size=16,
                                           patch_size=4)).train()


def test_autoencoder_chunked_objective_equals_whole_logits():
    model, ids = _ae(), torch.randint(0, 300, (3, 16))
    results = []
    for chunk in (0, 5):
        model.zero_grad()
        torch.manual_seed(1)  # the same input masking, posterior noise and latent dropout
        out = get_stage("autoencoder").objective(model, ids, ce_chunk_rows=chunk)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (whole, g0), (chunked, g1) = results
    loss, want = float(chunked.loss.detach()), float(whole.loss.detach())
    assert chunked.logits is None and abs(loss - want) <= REL * want
    assert float(chunked.accuracy) == float(whole.accuracy)
    assert all(rel(g1[n], g0[n]) <= REL for n in g0 if g0[n].norm() > 0)
    torch.manual_seed(1)
    assert get_stage("autoencoder").objective(model, ids, metrics=False).accuracy is None


def _baseline(**extra):
    torch.manual_seed(0)
    return build_model("baseline", dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64),
                       **extra).train()


def _objective_grads(model, ids, **options):
    model.zero_grad()
    loss = get_stage("baseline").objective(model, ids, **options).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_baseline_chunked_objective_equals_transformers_loss():
    model, ids = _baseline(), torch.randint(0, 300, (2, 24))
    want, g0 = _objective_grads(model, ids, ce_chunk_rows=0)
    got, g1 = _objective_grads(model, ids, ce_chunk_rows=7)
    assert abs(float(got - want)) <= REL * float(want)
    assert all(rel(g1[n], g0[n]) <= REL for n in g0)


def test_activation_checkpointing_keeps_losses_and_gradients():
    ids = torch.randint(0, 300, (2, 24))
    want, g0 = _objective_grads(_baseline(), ids)
    got, g1 = _objective_grads(_baseline(activation_checkpointing=True), ids)
    assert torch.equal(got, want) and all(torch.equal(g1[n], g0[n]) for n in g0)
    with pytest.raises(ValueError, match="calm and baseline"):
        build_model("autoencoder", dict(vocab_size=300, hidden_size=32), activation_checkpointing=True)


def test_config_switches_are_validated():
    assert load_config("ae-tiny").ce_chunk_rows == "auto"
    assert load_config("ae-tiny", ["ce_chunk_rows=0"]).ce_chunk_rows == 0
    assert load_config("calm-tiny", ["activation_checkpointing=true"]).activation_checkpointing is True
    with pytest.raises(ConfigError, match="ce_chunk_rows"):
        load_config("ae-tiny", ["ce_chunk_rows=many"])
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        load_config("ae-tiny", ["activation_checkpointing=true"])
