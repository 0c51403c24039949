"""A CALM saved the way the authors' released checkpoints are, for the tests that load or convert them:
a `.bin` state dict with the head repeated as `generative_head.*`, and a config without `ae_config`
whose `ae_path` is an absolute path on the authors' machines."""

from __future__ import annotations

import json
from pathlib import Path

import torch

AUTHORS_AE_PATH = "/mnt/authors/checkpoints/autoencoder"


def save_in_authors_layout(calm, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    state = dict(calm.state_dict())
    state.update({"generative_head." + k[len("mlp_generator."):]: v.clone()
                  for k, v in state.items() if k.startswith("mlp_generator.")})
    torch.save(state, directory / "pytorch_model.bin")
    config = calm.config.to_dict()
    for key in ("ae_config", "auto_map"):
        config.pop(key, None)
    config.update(ae_path=AUTHORS_AE_PATH, architectures=["EnergyTransformer"])
    (directory / "config.json").write_text(json.dumps(config))
    return directory
