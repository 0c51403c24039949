"""Self-contained Hugging Face exports: from a training run, from the authors' released checkpoints, to the Hub.

    python -m pretrain.export RUN_DIR [--tag step_00001000] [--output DIR] [--push-to-hub ORG/NAME [--private]]
    python -m pretrain.export --from-authors CALM_DIR --ae-path AE_DIR --output OUT [--tokenizer DIR]
    python -m pretrain.export --from-authors AE_DIR --output OUT --tokenizer DIR

An export (default `RUN_DIR/export/`) holds `model.safetensors` (fp32), `config.json`, the tokenizer,
`generation_config.json` (CALM, baseline), `training.json` and a model card (`README.md`). The
autoencoder and CALM exports also carry their modeling code (transformers' custom-code mechanism:
`auto_map` in config.json and our `pretrain/models` modules copied beside the weights), so plain
`transformers` loads them with `trust_remote_code=True` and no copy of this repository:

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)      # CALM, with generate()
    pipeline("text-generation", model=DIR, trust_remote_code=True)         # CALM or baseline

The baseline stays a plain `LlamaForCausalLM`. Special tokens (EOS, PAD, BOS where the tokenizer has
one) come from the tokenizer, in config.json and generation_config.json. A CALM export embeds its
autoencoder (config and `ae_model.*` weights). The fp32 master weights come from DeepSpeed's
`get_fp32_state_dict_from_zero_checkpoint`, which needs no process group. The export is written
beside its destination and moved into place only when complete. `--push-to-hub` uploads the
directory through `huggingface_hub` (token from `HF_TOKEN` or `huggingface-cli login`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
import yaml

from pretrain import checkpoint


class ExportError(RuntimeError):
    """The export cannot be made as asked; the message says why."""


def export_run(run_dir: str | Path, tag: str | None = None, output: str | Path | None = None) -> Path:
    """Consolidate checkpoint `tag` (default: latest) of a training run into an export directory."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pretrain.data import load_tokenizer, read_manifest
    from pretrain.stages import build_model

    run_dir = Path(run_dir)
    root = checkpoint.checkpoint_root(run_dir)
    tag = tag or checkpoint.latest_tag(run_dir)
    if tag is None or not (root / tag).is_dir():
        raise ExportError(f"no checkpoint {tag or 'latest'} in {root}")
    config = yaml.safe_load((root / tag / "config.yaml").read_text())
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
    # A mixture's sources share one tokenizer (pretrain.mixture): the first one's is the model's.
    sources = config["data"].get("sources") or []
    data = sources[0]["path"] if sources else config["data"]["path"]
    manifest = read_manifest(data)
    training = {"stage": stage, "step": trainer_state["step"], "tokens_seen": trainer_state["tokens_seen"],
                "block_len": manifest["block_len"], "checkpoint": str(root / tag),
                "data": sources or config["data"]["path"], "data_tokenizer": manifest["tokenizer"]}
    output = Path(output) if output else run_dir / "export"
    return save_export(model, stage, load_tokenizer(data), output, training, manifest, run_dir)


def convert_authors(source: str | Path, output: str | Path, ae_path: str | None = None,
                    tokenizer_dir: str | Path | None = None) -> Path:
    """A released CALM or autoencoder checkpoint (the authors' `.bin` layout and absolute `ae_path`)
    as our self-contained export: safetensors, remote code, special tokens, model card."""
    from transformers import AutoTokenizer

    from pretrain.stages import load_model, stage_of_model_type

    source = Path(source)
    if not (source / "config.json").is_file():
        raise ExportError(f"--from-authors {source}: no config.json there")
    try:
        stage = stage_of_model_type(json.loads((source / "config.json").read_text()).get("model_type")).name
    except ValueError as exc:
        raise ExportError(f"--from-authors {source}: {exc}") from exc
    if stage == "baseline":
        raise ExportError(f"{source} is a Llama model: it loads with plain transformers as it is")
    kwargs = {"ae_path": ae_path} if stage == "calm" and ae_path else {}
    try:
        model = load_model(stage, source, **kwargs)
    except FileNotFoundError as exc:
        raise ExportError(f"{exc} (pass --ae-path AE_DIR)") from exc
    candidates = [Path(tokenizer_dir)] if tokenizer_dir else [source] + ([Path(ae_path)] if ae_path else [])
    found = [d for d in candidates if (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file()]
    if not found:
        raise ExportError(f"no tokenizer in {', '.join(map(str, candidates))}; pass --tokenizer DIR "
                          "(the released models use the Llama 3 tokenizer)")
    tokenizer = AutoTokenizer.from_pretrained(str(found[0]))
    training = {"stage": stage, "converted_from": str(source), "ae_path": ae_path}
    return save_export(model, stage, tokenizer, Path(output), training, None, None)


def apply_special_tokens(model, stage: str, tokenizer, prompt_alignment: str | None = None) -> None:
    """EOS/PAD/BOS from the tokenizer into the config and (CALM, baseline) the generation config;
    `prompt_alignment` (CALM fine-tuned on prompt/response shards: "left_pad") goes there too, so
    `generate()` aligns prompts as training did without being told."""
    from transformers import GenerationConfig

    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
           "bos_token_id": tokenizer.bos_token_id}
    for name, value in ids.items():
        setattr(model.config, name, value)
    if stage == "autoencoder":
        return
    # Plain temperature sampling (no top-k/top-p) is what both kinds of model are evaluated with.
    sampling = {"do_sample": True, "temperature": 1.0}
    if stage == "baseline":
        sampling.update(top_k=0, top_p=1.0)
    elif prompt_alignment:
        sampling["prompt_alignment"] = prompt_alignment
    model.generation_config = GenerationConfig(**ids, **sampling)


def _mark_remote_code(model, stage: str) -> None:
    """Have save_pretrained copy our modeling modules and write `auto_map` (transformers' custom code)."""
    if stage == "baseline":
        return
    type(model.config).register_for_auto_class()
    if stage == "calm":
        module = type(model).__module__.rsplit(".", 1)[-1]
        model.config.auto_map = {"AutoModel": f"{module}.{type(model).__name__}"}
        type(model).register_for_auto_class("AutoModelForCausalLM")
    else:
        type(model).register_for_auto_class("AutoModel")


def save_export(model, stage: str, tokenizer, output: Path, training: dict, manifest: dict | None,
                run_dir: Path | None) -> Path:
    """Write the export into OUTPUT.partial, then move it into place (an interrupted export leaves
    no half-written OUTPUT)."""
    from pretrain.model_card import model_card
    from pretrain.stages import get_stage

    if len(tokenizer) != model.config.vocab_size:
        raise ExportError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                          f"{model.config.vocab_size}: not the tokenizer this model was trained with")
    masked = bool(manifest and manifest.get("loss_mask"))  # fine-tuning shards: prompts left-padded to K
    apply_special_tokens(model, stage, tokenizer, "left_pad" if masked else None)
    if stage == "calm":
        model.config.ae_path = None  # a local path; the autoencoder travels inside (ae_config, ae_model.*)
    _mark_remote_code(model, stage)
    spec = get_stage(stage)
    counts = {"params": spec.param_count(model.config)}
    if stage == "calm":
        counts["params_with_ae"] = spec.param_count(model.config, include_ae=True)
    if training.get("block_len") and training.get("tokens_seen"):
        counts["train_flops"] = spec.train_flops_per_token(model.config, training["block_len"]) * training["tokens_seen"]
        training["train_flops"] = counts["train_flops"]
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.to(torch.float32).save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / "training.json").write_text(json.dumps(training, indent=1))
    name = run_dir.name if run_dir is not None else output.name
    (partial / "README.md").write_text(model_card(stage, model.config, name, training, counts, manifest, run_dir))
    shutil.rmtree(output, ignore_errors=True)
    partial.rename(output)
    return output


def push_to_hub(folder: Path, repo_id: str, private: bool) -> str:
    """Upload an export directory as a Hub model repository; returns its URL."""
    import huggingface_hub

    token = huggingface_hub.get_token()
    if token is None:
        raise ExportError("no Hugging Face token: run `huggingface-cli login` or set HF_TOKEN, then push again")
    api = huggingface_hub.HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message=f"Upload {folder.name} (CALM pipeline export)")
    except Exception as exc:  # network, auth and HTTP errors of whatever client huggingface_hub uses
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"could not upload {folder} to {huggingface_hub.constants.ENDPOINT}/{repo_id}: "
                          f"{type(exc).__name__}: {reason}") from exc
    return str(url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.export", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("run_dir", nargs="?", help="a training run directory")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the one named by latest)")
    parser.add_argument("--output", default=None, help="output directory (default: RUN_DIR/export)")
    parser.add_argument("--from-authors", metavar="DIR", help="convert a released CALM or autoencoder checkpoint")
    parser.add_argument("--ae-path", help="with --from-authors: the released autoencoder (its config)")
    parser.add_argument("--tokenizer", help="with --from-authors: tokenizer directory, if not in DIR")
    parser.add_argument("--push-to-hub", metavar="ORG/NAME", help="upload the export to this Hub repository")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: a private repository")
    args = parser.parse_args(argv)
    if bool(args.run_dir) == bool(args.from_authors):
        parser.error("give either RUN_DIR or --from-authors DIR")
    if args.from_authors and not args.output:
        parser.error("--from-authors needs --output DIR")
    try:
        if args.from_authors:
            out = convert_authors(args.from_authors, args.output, args.ae_path, args.tokenizer)
        else:
            out = export_run(args.run_dir, args.tag, args.output)
        print(out)
        if args.push_to_hub:
            print(push_to_hub(out, args.push_to_hub, args.private))
    except (ExportError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
