"""Generation speed: CALM vs the discrete baseline with the same backbone, at T = 1 and T = 0.5.

    OMP_NUM_THREADS=1 python -m bench.generate [--vocab-size 32000] [--ae-hidden 256] [--new-tokens 128]
        [--batch 1 16] [--collision 0.4] [--repeats 3]
    OMP_NUM_THREADS=1 python -m bench.generate --trained runs/quickstart     # the quick start's trained models

Random-init models: a Llama backbone of 4 layers, d = 256 (the baseline is that backbone plus its
LM head) and a CALM with K = 4, l = 128 and an autoencoder of `--ae-hidden` width. The default
width, 256, is the backbone's own: the paper pairs its 512-wide autoencoder with 1024-2560-wide
backbones (at most half their width), so for this backbone 128 would be the proportional choice and
256 already charges CALM more than the paper's ratio does (512 is the released autoencoder's absolute
width, whose decoder per draw costs about as much as a baseline token here). Prints, per batch
size and temperature, generated tokens/s (best of `--repeats`, interleaved with the other models'
runs so that a shared machine's changing load hits all alike), backbone forward passes per
generated token, head draws per chunk, draws decoded per chunk (a call's draws after a row's
acceptance included), of those the ones that needed the full-vocabulary projection (the rest were
certified against a reference draw, pretrain/models/argmax_decode.py), head + decoder calls per
step, the share of chunks `capped`, and CALM's speed-up over the baseline.

Capped: the exact sampler stops after `--max-draws` head draws for a chunk without an acceptance (at
T = 1/2 it accepts the first pair of consecutive draws that decode equal, so it needs about 1/Σ P(x)²
draws per chunk). A capped chunk is drawn by the authors' batch rule among that chunk's *last round*
of draws (a value seen c times weighted by C(c, n)), which is an approximation of P(x)^(1/T), so a
high capped share means the exact sampler's output was mostly approximate and its speed is that of
the cap. The calm batch sampler (`--num-candidates`) is that approximation throughout.

The baseline samples through transformers' `generate` (float32, KV cache, pure temperature
sampling, same thread count); a hand-written KV-cache loop (softmax(logits/T), multinomial) measured
within 5% of it at batch 1 and 16, so `generate`'s own overhead does not flatter CALM.

Why a synthetic head distribution: a random autoencoder decoder has near-tied logits everywhere, so
any spread of the head's latents gives a different chunk on every draw (collision probability
≈ 0) and the temperature samplers would only measure their caps, while a zero-initialised head gives
one chunk always (collision 1). A trained CALM sits in between. So the real head runs (its cost is
counted) and its output is replaced by one of 64 fixed latent codes drawn with Zipf weights tuned to
`--collision` = Σ P(x)² over chunks — the quantity the rejection samplers' cost depends on.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from evaluation.baseline_generation import baseline_generate
from pretrain.models.generation import calm_generate
from pretrain.stages import build_model

BACKBONE = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-6)


def zipf_for_collision(codes: int, collision: float) -> torch.Tensor:
    """Zipf weights over `codes` outcomes whose Σ p² is `collision` (bisection on the exponent)."""
    ranks = torch.arange(1, codes + 1, dtype=torch.float64)
    lo, hi = 0.0, 20.0
    for _ in range(60):
        s = (lo + hi) / 2
        p = ranks ** -s
        p /= p.sum()
        lo, hi = (s, hi) if (p * p).sum() < collision else (lo, s)
    return p


def synthetic_head(model, collision: float, codes: int = 64, seed: int = 0) -> None:
    """Keep the real head's computation, replace its output by Zipf-distributed fixed latent codes."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(codes, model.config.latent_size, generator=gen)
    probs = zipf_for_collision(codes, collision).float()
    real = model.sample_latents

    def sample_latents(hidden, num_samples=1, generator=None):
        z = real(hidden, num_samples=num_samples, generator=generator)
        # On the head's device and dtype (a GPU run passes a CUDA generator).
        idx = torch.multinomial(probs.to(z.device), z[..., 0].numel(), replacement=True, generator=generator)
        return table.to(z)[idx].view(z.shape)

    model.sample_latents = sample_latents


def timed(fns: list, repeats: int) -> list[tuple[float, object]]:
    """Best wall time (and last output) of each function; the repeats are interleaved across functions
    so that a change in the machine's load (it may be shared) hits every model alike."""
    best, outs = [float("inf")] * len(fns), [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            outs[i] = fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return list(zip(best, outs))


HEADER = (f"{'model':<22}{'batch':>6}{'T':>6}{'tok/s':>10}{'passes/tok':>12}{'draws/chunk':>13}"
          f"{'decoded/chunk':>15}{'projected/chunk':>17}{'calls/step':>12}{'capped':>8}{'vs base':>9}")


def compare(calm, baseline, prompts: list[list[int]], temperature: float, args) -> None:
    """One table block: the baseline and CALM's samplers on the same prompts at one temperature.
    `capped` is the share of chunks where the exact sampler hit its draw cap and fell back to the
    batch rule over its last round of draws (so those chunks are approximate; module docstring)."""
    batch, k = len(prompts), calm.patch_size
    variants = [("calm exact", dict(sampler="exact", first_round=args.draws_per_call, max_draws=args.max_draws))]
    if temperature < 1:
        variants.append((f"calm batch N={args.num_candidates}", dict(sampler="batch", num_candidates=args.num_candidates)))
    runs = [lambda: baseline_generate(baseline, prompts, args.new_tokens, temperature, eos_token_id=None,
                                      pad_token_id=0)]
    runs += [lambda kwargs=kwargs: calm_generate(calm, prompts, args.new_tokens, temperature, eos_token_id=None,
                                                 **kwargs) for _, kwargs in variants]
    (secs, out), *calm_runs = timed(runs, args.repeats)
    base_rate = batch * args.new_tokens / secs
    print(f"{'baseline (HF generate)':<22}{batch:>6}{temperature:>6}{base_rate:>10.1f}"
          f"{out.backbone_calls / args.new_tokens:>12.3f}{'-':>13}{'-':>15}{'-':>17}{'-':>12}{'-':>8}{'1.00x':>9}")
    for (name, _), (secs, out) in zip(variants, calm_runs):
        rate = batch * args.new_tokens / secs
        chunks = out.steps * batch
        print(f"{name:<22}{batch:>6}{temperature:>6}{rate:>10.1f}"
              f"{out.backbone_calls / args.new_tokens:>12.3f}{out.draws / chunks:>13.2f}"
              f"{out.decoded / chunks:>15.2f}{out.projected / (chunks * k):>17.2f}"
              f"{out.calls / out.steps:>12.2f}{out.capped / chunks:>8.1%}{rate / base_rate:>8.2f}x")


@torch.no_grad()
def head_collision(calm, blocks: torch.Tensor, draws: int = 32, seed: int = 0) -> float:
    """Mean over positions of the probability that two head samples decode to the same chunk (Σ P(x)²
    at T = 1), estimated from `draws` samples per position of held-out blocks (B, L): the quantity the
    exact sampler's cost at T = 1/2 depends on (about 1 / collision draws per chunk)."""
    hidden, _ = calm.backbone(calm.chunk_embeddings(blocks), use_cache=False)
    hidden = hidden.flatten(0, 1)
    latents = calm.sample_latents(hidden, draws, generator=torch.Generator().manual_seed(seed)).transpose(0, 1)
    chunks = calm.decode_latents(latents).view(hidden.shape[0], draws, calm.patch_size)
    same = (chunks[:, :, None, :] == chunks[:, None, :, :]).all(-1).float()
    pairs = draws * (draws - 1)
    return float(((same.sum((1, 2)) - draws) / pairs).mean())


def trained_models(run: Path, prompt_len: int, max_prompts: int):
    """The quick start's trained CALM and baseline (RUN/calm/export, RUN/baseline/export), prompts cut
    from its held-out shards (RUN/data), and the blocks they came from."""
    from pretrain.data import ShardLoader
    from pretrain.stages import load_model

    calm = load_model("calm", run / "calm" / "export").eval()
    baseline = load_model("baseline", run / "baseline" / "export").eval()
    blocks = next(iter(ShardLoader(str(run / "data"), "validation", max_prompts, shuffle=False, drop_last=False)))
    return calm, baseline, blocks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trained", type=Path, default=None,
                        help="a quick-start output directory (runs/quickstart): time its trained CALM and "
                             "baseline on prompts from its held-out split instead of the synthetic models")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--ae-hidden", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--temperature", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--collision", type=float, default=0.4, help="Σ P(x)² of the synthetic chunk distribution")
    parser.add_argument("--draws-per-call", type=int, default=None,
                        help="exact sampler: first round of draws (default: the sampler's own, n + (α > 0))")
    parser.add_argument("--max-draws", type=int, default=1000,
                        help="exact sampler: cap on head draws per chunk; a chunk reaching it unaccepted is "
                             "'capped' and chosen by the batch rule among its last round of draws (approximate)")
    parser.add_argument("--num-candidates", type=int, default=200, help="batch sampler N (the authors' default)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    if args.trained:
        calm, baseline, blocks = trained_models(args.trained, args.prompt_len, max(args.batch))
        collision = head_collision(calm, blocks[:8])
        print(f"# threads={torch.get_num_threads()} trained quick-start models from {args.trained}: CALM "
              f"{calm.config.num_hidden_layers}x{calm.config.hidden_size}, K={calm.patch_size}, vocab "
              f"{calm.config.vocab_size}; {args.new_tokens} new tokens after {args.prompt_len}-token held-out "
              f"prompts; head collision Σp² (T=1, mean over held-out positions) = {collision:.3f}")
        prompt_rows = blocks[:, : args.prompt_len].tolist()
    else:
        calm, baseline = synthetic_models(args)
        print(f"# threads={torch.get_num_threads()} vocab={args.vocab_size} backbone 4x256, AE width {args.ae_hidden}, "
              f"K={calm.patch_size}, {args.new_tokens} new tokens after {args.prompt_len}-token prompts, "
              f"collision Σp²={args.collision}")
        gen = torch.Generator().manual_seed(1)
        prompt_rows = torch.randint(2, args.vocab_size, (max(args.batch), args.prompt_len), generator=gen).tolist()
    print(HEADER)
    for batch in args.batch:
        for temperature in args.temperature:
            compare(calm, baseline, prompt_rows[:batch], temperature, args)


def synthetic_models(args):
    vocab = args.vocab_size
    baseline = build_model("baseline", dict(BACKBONE, vocab_size=vocab), device="cpu").eval()
    ae = dict(vocab_size=vocab, hidden_size=args.ae_hidden, intermediate_size=int(2.5 * args.ae_hidden),
              latent_size=128, patch_size=4)
    calm = build_model("calm", dict(BACKBONE, vocab_size=vocab, latent_size=128, patch_size=4, num_mlp_layers=1,
                                    ae_config=ae), device="cpu").eval()
    synthetic_head(calm, args.collision)
    return calm, baseline


if __name__ == "__main__":
    main()
