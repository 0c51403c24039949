"""The CALM autoencoder: shapes, the tied output matrix, exact safetensors round trip, the objective."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModel

from pretrain.models import Autoencoder, AutoencoderConfig
from pretrain.models.autoencoder import clamped_kl
from pretrain.stages import build_model

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, latent_size=8, patch_size=4)


def _tiny(**overrides) -> Autoencoder:
    torch.manual_seed(0)
    return build_model("autoencoder", {**TINY, **overrides})


def test_shapes_and_output_fields():
    model = _tiny().eval()
    ids = torch.randint(0, 97, (3, 20))
    mu, log_sigma = model.encode(ids)
    assert mu.shape == log_sigma.shape == (3, 5, 8)
    assert model.decode(mu).shape == (3, 20, 97)
    out = model(input_ids=ids)
    for name in ("loss", "ce", "kl", "accuracy"):
        assert getattr(out, name).dim() == 0
    assert out.logits.shape == (3, 20, 97)
    with pytest.raises(ValueError, match="multiple of patch_size=4"):
        model.encode(ids[:, :18])


def test_parameter_names_match_the_released_layout():
    names = set(dict(_tiny().named_parameters()))
    layer = ["layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
    expected = {"encoder.embed_tokens.weight", "encoder.squeeze_layer.weight", "encoder.squeeze_layer.bias",
                "encoder.norm.weight", "encoder.hidden_to_latent.weight", "encoder.hidden_to_latent.bias",
                "decoder.latent_to_hidden.weight", "decoder.latent_to_hidden.bias", "decoder.expand_layer.weight",
                "decoder.expand_layer.bias", "decoder.norm.weight"}
    expected |= {f"encoder.encoder_layers.{i}.{p}" for i in range(2) for p in layer}
    expected |= {f"decoder.decoder_layers.{i}.{p}" for i in range(2) for p in layer}
    assert names == expected


def test_output_matrix_is_the_encoder_embedding():
    model = _tiny().eval()
    z = torch.randn(2, 3, 8)
    hidden = model.decoder(z)
    torch.testing.assert_close(model.decode(z), hidden @ model.encoder.embed_tokens.weight.T)
    with torch.no_grad():
        model.encoder.embed_tokens.weight[5].add_(1.0)
    torch.testing.assert_close(model.decode(z)[..., 5], hidden @ model.encoder.embed_tokens.weight[5])


def test_safetensors_round_trip_is_exact(tmp_path):
    model = _tiny().eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "autoencoder"
    assert isinstance(AutoConfig.from_pretrained(tmp_path), AutoencoderConfig)
    again = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(again, Autoencoder)
    before, after = model.state_dict(), again.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    ids = torch.randint(0, 97, (2, 16))
    assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)


def test_kl_clamp_floors_every_dimension():
    mu = torch.tensor([[0.0, 0.0, 3.0, 0.1]])
    log_sigma = torch.tensor([[0.0, -0.1, 0.0, 0.0]])
    raw = 0.5 * (mu**2 + torch.exp(2 * log_sigma) - 1 - 2 * log_sigma)
    assert raw[0, 0] == 0 and raw[0, 1] < 0.5 and raw[0, 2] > 0.5
    expected = raw.clamp(min=0.5).sum(-1)
    torch.testing.assert_close(clamped_kl(mu, log_sigma, 0.5), expected)
    assert clamped_kl(torch.zeros(1, 16), torch.zeros(1, 16), 0.5).item() == pytest.approx(8.0)
    # Free bits: a dimension below the floor receives no gradient.
    mu.requires_grad_(True)
    clamped_kl(mu, log_sigma, 0.5).sum().backward()
    assert mu.grad[0, 0] == 0 and mu.grad[0, 3] == 0 and mu.grad[0, 2] != 0


def test_training_loss_combines_ce_and_kl_and_eval_is_plain_ce():
    model = _tiny(kl_weight=0.01)
    ids = torch.randint(1, 97, (4, 16))
    torch.manual_seed(1)
    out = model.train()(input_ids=ids)
    torch.testing.assert_close(out.loss, 4 * out.ce + 0.01 * out.kl)
    assert out.kl >= 0.5 * 8  # floored at kl_clamp per latent dimension
    out = model.eval()(input_ids=ids)
    torch.testing.assert_close(out.loss, out.ce)
    # Eval decodes the posterior mean: deterministic.
    assert torch.equal(model(input_ids=ids).logits, out.logits)


def test_training_masks_inputs_to_id_zero():
    model = _tiny(ae_dropout=0.5)
    seen = []
    model.encoder.embed_tokens.register_forward_hook(lambda mod, args, out: seen.append(args[0].clone()))
    ids = torch.randint(1, 97, (8, 64))
    model.train()(input_ids=ids)
    masked = seen[-1] == 0
    assert 0.4 < masked.float().mean() < 0.6
    assert torch.equal(seen[-1][~masked], ids[~masked])
    model.eval()(input_ids=ids)
    assert torch.equal(seen[-1], ids)


def test_tiny_autoencoder_overfits_a_batch_to_full_reconstruction():
    torch.manual_seed(0)
    model = build_model("autoencoder", dict(vocab_size=64, hidden_size=64, intermediate_size=128, latent_size=16,
                                            patch_size=4))
    ids = torch.randint(1, 64, (4, 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(300):
        optimizer.zero_grad()
        model(input_ids=ids).loss.backward()
        optimizer.step()
    model.eval()
    torch.manual_seed(1)
    assert model.reconstruction_accuracy(ids, sample=True).item() == 1.0
    # The robustness curve's far end: enough added latent noise must break reconstruction.
    assert model.reconstruction_accuracy(ids, sample=True, noise_std=10.0).item() < 0.5
