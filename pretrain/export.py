"""Consolidate a ZeRO checkpoint into a plain Hugging Face directory that loads without DeepSpeed.

    python -m pretrain.export RUN_DIR [--tag step_00001000] [--output DIR]

writes (default `RUN_DIR/export/`): `model.safetensors` (fp32), `config.json`, the tokenizer the
shards were made with, and `training.json` (stage, step, tokens seen, the data's tokenizer
identity). The fp32 master weights come from DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint`,
which needs no process group. A CALM export is self-contained: its config embeds the autoencoder's
config and its weights include the frozen autoencoder (`ae_model.*`, loaded from the run's ae_path),
so `AutoModel.from_pretrained(export)` needs nothing else. Training calls `export_run` at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

from pretrain import checkpoint


class ExportError(RuntimeError):
    """The checkpoint does not match the model its config describes."""


def export_run(run_dir: str | Path, tag: str | None = None, output: str | Path | None = None) -> Path:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pretrain.data import load_tokenizer, read_manifest
    from pretrain.stages import build_model

    run_dir = Path(run_dir)
    root = checkpoint.checkpoint_root(run_dir)
    tag = tag or checkpoint.latest_tag(run_dir)
    if tag is None or not (root / tag).is_dir():
        raise ExportError(f"no checkpoint {tag or 'latest'} in {root}")
    with open(root / tag / "config.yaml") as fh:
        config = yaml.safe_load(fh)
    trainer_state = json.loads((root / tag / "trainer_state.json").read_text())
    stage = config["stage"]
    model = build_model(stage, config["model"], config.get("ae_path"), device="cpu")
    state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = [k for k in missing if k not in tied and not (stage == "calm" and k.startswith("ae_model."))]
    if missing or unexpected:
        raise ExportError(f"checkpoint {root / tag} does not fit the {stage} model of its config.yaml: "
                          f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    output = Path(output) if output else run_dir / "export"
    output.mkdir(parents=True, exist_ok=True)
    model.to(torch.float32).save_pretrained(output)
    load_tokenizer(config["data"]["path"]).save_pretrained(output)
    manifest = read_manifest(config["data"]["path"])
    (output / "training.json").write_text(json.dumps({
        "stage": stage, "step": trainer_state["step"], "tokens_seen": trainer_state["tokens_seen"],
        "checkpoint": str(root / tag), "data_tokenizer": manifest["tokenizer"]}, indent=1))
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the one named by latest)")
    parser.add_argument("--output", default=None, help="output directory (default: RUN_DIR/export)")
    args = parser.parse_args(argv)
    try:
        print(export_run(args.run_dir, args.tag, args.output))
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
