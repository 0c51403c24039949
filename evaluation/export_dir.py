"""What an exported model directory holds, found in one place: its tokenizer and, for generation,
the model with its kind (CALM or baseline, from config.json).

Shared by the generation command (evaluation/generate.py) and the evaluation command
(`python -m evaluation`), so that both look for a saved tokenizer the same way.
"""

from __future__ import annotations

import json
from pathlib import Path


def find_tokenizer_dir(model_dir: str | Path, explicit: str | Path | None = None, look_above: bool = True) -> Path:
    """The directory of the tokenizer saved with an export: `explicit` when given, else the first of
    DIR, DIR/tokenizer and (with `look_above`) DIR/../tokenizer, DIR/.. that holds tokenizer.json or
    tokenizer_config.json."""
    model_dir = Path(model_dir)
    candidates = [Path(explicit)] if explicit else [model_dir, model_dir / "tokenizer"]
    if look_above and not explicit:
        candidates += [model_dir.parent / "tokenizer", model_dir.parent]
    for path in candidates:
        if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            return path
    raise FileNotFoundError(f"no tokenizer (tokenizer.json) in {', '.join(map(str, candidates))}; pass --tokenizer DIR")


def load_generator(model_dir: str | Path, ae_path: str | None = None, device: str = "cpu"):
    """(model, kind) for an exported directory; kind is 'calm' or 'baseline' from its config.json."""
    from pretrain.stages import load_model, stage_of_model_type

    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: --model must be an exported model directory")
    model_type = json.loads(config_path.read_text()).get("model_type")
    try:
        stage = stage_of_model_type(model_type).name
    except ValueError:
        stage = None
    if stage not in ("calm", "baseline"):
        raise ValueError(f"{config_path}: model_type {model_type!r} is neither a CALM ('energy') nor a baseline ('llama')")
    kwargs = {"ae_path": ae_path} if ae_path and stage == "calm" else {}
    return load_model(stage, model_dir, **kwargs).to(device).eval(), stage
