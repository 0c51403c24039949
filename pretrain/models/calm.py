"""Stage 2 of CALM: a Llama backbone that predicts the next chunk's latent vector (docs/method.md §3, §8).

Input side: the previous chunk's K tokens, embedded with the backbone's own table and compressed by
`embed_proj` into one vector per step. Output side: the energy head (`mlp_generator`) samples latent
vectors from the hidden state; training minimises the energy loss against samples of the frozen
autoencoder's posterior for the next chunk. The autoencoder lives inside the model as `ae_model`
(frozen and always in eval mode; training holds it outside the module tree, see pretrain.stages).

Step-wise API for generation and evaluation (shapes: B batch, n chunks, d hidden, l latent, K patch):
    model.chunk_embeddings(input_ids (B, n*K))            -> (B, n, d)      backbone inputs
    model.backbone(inputs_embeds, past_key_values, use_cache) -> (hidden (B, n, d), past_key_values)
    model.sample_latents(hidden (..., d), num_samples)     -> (num_samples, ..., l)
    model.decode_latents(latents (..., T, l))              -> token ids (..., T*K)  (AE decoder, argmax)
Hidden state t (after reading chunks 0..t) predicts chunk t+1.

Loading the authors' checkpoints (`.bin`, absolute `ae_path`, heads duplicated as `generative_head.*`):
    CALM.from_pretrained("CALM-M", ae_path="/local/CALM-Autoencoder")
`ae_path` is only read for the autoencoder's *config* when the checkpoint's config lacks `ae_config`;
the autoencoder's weights always come from the checkpoint's `ae_model.*` tensors. The duplicate
`generative_head.*` tensors are ignored. Our own exports carry `ae_config` and are self-contained.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationConfig, LlamaConfig, LlamaModel, PreTrainedModel
from transformers import initialization as init
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import ModelOutput

from .attention import as_one_row, packs_in_one_row
from .autoencoder import Autoencoder, AutoencoderConfig
from .checks import require_at_least
from .energy import MLPGenerator, energy_loss
from .generation_mixin import CALMGenerationMixin


class CALMConfig(LlamaConfig):
    """Llama fields for the backbone plus the CALM fields of the authors' config.

    The autoencoder is named by `ae_path` (a directory holding an exported `Autoencoder`) or given
    in memory as `ae_config` (an `AutoencoderConfig` or its dict; used for meta-device builds and
    tests, and written into every export so that it reloads without `ae_path`).
    """

    # The authors' CALM configs are saved with model_type "energy" (their energy-head CALM).
    model_type = "energy"
    sub_configs_defaults = {"ae_config": SubConfigSpec(AutoencoderConfig, optional=True)}

    ae_path: str | None = None
    ae_config: AutoencoderConfig | dict | None = None
    patch_size: int = 4
    latent_size: int = 128
    num_mlp_layers: int = 4
    """Residual blocks in the energy head (about num_hidden_layers / 4)."""
    num_samples: int = 8
    """N: head samples per position in the energy loss (>= 2)."""
    num_target_samples: int = 100
    """M: samples drawn from the autoencoder's posterior per position in the energy loss."""
    beta: float = 1.0
    """Exponent of the distances in the energy score; proper for 0 < beta < 2."""
    noise_size: int = 64

    def __post_init__(self, **kwargs):
        if self.num_samples < 2:
            raise ValueError(
                f"CALMConfig.num_samples must be >= 2 (the energy loss compares samples), got {self.num_samples}"
            )
        if not 0.0 < self.beta < 2.0:
            raise ValueError(f"CALMConfig.beta must be in (0, 2) for a strictly proper score, got {self.beta}")
        require_at_least(self, ("patch_size", "latent_size", "num_target_samples", "noise_size"), 1)
        super().__post_init__(**kwargs)


@dataclass
class CALMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    """Energy loss (negative energy score), averaged over predicted positions."""
    last_hidden_state: torch.Tensor | None = None
    fidelity: torch.Tensor | None = None
    """2 E||x - y||: how far the head's samples lie from the target samples (detached, for logging)."""
    diversity: torch.Tensor | None = None
    """E||x - x'||: how far the head's samples lie from each other (detached, for logging)."""


def _resolve_ae_config(config: CALMConfig) -> AutoencoderConfig:
    if config.ae_config is None:
        path = config.ae_path
        if not path or not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(
                f"CALM needs its autoencoder: ae_path={path!r} is not a directory with config.json and the config "
                "has no ae_config. Point it at an exported autoencoder, e.g. "
                "CALM.from_pretrained(dir, ae_path='/path/to/autoencoder') or build_model(..., ae_path=...)."
            )
        config.ae_config = AutoencoderConfig.from_pretrained(path)
    ae_config = config.ae_config
    for name in ("patch_size", "latent_size"):
        if getattr(ae_config, name) != getattr(config, name):
            raise ValueError(
                f"CALMConfig.{name}={getattr(config, name)} does not match the autoencoder's {name}="
                f"{getattr(ae_config, name)} (ae_path={config.ae_path!r})"
            )
    return ae_config


class CALM(PreTrainedModel, CALMGenerationMixin):
    """Continuous autoregressive LM with an energy head. See the module docstring for the API;
    `generate()` (transformers' interface, likelihood-free sampling) comes from CALMGenerationMixin."""

    config_class = CALMConfig
    base_model_prefix = "calm"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer", "AELayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True
    # The authors' model holds the head under two names; their state dicts repeat it as generative_head.*.
    _keys_to_ignore_on_load_unexpected = [r"^generative_head\."]

    def __init__(self, config: CALMConfig):
        super().__init__(config)
        ae_config = _resolve_ae_config(config)
        d, k = config.hidden_size, config.patch_size
        self.patch_size = k
        self.ae_model = Autoencoder(ae_config)
        self.transformer = LlamaModel(config)
        self.mlp_generator = MLPGenerator(d, config.latent_size, config.noise_size, config.num_mlp_layers)
        self.embed_proj = nn.Sequential(
            nn.Linear(k * d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d), nn.LayerNorm(d, eps=1e-6)
        )
        self.post_init()
        self.ae_model.requires_grad_(False)
        self.ae_model.eval()

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> "CALM":
        """`PreTrainedModel.from_pretrained`; accepts `ae_path=` to relocate the autoencoder's config.

        Loading swaps in fresh parameters (requires_grad=True), so the autoencoder is frozen again here,
        and it is kept in float32 whatever `dtype` the backbone is loaded in: its decoder turns latents
        into tokens by argmax, and logits rounded to bf16 would tie (it is small next to the backbone).
        The saved generation_config.json is read too (transformers reads it only for models whose
        `generate` is its own): its special tokens, temperature and prompt alignment are generate()'s.
        """
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True: (model, info)
        model.ae_model.float()
        model.ae_model.requires_grad_(False)
        model.ae_model.eval()
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        hub = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
        try:
            model.generation_config = GenerationConfig.from_pretrained(source, **hub)
        except (OSError, ValueError, TypeError):
            pass  # no generation_config.json (the authors' checkpoints): the defaults stay
        return loaded

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if getattr(module, "zero_init", False):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif getattr(module, "xavier_init", False):
            init.xavier_uniform_(module.weight)
            init.zeros_(module.bias)

    def train(self, mode: bool = True) -> "CALM":
        """Train the backbone and head; the autoencoder stays frozen in eval mode (no masking, no dropout)."""
        super().train(mode)
        self.ae_model.eval()
        return self

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.embed_tokens

    def _num_chunks(self, input_ids: torch.Tensor) -> int:
        if input_ids.dim() != 2 or input_ids.shape[1] % self.patch_size:
            raise ValueError(
                f"CALM expects input_ids of shape (B, L) with L a multiple of patch_size={self.patch_size}, "
                f"got {tuple(input_ids.shape)}"
            )
        return input_ids.shape[1] // self.patch_size

    def chunk_embeddings(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """(B, n*K) token ids -> (B, n, d): each chunk's K embeddings concatenated and compressed."""
        n = self._num_chunks(input_ids)
        embeds = self.transformer.embed_tokens(input_ids).reshape(input_ids.shape[0], n, -1)
        return self.embed_proj(embeds)

    def backbone(self, inputs_embeds: torch.Tensor, past_key_values=None, use_cache: bool = False, **kwargs):
        """Run the Llama backbone on chunk vectors; returns (last hidden states (B, n, d), past_key_values).

        With `use_cache=True` a transformers `DynamicCache` is created (or extended) and positions
        continue from its length, so generation can feed one chunk vector at a time.
        """
        out = self.transformer(
            inputs_embeds=inputs_embeds, past_key_values=past_key_values, use_cache=use_cache, **kwargs
        )
        return out.last_hidden_state, out.past_key_values

    def sample_latents(self, hidden: torch.Tensor, num_samples: int = 1,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw `num_samples` next-chunk latents from the energy head: (..., d) -> (num_samples, ..., l)."""
        return self.mlp_generator(hidden, num_samples=num_samples, generator=generator)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.LongTensor:
        """Latents (..., T, l) -> greedy token ids (..., T*K) through the frozen autoencoder's decoder,
        in float32 (without autocast) so that near-equal logits are not tied by bf16 rounding."""
        lead = latents.shape[:-2]
        flat = latents.reshape(-1, *latents.shape[-2:]).float()
        if self.ae_model.encoder.embed_tokens.weight.dtype != torch.float32:
            self.ae_model.float()  # once: a model cast to bf16 as a whole (from_pretrained keeps it fp32)
        with torch.autocast(device_type=latents.device.type, enabled=False):
            tokens = self.ae_model.decode(flat).argmax(-1)
        return tokens.reshape(*lead, tokens.shape[-1])

    @torch.no_grad()
    def target_posterior(self, input_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen autoencoder's (mu, log_sigma) for each chunk, in float32, without autocast."""
        with torch.autocast(device_type=input_ids.device.type, enabled=False):
            mu, log_sigma = self.ae_model.encode(input_ids)
        return mu.float(), log_sigma.float()

    def chunk_positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Token position ids (B, T*K) of packed records -> chunk position ids (B, T). Each record must
        start on a chunk boundary (data_prep --pack aligns them), else a chunk would mix two records."""
        k = self.patch_size
        pos = position_ids.reshape(position_ids.shape[0], -1, k)
        offsets = torch.arange(k, device=pos.device)
        if not bool(((pos - pos[..., :1] == offsets) & (pos[..., :1] % k == 0)).all()):
            raise ValueError(f"packed records must start on chunk boundaries (K={k}): prepare them with data_prep "
                             f"--finetune --pack --patch-size {k}")
        return pos[..., 0] // k

    def forward(self, input_ids: torch.LongTensor, loss_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **kwargs) -> CALMOutput:
        """Energy loss of predicting chunks 1..T-1 from chunks 0..T-2 of `input_ids` (B, T*K).

        `loss_mask` (B, T*K), fine-tuning: only the target chunks that hold a masked-in (response) token
        are scored (the head samples only there), so the loss is their mean and the rest give nothing.
        `position_ids` (B, T*K), packed fine-tuning blocks: token positions restarting at every record;
        the backbone gets them per chunk, so transformers keeps each record's attention inside it."""
        n = self._num_chunks(input_ids)
        if n < 2:
            raise ValueError(f"CALM needs at least 2 chunks ({2 * self.patch_size} tokens) per sequence, got {n}")
        k = self.patch_size
        mu, log_sigma = self.target_posterior(input_ids[:, k:])
        embeds = self.chunk_embeddings(input_ids[:, :-k])
        if position_ids is None:
            hidden, _ = self.backbone(embeds, use_cache=False)
        else:
            positions = self.chunk_positions(position_ids)[:, : n - 1]
            if packs_in_one_row(self.config):
                embeds, positions = as_one_row(embeds, positions)
            hidden, _ = self.backbone(embeds, use_cache=False, position_ids=positions)
            hidden = hidden.reshape(input_ids.shape[0], n - 1, -1)
        predicting = hidden
        if loss_mask is not None:
            scored = loss_mask[:, k:].reshape(loss_mask.shape[0], n - 1, k).bool().any(-1)
            predicting, mu, log_sigma = hidden[scored], mu[scored], log_sigma[scored]
        samples = self.sample_latents(predicting, num_samples=self.config.num_samples)
        loss, fidelity, diversity = energy_loss(samples, mu, log_sigma, self.config.num_target_samples,
                                                self.config.beta, terms=True)
        return CALMOutput(loss=loss.mean(), last_hidden_state=hidden, fidelity=fidelity.mean().detach(),
                          diversity=diversity.mean().detach())
