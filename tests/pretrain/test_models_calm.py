"""The CALM model: step-wise API, energy head, frozen autoencoder, save/load and the authors' checkpoints."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModel

from pretrain.models import CALM, CALMConfig
from pretrain.stages import build_model
from tests.pretrain.authors_layout import save_in_authors_layout

AE = dict(vocab_size=61, hidden_size=32, intermediate_size=64, latent_size=8, patch_size=4)
CALM_KW = dict(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, latent_size=8, patch_size=4, num_mlp_layers=2, num_samples=4,
               num_target_samples=16)


@pytest.fixture(scope="module")
def ae_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ae")
    build_model("autoencoder", AE).save_pretrained(path)
    return path


def _calm(ae_dir, **overrides) -> CALM:
    torch.manual_seed(0)
    model = build_model("calm", {**CALM_KW, **overrides}, ae_path=str(ae_dir))
    # A random (not zero-initialised) head, so that samples depend on the noise and the hidden state.
    with torch.no_grad():
        for p in model.mlp_generator.final_layer.parameters():
            p.normal_(0, 0.1)
    return model


def test_autoencoder_comes_from_ae_path(ae_dir):
    model = build_model("calm", CALM_KW, ae_path=str(ae_dir))
    trained = AutoModel.from_pretrained(ae_dir)
    for key, value in trained.state_dict().items():
        assert torch.equal(model.ae_model.state_dict()[key], value), key
    with pytest.raises(FileNotFoundError, match="ae_path"):
        build_model("calm", CALM_KW, ae_path=str(ae_dir / "missing"))
    with pytest.raises(ValueError, match="latent_size"):
        build_model("calm", {**CALM_KW, "latent_size": 16}, ae_path=str(ae_dir))


def test_head_starts_at_zero_and_names_match_the_released_layout(ae_dir):
    model = build_model("calm", CALM_KW, ae_path=str(ae_dir))
    samples = model.sample_latents(torch.randn(2, 3, 32), num_samples=5)
    assert samples.shape == (5, 2, 3, 8) and not samples.any()
    names = set(dict(model.named_parameters()))
    for name in ["transformer.embed_tokens.weight", "transformer.layers.1.self_attn.q_proj.weight",
                 "transformer.layers.0.mlp.gate_proj.weight", "transformer.layers.0.input_layernorm.weight",
                 "transformer.norm.weight", "embed_proj.0.bias", "embed_proj.2.weight", "embed_proj.3.weight",
                 "mlp_generator.noise_embd.weight", "mlp_generator.hidden_embd.bias",
                 "mlp_generator.norm_noise.weight", "mlp_generator.norm_hidden.bias",
                 "mlp_generator.mlp_blocks.1.in_ln.weight", "mlp_generator.mlp_blocks.1.linears.4.weight",
                 "mlp_generator.mlp_blocks.0.down_proj.bias", "mlp_generator.final_layer.in_ln.weight",
                 "mlp_generator.final_layer.linears.2.bias", "ae_model.encoder.embed_tokens.weight"]:
        assert name in names, name
    assert not any(n.startswith("lm_head") for n in names)


def test_step_wise_api_shapes_and_kv_cache_matches_full_pass(ae_dir):
    model = _calm(ae_dir).eval()
    ids = torch.randint(0, 61, (2, 24))
    embeds = model.chunk_embeddings(ids)
    assert embeds.shape == (2, 6, 32)
    full, _ = model.backbone(embeds)
    def read(chunk_ids, cache=None):
        return model.backbone(model.chunk_embeddings(chunk_ids), past_key_values=cache, use_cache=True)

    hidden, cache = read(ids[:, :16])
    step, cache = read(ids[:, 16:20], cache)
    last, _ = read(ids[:, 20:], cache)
    torch.testing.assert_close(torch.cat([hidden, step, last], dim=1), full, atol=1e-5, rtol=1e-5)
    latents = model.sample_latents(full[:, -1], num_samples=3)
    assert latents.shape == (3, 2, 8)
    tokens = model.decode_latents(latents.unsqueeze(-2))
    assert tokens.shape == (3, 2, 4) and tokens.dtype == torch.long
    with pytest.raises(ValueError, match="multiple of patch_size"):
        model.chunk_embeddings(ids[:, :7])
    with pytest.raises(ValueError, match="at least 2 chunks"):
        model(input_ids=ids[:, :4])


def test_head_samples_vary_with_noise_and_generator_is_reproducible(ae_dir):
    model = _calm(ae_dir).eval()
    hidden = torch.randn(3, 32)
    a = model.sample_latents(hidden, 2, generator=torch.Generator().manual_seed(5))
    b = model.sample_latents(hidden, 2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.allclose(a[0], a[1])


def test_frozen_autoencoder_gets_no_gradient_and_does_not_change(ae_dir):
    model = _calm(ae_dir)
    model.train()
    assert model.training and not model.ae_model.training
    assert all(not p.requires_grad for p in model.ae_model.parameters())
    ae_before = {k: v.clone() for k, v in model.ae_model.state_dict().items()}
    head_before = model.mlp_generator.final_layer.linears[2].weight.clone()
    trainable = [p for p in model.parameters() if p.requires_grad]  # what training's param_groups keeps
    assert {id(p) for p in trainable}.isdisjoint(id(p) for p in model.ae_model.parameters())
    assert len(trainable) + len(list(model.ae_model.parameters())) == len(list(model.parameters()))
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    loss = model(input_ids=torch.randint(0, 61, (2, 16))).loss
    loss.backward()
    assert all(p.grad is None for p in model.ae_model.parameters())
    assert model.transformer.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.transformer.embed_tokens.weight.grad.abs().sum() > 0
    optimizer.step()
    for key, value in model.ae_model.state_dict().items():
        assert torch.equal(value, ae_before[key]), key
    assert not torch.equal(model.mlp_generator.final_layer.linears[2].weight, head_before)


def test_targets_use_the_autoencoder_in_eval_mode(ae_dir):
    model = _calm(ae_dir).train()
    ids = torch.randint(1, 61, (2, 16))
    mu, log_sigma = model.target_posterior(ids)
    expected_mu, expected_log_sigma = model.ae_model.encode(ids)
    assert torch.equal(mu, expected_mu) and torch.equal(log_sigma, expected_log_sigma)
    assert mu.dtype == torch.float32


def test_save_load_round_trip_gives_identical_loss(ae_dir, tmp_path):
    model = _calm(ae_dir)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "energy" and saved["ae_config"]["latent_size"] == 8
    # The export is self-contained: the autoencoder directory is no longer needed.
    saved["ae_path"] = str(tmp_path / "gone")
    (tmp_path / "config.json").write_text(json.dumps(saved))
    again = AutoModel.from_pretrained(tmp_path)
    assert isinstance(again, CALM)
    assert all(not p.requires_grad for p in again.ae_model.parameters())
    before, after = model.state_dict(), again.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    ids = torch.randint(0, 61, (2, 16))
    torch.manual_seed(3)
    loss = model.eval()(input_ids=ids).loss
    torch.manual_seed(3)
    assert torch.equal(again.eval()(input_ids=ids).loss, loss)


def test_loads_an_authors_style_checkpoint_with_ae_path_override(ae_dir, tmp_path):
    model = _calm(ae_dir)
    save_in_authors_layout(model, tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), CALMConfig)
    with pytest.raises(FileNotFoundError, match="ae_path"):
        CALM.from_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path, ae_path=str(ae_dir))
    assert loaded.config.ae_path == str(ae_dir)
    after = loaded.state_dict()
    assert not any(k.startswith("generative_head.") for k in after)
    for key, value in model.state_dict().items():
        assert torch.equal(after[key], value), key


def test_config_rejects_improper_settings():
    with pytest.raises(ValueError, match="num_samples"):
        CALMConfig(num_samples=1)
    with pytest.raises(ValueError, match="beta"):
        CALMConfig(beta=2.0)
