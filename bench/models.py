"""Training-step speed of CALM next to a same-width Llama baseline, beside the FLOPs model's prediction.

Both models share depth, width and vocabulary and see the same number of tokens per step; CALM's
backbone runs over L/K chunk positions, plus its energy head (N samples), the energy loss and the
frozen autoencoder's encoder. The measured baseline/CALM time ratio is printed next to the ratio of
`evaluation.flops.train_flops_per_token`, with CALM's step broken into its parts. Forward+backward
only (no optimizer), fp32 on CPU or bf16 autocast on CUDA.

    python bench/models.py [--hidden 256] [--layers 4] [--vocab 8192] [--tokens 1024] [--batch 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.models import energy_loss
from pretrain.models.flops import train_flops_per_token  # noqa: E402
from pretrain.stages import build_model  # noqa: E402


def timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--tokens", type=int, default=1024, help="tokens per sequence (a multiple of K=4)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    d = args.hidden
    llama = dict(vocab_size=args.vocab, hidden_size=d, intermediate_size=int(2.6875 * d) // 8 * 8,
                 num_hidden_layers=args.layers, num_attention_heads=max(1, d // 64))
    ae = dict(vocab_size=args.vocab, hidden_size=512, intermediate_size=1280, latent_size=128, patch_size=4)
    calm_kwargs = dict(llama, latent_size=128, patch_size=4, num_mlp_layers=max(1, args.layers // 4), ae_config=ae)
    torch.manual_seed(0)
    baseline = build_model("baseline", llama, device=device).to(device).train()
    calm = build_model("calm", calm_kwargs, device=device).to(device).train()
    ids = torch.randint(0, args.vocab, (args.batch, args.tokens), device=device)
    k = calm.patch_size

    def step(model, **kw):
        def run():
            with autocast:
                loss = model(input_ids=ids, **kw).loss
            loss.backward()
        return run

    def calm_parts():
        with autocast:
            mu, log_sigma = calm.target_posterior(ids[:, k:])
            t1 = time.perf_counter()
            hidden, _ = calm.backbone(calm.chunk_embeddings(ids[:, :-k]))
            t2 = time.perf_counter()
            samples = calm.sample_latents(hidden, calm.config.num_samples)
            t3 = time.perf_counter()
            loss = energy_loss(samples, mu, log_sigma, calm.config.num_target_samples, calm.config.beta).mean()
        loss.backward()
        return t1, t2, t3, time.perf_counter()

    t_base = timed(step(baseline, labels=ids), args.repeats, device)
    t_calm = timed(step(calm), args.repeats, device)
    tokens = args.batch * args.tokens
    f_base = train_flops_per_token(baseline.config, "baseline", args.tokens)
    f_calm = train_flops_per_token(calm.config, "calm", args.tokens // k)
    print(f"device {device}, d={d}, layers={args.layers}, vocab={args.vocab}, {args.batch}x{args.tokens} tokens/step")
    print(f"{'model':10s} {'s/step':>8s} {'tokens/s':>10s} {'GFLOP/token':>12s}")
    print(f"{'baseline':10s} {t_base:8.3f} {tokens / t_base:10.0f} {f_base / 1e9:12.3f}")
    print(f"{'calm':10s} {t_calm:8.3f} {tokens / t_calm:10.0f} {f_calm / 1e9:12.3f}")
    print(f"speed-up baseline/calm: measured {t_base / t_calm:.2f}x, FLOPs model {f_base / f_calm:.2f}x")
    if device.type == "cpu":  # wall-clock splits are only meaningful without asynchronous kernels
        start = time.perf_counter()
        t1, t2, t3, t4 = calm_parts()
        total = t4 - start
        print(f"calm step split: AE targets {(t1 - start) / total:.0%}, backbone fwd {(t2 - t1) / total:.0%}, "
              f"head fwd {(t3 - t2) / total:.0%}, energy loss + whole backward {(t4 - t3) / total:.0%}")


if __name__ == "__main__":
    main()
