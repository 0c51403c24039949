"""Training on fine-tuning shards (loss masks, data_prep/finetune.py): the objectives' view of a batch
and the checks made before the first step.

A batch of masked shards is a `pretrain.data.MaskedBatch`. The baseline scores only the masked-in
(response) targets in its next-token cross-entropy (labels -100 elsewhere); CALM scores only the
target chunks that hold a response token (`CALM.forward(loss_mask=...)`); both average over the
scored positions of the micro-batch. Validation goes through the same objectives, so its `loss` is
the response-only loss. Packed blocks (data_prep --pack) carry position ids that restart at every
record; both models hand them to transformers' Llama, which then lets each token attend only inside
its record (for CALM at the chunk level: records start on chunk boundaries). The autoencoder is not
fine-tuned on such data, and a CALM must have the patch size the prompts were aligned to. A mixture
(`data.sources`) of fine-tuning sets works like any other (its sources must all be fine-tuning data
aligned to the same K: `pretrain.mixture.check_same_format`).
"""

from __future__ import annotations

import torch

from pretrain.config import ConfigError
from pretrain.data import MaskedBatch

IGNORE = -100
"""The label of an unscored target (transformers' and `losses.linear_cross_entropy`'s ignore_index)."""


def unpack(batch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(token ids, loss mask or None, position ids of packed records or None) of a plain or masked batch."""
    if isinstance(batch, MaskedBatch):
        return batch.input_ids, batch.loss_mask, batch.position_ids
    return batch, None, None


def masked_labels(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Next-token labels in which only masked-in positions are scored."""
    return input_ids.masked_fill(~loss_mask.bool(), IGNORE)


def check_data(config, model_config, loader) -> bool:
    """Refuses masked data where it cannot be trained on (a ConfigError naming why); True when the run
    trains on masked data."""
    sources = getattr(loader, "sources", [loader])
    masked = [getattr(s, "masked", False) for s in sources]
    if not any(masked):
        return False
    where = [str(s.data_dir) for s in sources] if len(sources) > 1 else config.data.path
    if config.stage == "autoencoder":
        raise ConfigError(f"{where} holds fine-tuning data (loss masks); the autoencoder stage trains on "
                          "pretraining shards only")
    aligned = loader.manifest.get("finetune", {}).get("patch_size")
    if config.stage == "calm" and aligned != model_config.patch_size:
        raise ConfigError(f"{where}: prompts were aligned to K={aligned} (data_prep --patch-size) but this CALM has "
                          f"patch_size {model_config.patch_size}; re-run data_prep with --patch-size "
                          f"{model_config.patch_size}")
    return True
