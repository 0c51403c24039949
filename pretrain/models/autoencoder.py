"""Stage 1 of CALM: the context-free autoencoder that maps K tokens to one latent vector and back.

Layout and parameter names follow the authors' released CALM-Autoencoder (docs/method.md §2, §8), so their
checkpoints load as-is. The decoder's output matrix *is* `encoder.embed_tokens.weight` (one tensor,
used twice), so there is nothing to re-tie on load and safetensors exports round-trip exactly.

Training objective (all four robustness tricks of the paper): input tokens replaced by id 0 with
p = `ae_dropout`, posterior sampling z = mu + sigma * eps, dropout p = `ae_dropout` on z, and a KL to
N(0, I) clamped from below per dimension at `kl_clamp`; loss = K * CE + kl_weight * KL.
In eval mode the forward pass decodes the posterior mean and `.loss` is the plain CE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm
from transformers.utils import ModelOutput

from .checks import require_at_least
from .losses import linear_cross_entropy, resolve_chunk_rows


class AutoencoderConfig(PreTrainedConfig):
    """Fields of the authors' `AutoencoderConfig`; defaults are the released 75M model (Llama 3 vocabulary)."""

    model_type = "autoencoder"

    vocab_size: int = 128256
    hidden_size: int = 512
    intermediate_size: int = 1280
    num_encoder_layers: int = 2
    num_decoder_layers: int = 2
    latent_size: int = 128
    patch_size: int = 4
    ae_dropout: float = 0.15
    """Probability of replacing an input token by id 0, and of dropping a latent dimension (training only)."""
    kl_clamp: float = 0.5
    """Free bits: each latent dimension's KL is floored at this value."""
    kl_weight: float = 1e-3
    hidden_act: str = "silu"
    mlp_bias: bool = False
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        require_at_least(self, ("vocab_size", "hidden_size", "intermediate_size", "latent_size", "patch_size"), 1)
        require_at_least(self, ("num_encoder_layers", "num_decoder_layers"), 0)
        if not 0.0 <= self.ae_dropout < 1.0:
            raise ValueError(f"AutoencoderConfig.ae_dropout must be in [0, 1), got {self.ae_dropout}")
        super().__post_init__(**kwargs)


@dataclass
class AutoencoderOutput(ModelOutput):
    """`loss` is the training objective in train mode and the plain CE in eval mode."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    ce: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    accuracy: torch.Tensor | None = None


class AELayer(nn.Module):
    """x + SwiGLU(RMSNorm(x)); no attention, so every position is processed on its own."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.layernorm(x))


class AEEncoder(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        d, k = config.hidden_size, config.patch_size
        self.patch_size = k
        self.n_first = config.num_encoder_layers // 2
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.encoder_layers = nn.ModuleList(AELayer(config) for _ in range(config.num_encoder_layers))
        self.squeeze_layer = nn.Linear(k * d, d)
        self.norm = LlamaRMSNorm(d, eps=config.rms_norm_eps)
        self.hidden_to_latent = nn.Linear(d, 2 * config.latent_size)

    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """(B, L) token ids -> (B, L/K, 2l): mean and log-std concatenated."""
        b, length = input_ids.shape
        h = self.embed_tokens(input_ids)
        for layer in self.encoder_layers[: self.n_first]:
            h = layer(h)
        h = self.squeeze_layer(h.reshape(b, length // self.patch_size, -1))
        for layer in self.encoder_layers[self.n_first :]:
            h = layer(h)
        return self.hidden_to_latent(self.norm(h))


class AEDecoder(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        d, k = config.hidden_size, config.patch_size
        self.patch_size = k
        self.n_first = config.num_decoder_layers // 2
        self.latent_to_hidden = nn.Linear(config.latent_size, d)
        self.decoder_layers = nn.ModuleList(AELayer(config) for _ in range(config.num_decoder_layers))
        self.expand_layer = nn.Linear(d, k * d)
        self.norm = LlamaRMSNorm(d, eps=config.rms_norm_eps)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, T, l) latents -> (B, T*K, d) final hidden states (before the tied output matrix)."""
        b, t, _ = latents.shape
        h = self.latent_to_hidden(latents)
        for layer in self.decoder_layers[: self.n_first]:
            h = layer(h)
        h = self.expand_layer(h).reshape(b, t * self.patch_size, -1)
        for layer in self.decoder_layers[self.n_first :]:
            h = layer(h)
        return self.norm(h)


def clamped_kl(mu: torch.Tensor, log_sigma: torch.Tensor, floor: float) -> torch.Tensor:
    """KL(N(mu, sigma) || N(0, 1)) per dimension, floored at `floor`, summed over dimensions: (..., l) -> (...)."""
    kl = 0.5 * (mu.pow(2) + torch.exp(2 * log_sigma) - 1.0 - 2.0 * log_sigma)
    return kl.clamp(min=floor).sum(-1)


class Autoencoder(PreTrainedModel):
    """K tokens <-> one latent vector. See the module docstring for the objective."""

    config_class = AutoencoderConfig
    base_model_prefix = "autoencoder"
    main_input_name = "input_ids"
    _no_split_modules = ["AELayer"]
    # There is no attention at all, so whatever kernel a caller (or an enclosing CALM) picks is fine.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: AutoencoderConfig):
        super().__init__(config)
        self.patch_size = config.patch_size
        self.encoder = AEEncoder(config)
        self.decoder = AEDecoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.embed_tokens

    def _check_length(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2 or input_ids.shape[1] % self.patch_size:
            raise ValueError(
                f"Autoencoder expects input_ids of shape (B, L) with L a multiple of patch_size={self.patch_size}, "
                f"got {tuple(input_ids.shape)}"
            )

    def encode(self, input_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) ids -> (mu, log_sigma), each (B, L/K, latent_size)."""
        self._check_length(input_ids)
        mu, log_sigma = self.encoder(input_ids).chunk(2, dim=-1)
        return mu, log_sigma

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, T, latent_size) -> logits (B, T*K, vocab); the output matrix is the encoder's embedding table."""
        hidden = self.decoder(latents)
        return F.linear(hidden, self.encoder.embed_tokens.weight)

    def forward(self, input_ids: torch.LongTensor, accuracy: bool = True, ce_chunk_rows: int | str = 0,
                **kwargs) -> AutoencoderOutput:
        """`accuracy=False` skips the argmax over the logits (training computes it on logged steps only).
        `ce_chunk_rows` ("auto" or rows; 0 = whole logits, the default) computes the cross-entropy in
        chunks of rows (`losses.linear_cross_entropy`); the output then has no logits."""
        config = self.config
        self._check_length(input_ids)
        if self.training:
            masked = torch.rand(input_ids.shape, device=input_ids.device) < config.ae_dropout
            mu, log_sigma = self.encode(input_ids.masked_fill(masked, 0))
            z = mu + torch.exp(log_sigma) * torch.randn_like(mu)
            z = F.dropout(z, p=config.ae_dropout, training=True)
        else:
            mu, log_sigma = self.encode(input_ids)
            z = mu
        weight = self.encoder.embed_tokens.weight
        rows = resolve_chunk_rows(ce_chunk_rows, input_ids.numel(), config.vocab_size, input_ids.device.type)
        acc = None
        if rows:
            ce, correct = linear_cross_entropy(self.decoder(z), weight, input_ids, rows, count_correct=accuracy)
            logits = None
            if accuracy:
                acc = correct.float() / input_ids.numel()
        else:
            logits = self.decode(z)
            ce = F.cross_entropy(logits.float().flatten(0, 1), input_ids.flatten())
            if accuracy:
                with torch.no_grad():
                    acc = (logits.argmax(-1) == input_ids).float().mean()
        kl = clamped_kl(mu.float(), log_sigma.float(), config.kl_clamp).mean()
        loss = config.patch_size * ce + config.kl_weight * kl if self.training else ce
        # In training the (tokens x vocabulary) logits are not handed out: an output holding them would
        # keep them alive through backward, which needs only the loss's own saved tensors.
        return AutoencoderOutput(loss=loss, logits=None if self.training else logits, ce=ce.detach(),
                                 kl=kl.detach(), accuracy=acc)

    @torch.no_grad()
    def reconstruct(self, input_ids: torch.LongTensor, sample: bool = True, noise_std: float = 0.0) -> torch.Tensor:
        """Encode, optionally sample z from the posterior and add N(0, noise_std^2) noise, decode by argmax.

        No input masking or latent dropout (inference semantics). Returns token ids shaped like `input_ids`.
        """
        mu, log_sigma = self.encode(input_ids)
        z = mu + torch.exp(log_sigma) * torch.randn_like(mu) if sample else mu
        if noise_std > 0:
            z = z + noise_std * torch.randn_like(z)
        return self.decode(z).argmax(-1)

    @torch.no_grad()
    def reconstruction_accuracy(
        self, input_ids: torch.LongTensor, sample: bool = True, noise_std: float = 0.0
    ) -> torch.Tensor:
        """Token-level fraction reconstructed exactly (a 0-dim float tensor); see `reconstruct`."""
        return (self.reconstruct(input_ids, sample=sample, noise_std=noise_std) == input_ids).float().mean()
