"""Streaming one prompt's generated text to the terminal as its tokens arrive.

On its own because both generators feed it, through different interfaces: `calm_generate` calls it
with each step's new tokens, transformers' `generate` (the baseline) uses it as a streamer.
"""

from __future__ import annotations

import sys

import torch


class TerminalStream:
    """Prints one row's text as tokens arrive: the decoded prompt first, then whatever the decoded
    prompt + generated tokens add to it (re-decoding keeps word boundaries and multi-byte characters
    right). Called by `calm_generate`, and by transformers' `generate` as a streamer (put/end)."""

    def __init__(self, tokenizer, prompt: list[int]):
        self.tokenizer, self.tokens = tokenizer, list(prompt)
        self.printed = tokenizer.decode(self.tokens, skip_special_tokens=True)
        self.prompt_seen = False
        sys.stdout.write(self.printed)
        sys.stdout.flush()

    def __call__(self, new_tokens: list[list[int]]) -> None:
        self.tokens += new_tokens[0]
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # transformers passes the prompt first
            self.prompt_seen = True
            return
        self([value.flatten().tolist()])

    def end(self) -> None:
        sys.stdout.write("\n")
        sys.stdout.flush()
