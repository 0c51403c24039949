"""Baseline BrierLM: the batched estimator against the per-position loop, same model, data and draws.

    OMP_NUM_THREADS=1 python -m bench.brierlm [--context 2048] [--vocab-size 32000] [--collision 0.4] [--repeats 3]
    OMP_NUM_THREADS=1 python -m bench.brierlm --calm --context 8192     # CALM: certified vs reference decode
    OMP_NUM_THREADS=1 python -m bench.brierlm --calm --context 8192 --authors-src ~/calm  # and the authors' code
    OMP_NUM_THREADS=1 python -m bench.brierlm --model runs/baseline-s/export \\
        --data wikitext103_test.jsonl       # WikiText-103 test documents, JSONL of {"text": ...}

Default: a random-init Llama of 4 layers, d = 256 (the authors' measurement: their per-position loop
made ~3,800 forward calls and took 21.5 s for one 2048-token sequence of such a model on one CPU
core) on random tokens. A random model predicts almost uniformly, so its two samples never agree and
no branch is ever needed; to load both estimators as a trained model would, the output matrix is
scaled so that the mean collision probability Σ P² of the teacher-forced steps is `--collision`.
With `--model`/`--data` an exported baseline is run on the first `--context` tokens of the first
document instead. Both estimators use one generator seed, so they make identical draws and their
estimates must agree to float precision (printed). Prints forward calls, wall and CPU seconds (the
CPU figure is the fairer one when other jobs share the cores) and the ratios; the batched estimator
is the best of `--repeats` runs, the per-position loop runs once.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.brier.brierlm import baseline_brier_batched, baseline_brier_reference  # noqa: E402


def random_model(vocab: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=8192,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def sharpen(model, ids: torch.Tensor, target: float) -> float:
    """Scale the output matrix so that the mean Σ P² over the first 256 steps is `target` (bisection)."""
    logits = model(ids[:, :256]).logits[0].double()
    lo, hi = 0.0, 1.0

    def mean_coll(scale: float) -> float:
        return float((logits * scale).softmax(-1).square().sum(-1).mean())

    while mean_coll(hi) < target:
        hi *= 2
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_coll(mid) < target else (lo, mid)
    model.get_output_embeddings().weight.mul_(hi)
    return hi


def timed(fn):
    """Result, wall seconds and this process's CPU seconds (robust when other jobs share the cores)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def authors_model(calm, src: str, collision: float):
    """The authors' CALM (their code, imported from the checkout `src`, not part of this repository) with
    `calm`'s weights: their parameter names are ours (pretrain/models/calm.py), the head also listed as
    `generative_head.*`, the autoencoder saved for their `ae_path`. Their head's samples are replaced by
    the same synthetic codes as ours (`bench.generate.synthetic_head`), so both estimate one distribution."""
    import tempfile

    from bench.generate import zipf_for_collision

    sys.path.insert(0, str(Path(src).resolve()))
    from models.configuration_calm import CALMConfig  # the authors' modules
    from models.modeling_energy import EnergyTransformer

    config = calm.config.to_dict()
    for key in ("ae_config", "auto_map"):
        config.pop(key, None)
    with tempfile.TemporaryDirectory(prefix="authors-ae-") as ae_dir:  # read once, by their constructor
        calm.ae_model.save_pretrained(ae_dir, safe_serialization=False)
        theirs = EnergyTransformer(CALMConfig(**dict(config, ae_path=ae_dir)))
    state = dict(calm.state_dict())
    state.update({"generative_head." + k[len("mlp_generator."):]: v for k, v in state.items()
                  if k.startswith("mlp_generator.")})
    theirs.load_state_dict(state, strict=False)
    theirs.ae_model.decoder.lm_head_weight = theirs.ae_model.encoder.embed_tokens.weight  # tied, as they set it
    table = torch.randn(64, calm.config.latent_size, generator=torch.Generator().manual_seed(0))
    probs = zipf_for_collision(64, collision).float()
    real = theirs.generative_head.sample

    def sample(hidden):
        z = real(hidden)
        return table[torch.multinomial(probs, z[..., 0].numel(), replacement=True)].view(z.shape)

    theirs.generative_head.sample = sample
    return theirs.eval()


def calm_bench(args) -> None:
    """CALM BrierLM on one sequence of `--context` tokens: the certified argmax decoder against the
    per-sample reference decode (every draw through the float32 full-vocabulary projection), same draws;
    with `--authors-src`, the authors' evaluation forward on the same weights beside them."""
    from bench.generate import BACKBONE, synthetic_head
    from pretrain.brier.calm_brier import CALMSampler, calm_brier
    from pretrain.stages import build_model

    torch.manual_seed(0)
    ae = dict(vocab_size=args.vocab_size, hidden_size=256, intermediate_size=640, latent_size=128, patch_size=4)
    calm = build_model("calm", dict(BACKBONE, vocab_size=args.vocab_size, latent_size=128, patch_size=4,
                                    num_mlp_layers=1, max_position_embeddings=args.context // 4, ae_config=ae)).eval()
    theirs = authors_model(calm, args.authors_src, args.collision) if args.authors_src else None
    synthetic_head(calm, args.collision)
    ids = torch.randint(0, args.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(1))
    print(f"model: random CALM 4x256, K=4, AE width 256, vocab {args.vocab_size}, head collision Σ P² = "
          f"{args.collision} (bench.generate's synthetic head), {args.context} random tokens; threads: "
          f"{torch.get_num_threads()}", flush=True)
    runs = {"reference (float32)": lambda: calm_brier(CALMSampler(calm, torch.Generator().manual_seed(args.seed),
                                                                  screened_decode=False), ids).estimates,
            "certified argmax": lambda: calm_brier(CALMSampler(calm, torch.Generator().manual_seed(args.seed)),
                                                   ids).estimates}
    if theirs is not None:
        runs["authors' eval forward"] = lambda: authors_brier(theirs, ids)
    best = {}
    for _ in range(args.repeats):  # interleaved, so a changing machine load hits all alike
        for name, fn in runs.items():
            out, wall, cpu = timed(fn)
            if name not in best or wall < best[name][1]:
                best[name] = (out, wall, cpu)
    print(f"{'estimator':<24}{'wall s':>9}{'CPU s':>9}{'ours vs it (wall / CPU)':>26}   Brier-1..4 of this block")
    _, wall_fast, cpu_fast = best["certified argmax"]
    for name, (out, wall, cpu) in best.items():
        means = out if out.dim() == 1 else out.mean(0)
        print(f"{name:<24}{wall:>9.2f}{cpu:>9.2f}{f'{wall / wall_fast:.2f}x / {cpu / cpu_fast:.2f}x':>26}   "
              + ", ".join(f"{m:.4f}" for m in means.tolist()))
    same = torch.equal(best["reference (float32)"][0], best["certified argmax"][0])
    print(f"identical estimates (certified vs reference, same draws): {same}")


@torch.no_grad()
def authors_brier(model, ids: torch.Tensor) -> torch.Tensor:
    """The authors' evaluation forward (energy loss and Brier-1..4, as their evaluation runs it) -> (4,)."""
    out = model(input_ids=ids, labels=ids)
    return torch.stack([out.brier1, out.brier2, out.brier3, out.brier4]).double()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calm", action="store_true",
                   help="time CALM's estimator instead: certified argmax decoding vs the per-sample reference decode")
    p.add_argument("--authors-src", metavar="DIR",
                   help="with --calm: a checkout of the authors' CALM repository (its models/ package); their "
                        "evaluation forward is timed beside ours on the same weights (their code is imported "
                        "from DIR, not shipped here)")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--collision", type=float, default=0.4, help="target mean Σ P² (random model only)")
    p.add_argument("--model", help="exported baseline directory (default: random 4-layer, 256-wide Llama)")
    p.add_argument("--data", help=".jsonl documents (with --model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="runs of the batched estimator (best is reported)")
    args = p.parse_args()
    if args.calm:
        return calm_bench(args)

    if args.model:
        from transformers import AutoTokenizer

        from evaluation.documents import read_documents, tokenize_documents
        from pretrain.stages import load_model

        model = load_model("baseline", args.model).eval()
        ids = tokenize_documents(AutoTokenizer.from_pretrained(args.model), read_documents(args.data)[:1])[0]
        ids = torch.tensor(ids[: args.context])[None]
        what = f"{args.model} on {len(ids[0])} tokens of {args.data}"
    else:
        model = random_model(args.vocab_size)
        ids = torch.randint(0, args.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(1))
        scale = sharpen(model, ids, args.collision)
        what = (f"random Llama 4x256, vocab {args.vocab_size}, {args.context} random tokens, "
                f"output matrix x{scale:.3g} for mean Σ P² = {args.collision}")
    print(f"model: {what}; threads: {torch.get_num_threads()}", flush=True)

    # the batched estimator takes seconds: best of --repeats (the first also warms the allocator)
    runs = [timed(lambda: baseline_brier_batched(model, ids, generator=torch.Generator().manual_seed(args.seed)))
            for _ in range(args.repeats)]
    fast, wall_fast, cpu_fast = min(runs, key=lambda r: r[1])
    slow, wall_slow, cpu_slow = timed(
        lambda: baseline_brier_reference(model, ids, generator=torch.Generator().manual_seed(args.seed)))
    diff = float((fast.estimates - slow.estimates).abs().max())
    positions = fast.estimates.shape[0]
    print(f"{'estimator':<14}{'forward calls':>14}{'wall s':>9}{'CPU s':>9}{'ms/position':>13}")
    for name, out, wall, cpu in (("per-position", slow, wall_slow, cpu_slow), ("batched", fast, wall_fast, cpu_fast)):
        print(f"{name:<14}{out.forward_calls:>14}{wall:>9.2f}{cpu:>9.2f}{1e3 * wall / positions:>13.2f}")
    print(f"speed-up: {wall_slow / wall_fast:.1f}x wall, {cpu_slow / cpu_fast:.1f}x CPU "
          f"(goal >= 20x at a 2048-token context); positions: {positions}; "
          f"max |estimate difference|: {diff:.2e}")
    means = fast.estimates.mean(0).tolist()
    print("Brier-1..4 of this block: " + ", ".join(f"{m:.4f}" for m in means))


if __name__ == "__main__":
    main()
