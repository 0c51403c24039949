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


def attn_implementation(device: str | torch.device | None = None) -> str:
    """'flash_attention_2' when the model will run on CUDA and flash-attn imports, else 'sdpa'.

    `device` defaults to CUDA when one is visible, else CPU.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda" and flash_attn_importable():
        return "flash_attention_2"
    return "sdpa"
