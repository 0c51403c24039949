"""Temperature sampling from the Llama baseline, with the same interface and cost record as CALM's
`pretrain.models.generation.calm_generate`, so the evaluation, the benchmark and the command line
treat both kinds alike."""

from __future__ import annotations

import torch

from pretrain.models.generation import GenerationOutput, special_ids


@torch.no_grad()
def baseline_generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    seed: int = 0,
    streamer=None,
) -> GenerationOutput:
    """Temperature sampling from a `LlamaForCausalLM` through transformers' `generate` (left padding,
    no top-k/top-p, so it samples P^(1/T)/Z like the CALM samplers). One forward pass per token."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    eos, pad = special_ids(model, eos_token_id, pad_token_id)
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        attention[row, width - len(p):] = 1
    torch.manual_seed(seed)
    generated = model.generate(
        input_ids=ids.to(device), attention_mask=attention.to(device), max_new_tokens=max_new_tokens,
        do_sample=True, temperature=temperature, top_k=0, top_p=1.0, eos_token_id=eos, pad_token_id=pad,
        streamer=streamer,
    )[:, width:]
    out = torch.full((len(prompts), max_new_tokens), pad, dtype=torch.long, device=device)
    out[:, : generated.shape[1]] = generated
    is_eos = out == eos if eos is not None else torch.zeros_like(out, dtype=torch.bool)
    first_eos = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, generated.shape[1])
    return GenerationOutput(sequences=out, lengths=first_eos, backbone_calls=generated.shape[1],
                            steps=generated.shape[1], draws=0, capped=0)
