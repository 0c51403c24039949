"""`CALM.generate()`: transformers' usual generation interface over our likelihood-free samplers.

A CALM has no logits, so transformers' `GenerationMixin` (logits processors, greedy search, beams)
cannot drive it. This mixin gives it the same call shape instead: `input_ids` (left-padded batches
with their `attention_mask`), a `generation_config` and/or keyword overrides (`max_new_tokens`,
`max_length`, `do_sample`, `temperature`, `eos_token_id`, `pad_token_id`, `num_return_sequences`),
a `streamer` (put/end, batch of one), and `seed` or a torch `generator` for reproducible draws.
It returns the prompts followed by the new tokens, like transformers, so `pipeline("text-generation")`
and `TextStreamer` work unchanged; `return_dict_in_generate=True` adds what the sampling cost.

Sampling is exact for any temperature in (0, 1] (`sampler="exact"`, the default; see
`generation.calm_generate`); `sampler="batch"` is the authors' faster approximation. There is no
greedy decoding (`do_sample=False`) and no top-k/top-p: they need the likelihoods a CALM does not have.
The class name ends in "GenerationMixin" because that is how transformers recognises a model that
can generate.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.utils import ModelOutput

from .generation import calm_generate

UNSUPPORTED = ("top_k", "top_p", "min_p", "typical_p", "num_beams", "repetition_penalty", "no_repeat_ngram_size",
               "penalty_alpha", "num_beam_groups", "epsilon_cutoff", "eta_cutoff", "guidance_scale")
"""Generation options that need token probabilities; refused when set to anything but their neutral value."""
NEUTRAL = {"top_k": (0, None), "top_p": (1.0, None), "min_p": (None,), "typical_p": (1.0, None),
           "num_beams": (1, None), "repetition_penalty": (1.0, None), "no_repeat_ngram_size": (0, None),
           "num_beam_groups": (1, None), "guidance_scale": (None, 1.0)}
IGNORED = ("use_cache", "output_scores", "output_logits", "output_attentions", "output_hidden_states",
           "renormalize_logits", "remove_invalid_values", "min_new_tokens", "min_length", "bos_token_id")
"""Accepted and without effect here (there are no scores or logits; EOS ends a row whenever sampled)."""


@dataclass
class CALMGenerateOutput(ModelOutput):
    """`generate(..., return_dict_in_generate=True)`: the sequences and what sampling them cost."""

    sequences: torch.LongTensor | None = None
    """(B, prompt + max_new_tokens): the prompts as given, then the new tokens (pad after EOS)."""
    new_tokens: torch.LongTensor | None = None
    """(B, max_new_tokens) the generated part alone."""
    lengths: torch.LongTensor | None = None
    """(B,) generated tokens per row, EOS included."""
    backbone_calls: int | None = None
    draws: int | None = None
    """Head samples decoded in total."""
    capped: int | None = None
    """Chunks where the exact sampler hit its draw cap and fell back to the batch rule."""


class CALMGenerationMixin:
    """Gives CALM a transformers-style `generate()` (see the module docstring)."""

    @torch.no_grad()
    def generate(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                 generation_config: GenerationConfig | None = None, streamer=None,
                 generator: torch.Generator | None = None, seed: int | None = None, sampler: str = "exact",
                 max_draws: int = 1000, num_candidates: int = 200, return_dict_in_generate: bool | None = None,
                 prompt_alignment: str | None = None, **kwargs):
        """See the module docstring. `prompt_alignment`: "constrain" (the default) or "left_pad" for
        models fine-tuned on prompt/response data (`generation.left_pad`); when None, the generation
        config's `prompt_alignment` if it has one."""
        config = self._generation_settings(generation_config, kwargs)
        alignment = prompt_alignment or getattr(config, "prompt_alignment", None) or "constrain"
        prompts, given = self._prompts(input_ids, attention_mask)
        if config.num_return_sequences and config.num_return_sequences > 1:
            n = config.num_return_sequences
            prompts = [p for p in prompts for _ in range(n)]
            given = given.repeat_interleave(n, dim=0)
        max_new = _max_new_tokens(config, given.shape[1])
        self._check_positions(prompts, max_new)
        if streamer is not None and len(prompts) != 1:
            raise ValueError("a streamer takes one prompt at a time (batch size 1), as in transformers")
        if seed is None:
            # Drawn from torch's global RNG, so torch.manual_seed(s) before generate() repeats a generation.
            seed = int(torch.randint(2**62, (1,), generator=generator).item())
        on_tokens = None
        if streamer is not None:
            streamer.put(given.cpu())
            on_tokens = lambda new: streamer.put(torch.tensor(new[0], dtype=torch.long)) if new[0] else None  # noqa: E731
        out = calm_generate(self, prompts, max_new, config.temperature, sampler, config.eos_token_id,
                            config.pad_token_id, seed, num_candidates, max_draws, on_tokens=on_tokens,
                            prompt_alignment=alignment)
        if streamer is not None:
            streamer.end()
        sequences = torch.cat([given.to(out.sequences.device), out.sequences], dim=1)
        if not (return_dict_in_generate if return_dict_in_generate is not None else config.return_dict_in_generate):
            return sequences
        return CALMGenerateOutput(sequences=sequences, new_tokens=out.sequences, lengths=out.lengths,
                                  backbone_calls=out.backbone_calls, draws=out.draws, capped=out.capped)

    def _generation_settings(self, generation_config: GenerationConfig | None, kwargs: dict) -> GenerationConfig:
        """The model's generation config, updated by `generation_config` and then by keyword overrides."""
        config = copy.deepcopy(getattr(self, "generation_config", None) or GenerationConfig())
        if config.do_sample is None:  # a CALM always samples; saying so keeps transformers from warning
            config.do_sample = True
        if generation_config is not None:
            config.update(**generation_config.to_diff_dict())
        unknown = [k for k in kwargs if not hasattr(config, k) and k not in IGNORED]
        if unknown:
            raise TypeError(f"CALM.generate() got unexpected keyword argument(s) {unknown}")
        config.update(**{k: v for k, v in kwargs.items() if k not in IGNORED})
        refused = [f"{k}={getattr(config, k)!r}" for k in UNSUPPORTED
                   if getattr(config, k, None) not in NEUTRAL.get(k, (None,))]
        if refused:
            raise ValueError(f"CALM cannot apply {', '.join(refused)}: it samples without token probabilities. "
                             "Only temperature (0, 1] shapes its samples")
        if config.do_sample is False:
            raise ValueError("CALM has no greedy decoding (do_sample=False): it has no likelihoods to maximise; "
                             "use do_sample=True with a temperature in (0, 1] (low values approach the mode)")
        if config.temperature is None:
            config.temperature = 1.0
        if not 0.0 < config.temperature <= 1.0:
            raise ValueError(f"CALM samples at temperatures in (0, 1], got temperature={config.temperature}")
        if config.eos_token_id is None:
            config.eos_token_id = self.config.eos_token_id
        if isinstance(config.eos_token_id, list):
            config.eos_token_id = config.eos_token_id[0]
        if config.pad_token_id is None:
            config.pad_token_id = self.config.pad_token_id
        return config

    def _prompts(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None
                 ) -> tuple[list[list[int]], torch.Tensor]:
        """Each row's real tokens (padding dropped, wherever the mask puts it) and the ids as given."""
        if input_ids is None:
            return [[]], torch.zeros(1, 0, dtype=torch.long)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if attention_mask is None:
            return input_ids.tolist(), input_ids
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids "
                             f"{tuple(input_ids.shape)}")
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)]
        return rows, input_ids

    def _check_positions(self, prompts: list[list[int]], max_new: int) -> None:
        k, limit = self.config.patch_size, self.config.max_position_embeddings
        longest = max(len(p) for p in prompts)
        needed = -(-max(longest, k) // k) + -(-max_new // k)
        if needed > limit:
            raise ValueError(f"a prompt of {longest} tokens plus {max_new} new tokens needs {needed} positions of "
                             f"{k} tokens, but this CALM has max_position_embeddings={limit} "
                             f"({limit * k} tokens): shorten the prompt or max_new_tokens")


def _max_new_tokens(config: GenerationConfig, prompt_width: int) -> int:
    """max_new_tokens, else max_length minus the prompt (transformers' rule), else 20."""
    if config.max_new_tokens is not None:
        new = config.max_new_tokens
    elif config.max_length is not None:
        new = config.max_length - prompt_width
    else:
        new = 20
    if new < 1:
        raise ValueError(f"nothing to generate: max_new_tokens={config.max_new_tokens}, max_length={config.max_length}, "
                         f"prompt of {prompt_width} tokens")
    return new
