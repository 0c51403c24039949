"""The one place that picks the attention kernel for every model we build.

FlashAttention-2 only runs on CUDA and is an optional extra (`run.sh setup` installs it when a GPU is
present); everywhere else PyTorch's SDPA is used, which is exact and needs nothing extra.
"""

from __future__ import annotations

import importlib.util

import torch


def flash_attn_importable() -> bool:
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        # A wheel built against another torch/CUDA is installed but unusable: fall back quietly.
        return False
    return True


FLASH_DTYPES = (torch.bfloat16, torch.float16)
FLASH_MIN_CAPABILITY = (8, 0)
"""FlashAttention-2 runs on Ampere (8.0) and newer, in bf16/fp16 only; V100 (7.0) and T4 (7.5) lack it."""


def choose_attention(device_type: str, dtype: torch.dtype, capability: tuple[int, int] | None,
                     flash_available: bool) -> str:
    """The attention kernel for a model running on `device_type` in `dtype` (a pure function).

    'flash_attention_2' only on CUDA, for bf16/fp16, at compute capability >= 8.0, with flash-attn
    importable; 'sdpa' otherwise (PyTorch picks its own flash/memory-efficient/math backend inside).
    """
    if (device_type == "cuda" and flash_available and dtype in FLASH_DTYPES
            and capability is not None and tuple(capability) >= FLASH_MIN_CAPABILITY):
        return "flash_attention_2"
    return "sdpa"


def attn_implementation(device: str | torch.device | None = None, dtype: torch.dtype = torch.float32) -> str:
    """`choose_attention` for a real device: CUDA when one is visible and `device` is None, else CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda":
        return "sdpa"
    capability = torch.cuda.get_device_capability(device)
    return choose_attention("cuda", dtype, capability, flash_attn_importable())


def packs_in_one_row(config) -> bool:
    """Whether a batch of packed records (position ids restarting inside a row) must go in as ONE row:
    transformers' flash-attention path recognises restarting positions only in a batch of one row
    (then it runs the variable-length kernel, records kept apart); with several rows it would let every
    record attend to the ones before it. Its SDPA and eager paths build a block-diagonal mask for any
    batch, so they keep the rows."""
    return str(getattr(config, "_attn_implementation", None) or "").startswith("flash")


def as_one_row(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(B, L, ...) tensors -> (1, B*L, ...): the layout `packs_in_one_row` asks for (every row of a packed
    batch starts a record, so the rows stay apart as well)."""
    return tuple(t.reshape(1, -1, *t.shape[2:]) for t in tensors)
