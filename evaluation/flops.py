"""The paper's parameter and FLOPs counts beside ours, for any presets (counting lives in pretrain.models.flops).

    python -m evaluation.flops                    # the paper's presets beside its Table 1
    python -m evaluation.flops calm-tiny my.yaml  # any presets or preset files
"""

from __future__ import annotations

import argparse

from pretrain.models.flops import inference_flops_per_token, param_count, train_flops_per_token

# Table 1 of the paper (docs/method.md §4): parameters, inference FLOPs per token.
TABLE1 = {
    "transformer-s": (281e6, 4.4e8), "transformer-m": (465e6, 7.9e8), "transformer-l": (849e6, 15.0e8),
    "calm-m": (371e6, 2.9e8), "calm-l": (735e6, 4.6e8), "calm-xl": (1.82e9, 9.4e8), "ae": (75e6, None),
}


def main(argv: list[str] | None = None) -> int:
    from pretrain.config import load_config
    from pretrain.stages import get_stage

    parser = argparse.ArgumentParser(prog="python -m evaluation.flops", description=__doc__.split("\n\n")[0])
    parser.add_argument("presets", nargs="*", default=list(TABLE1), help="preset names or YAML files")
    args = parser.parse_args(argv)
    print(f"{'preset':16s} {'params':>10s} {'paper':>8s} {'infer/tok':>10s} {'paper':>8s} {'train/tok':>10s}")
    for name in args.presets:
        preset = load_config(name)
        config = get_stage(preset.stage).build_config(preset.model, preset.ae_path)
        paper_params, paper_infer = TABLE1.get(name, (None, None))
        print(f"{name:16s} {param_count(config, preset.stage) / 1e6:9.1f}M "
              f"{'' if paper_params is None else f'{paper_params / 1e6:.0f}M':>8s} "
              f"{inference_flops_per_token(config, preset.stage):10.3g} "
              f"{'' if paper_infer is None else f'{paper_infer:.2g}':>8s} "
              f"{train_flops_per_token(config, preset.stage):10.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
