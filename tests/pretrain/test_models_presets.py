"""Presets: the paper's sizes built on the meta device, the tiny ones built for real, attention choice, baseline."""

import pytest
import torch
from transformers import LlamaForCausalLM

from pretrain.config import load_config
from pretrain.models import AutoencoderConfig, attention, attn_implementation, baseline_config
from pretrain.stages import build_model

# Parameter counts reported by the paper (its Table 1); CALM excludes its autoencoder.
PAPER_PARAMS = {
    "transformer-s": 281e6, "transformer-m": 465e6, "transformer-l": 849e6,
    "calm-m": 371e6, "calm-l": 735e6, "calm-xl": 1.82e9,
}


def _meta_model(preset):
    config = load_config(preset)
    kwargs = dict(config.model)
    if config.stage == "calm":
        # The exported autoencoder does not exist here: give its config in memory (the paper's 75M one).
        kwargs["ae_config"] = AutoencoderConfig(vocab_size=kwargs["vocab_size"]).to_dict()
    with torch.device("meta"):
        return build_model(config.stage, kwargs)


def _count(model):
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith("ae_model."))


@pytest.mark.parametrize("preset", sorted(PAPER_PARAMS))
def test_paper_presets_match_the_paper_parameter_counts(preset):
    count = _count(_meta_model(preset))
    assert abs(count / PAPER_PARAMS[preset] - 1) < 0.01, f"{preset}: {count / 1e6:.1f}M"


def test_paper_autoencoder_size():
    count = _count(_meta_model("ae"))
    # Exactly what §2's layout gives with the Llama 3 vocabulary; the paper's "75M" truncates 75.83M.
    assert count == 75_831_552
    assert abs(count / 75e6 - 1) < 0.012


@pytest.mark.parametrize("preset", ["ae-tiny", "baseline-tiny", "calm-tiny"])
def test_tiny_presets_build_and_run_on_cpu(preset):
    config = load_config(preset)
    kwargs = dict(config.model)
    if config.stage == "calm":
        ae = load_config("ae-tiny").model
        assert (ae["latent_size"], ae["patch_size"]) == (kwargs["latent_size"], kwargs["patch_size"])
        kwargs["ae_config"] = ae
    torch.manual_seed(0)
    model = build_model(config.stage, kwargs, device="cpu")
    ids = torch.randint(0, kwargs["vocab_size"], (2, 32))
    out = model(input_ids=ids, labels=ids) if config.stage == "baseline" else model(input_ids=ids)
    assert torch.isfinite(out.loss)
    assert _count(model) < 2_000_000


def test_baseline_is_plain_llama_with_untied_embeddings():
    config = baseline_config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                             vocab_size=50)
    assert config.tie_word_embeddings is False and config.num_hidden_layers == 1
    model = build_model("baseline", config.to_dict())
    assert type(model) is LlamaForCausalLM
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize("device, dtype, capability, flash, expected", [
    ("cpu", BF16, None, True, "sdpa"),
    ("cpu", FP32, None, False, "sdpa"),
    ("cuda", BF16, (8, 0), True, "flash_attention_2"),    # A100
    ("cuda", FP16, (9, 0), True, "flash_attention_2"),    # H100/H200
    ("cuda", BF16, (8, 9), False, "sdpa"),                # flash-attn not installed
    ("cuda", FP32, (9, 0), True, "sdpa"),                 # FA2 refuses fp32
    ("cuda", FP16, (7, 0), True, "sdpa"),                 # V100
    ("cuda", FP16, (7, 5), True, "sdpa"),                 # T4
])
def test_attention_choice_table(device, dtype, capability, flash, expected):
    assert attention.choose_attention(device, dtype, capability, flash) == expected


def test_attention_is_chosen_in_one_place(monkeypatch):
    assert attn_implementation("cpu") == "sdpa"
    assert attn_implementation("cpu", torch.bfloat16) == "sdpa"
    monkeypatch.setattr(attention, "flash_attn_importable", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert attn_implementation("cuda", torch.bfloat16) == "flash_attention_2"
    assert attn_implementation("cuda", torch.float32) == "sdpa"
    monkeypatch.setattr(attention, "flash_attn_importable", lambda: False)
    assert attn_implementation("cuda:0", torch.bfloat16) == "sdpa"
    model = build_model("baseline", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=40), device="cpu")
    assert model.config._attn_implementation == "sdpa"
