"""The trainer's own resumable state, as one object: what DeepSpeed's engine does not already hold.

The engine checkpoints weights, optimizer moments and its step counters; `TrainState` is the rest
that an exact resume needs: the optimizer step we are at, tokens seen, the loader's position in the
data order, this rank's RNG streams and the W&B run id (so a resumed run continues the same W&B run).
`pretrain.checkpoint` saves it beside the engine's files and restores it as one object.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

STATE_VERSION = 1


def rng_state() -> dict[str, Any]:
    """Every RNG stream this process draws from (Python, NumPy, torch CPU and, if present, CUDA).

    Held as lists, numbers and tensors only, so that a checkpoint's copy loads with
    `torch.load(weights_only=True)`: nothing in it can run code when it is read back."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(words), gauss],
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainState:
    """Where a run is. `step` counts optimizer steps taken (applied or skipped)."""

    step: int = 0
    tokens_seen: int = 0
    loader: dict[str, Any] | None = None
    """The training ShardLoader's `state_dict()`: its position in the global data order."""
    wandb_run_id: str | None = None
    rng: dict[str, Any] | None = field(default=None, repr=False)
    """This rank's RNG streams (`rng_state()`); saved per rank, since every rank draws its own noise."""

    def capture(self, loader) -> "TrainState":
        """A copy of this state with the loader's position and the RNG streams as they are now."""
        return TrainState(step=self.step, tokens_seen=self.tokens_seen, loader=loader.state_dict(),
                          wandb_run_id=self.wandb_run_id, rng=rng_state())

    def shared(self) -> dict[str, Any]:
        """The part every rank agrees on (written once, by rank 0), as plain JSON-able values."""
        return {"version": STATE_VERSION, "step": self.step, "tokens_seen": self.tokens_seen,
                "loader": self.loader, "wandb_run_id": self.wandb_run_id}

    @classmethod
    def from_shared(cls, shared: dict[str, Any], rng: dict[str, Any] | None) -> "TrainState":
        fields = {k: shared.get(k) for k in ("step", "tokens_seen", "loader", "wandb_run_id")}
        return cls(**fields, rng=rng)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
