"""Prompt/response records for fine-tuning: JSONL lines -> (where, prompt text, response text).

Two record shapes, told apart per line:

- `{"prompt": ..., "response": ...}` (field names set by --prompt-field / --response-field): one pair;
- `{"messages": [{"role": ..., "content": ...}, ...]}` (--messages-field): a chat. Every assistant turn
  becomes one pair whose prompt is the whole conversation before it and whose response is that turn,
  so each assistant turn is scored once, with the context it had, and aligned exactly as a prompt is
  at generation (data_prep.finetune). Turns after the last assistant turn are context of nothing and
  are not used.

Chats are rendered into text with the tokenizer's chat template when it has one (the prompt is the
template applied to the earlier turns with `add_generation_prompt=True`, the response is what the
template adds for the assistant turn); otherwise with the plain template `PLAIN_TURN` ("role:
content" and a newline per turn, the prompt ending in "assistant: ", the response the bare content).

Bad lines (malformed JSON, missing or non-string fields, a chat without an assistant turn) are reported
through `sources.BadInput` with file and line, counted, and skipped (`--fail-fast` stops instead).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from data_prep.sources import BadInput, jsonl_records

BAD_KINDS = ("malformed_json", "non_utf8", "missing_field", "bad_messages", "empty_response", "too_long",
             "missing_path", "unknown_format", "corrupt_file")
PLAIN_TURN = "{role}: {content}\n"
PLAIN_GENERATION_PROMPT = "assistant: "
ASSISTANT = "assistant"


@dataclass(frozen=True)
class RecordOptions:
    """Field names of the JSONL records."""

    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"


def new_bad_input(fail_fast: bool) -> BadInput:
    """A `BadInput` with the fine-tuning kinds of bad record."""
    return BadInput(fail_fast=fail_fast, counts={k: 0 for k in BAD_KINDS}, examples={k: [] for k in BAD_KINDS})


def read_pairs(path: Path, opts: RecordOptions, tokenizer, bad: BadInput) -> Iterator[tuple[str, str, str]]:
    """(where, prompt, response) for every usable pair of a JSONL file; `where` is "file:line", the
    same for all turns of one chat."""
    for where, record in jsonl_records(path, bad):
        for prompt, response in pairs_of(record, where, opts, tokenizer, bad):
            yield where, prompt, response


def pairs_of(record, where: str, opts: RecordOptions, tokenizer, bad: BadInput) -> list[tuple[str, str]]:
    """The (prompt, response) texts of one parsed record; [] (reported) when it is unusable."""
    if isinstance(record, dict) and opts.messages_field in record:
        return chat_pairs(record[opts.messages_field], where, opts, tokenizer, bad)
    fields = (opts.prompt_field, opts.response_field)
    if not isinstance(record, dict) or any(f not in record for f in fields):
        has = sorted(record)[:8] if isinstance(record, dict) else type(record).__name__
        bad.report("missing_field", where, f"needs {fields[0]!r} and {fields[1]!r} (or {opts.messages_field!r}); "
                                           f"has {has}")
        return []
    for f in fields:
        if not isinstance(record[f], str):
            bad.report("missing_field", where, f"field {f!r} is {type(record[f]).__name__}, not a string")
            return []
    if not record[opts.response_field]:
        bad.report("empty_response", where, f"field {opts.response_field!r} is empty")
        return []
    return [(record[opts.prompt_field], record[opts.response_field])]


def _check_messages(messages, where: str, field: str, bad: BadInput) -> bool:
    if not isinstance(messages, list) or not messages:
        bad.report("bad_messages", where, f"{field!r} must be a non-empty list of {{role, content}} objects")
        return False
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            bad.report("bad_messages", where, f"{field}[{i}] is not an object with string 'role' and 'content'")
            return False
    if not any(m["role"] == ASSISTANT for m in messages):
        bad.report("bad_messages", where, f"{field!r} has no {ASSISTANT!r} turn, so nothing would be scored")
        return False
    return True


def chat_pairs(messages, where: str, opts: RecordOptions, tokenizer, bad: BadInput) -> list[tuple[str, str]]:
    """One (prompt, response) per assistant turn with non-empty content (module docstring)."""
    if not _check_messages(messages, where, opts.messages_field, bad):
        return []
    pairs = []
    for i, m in enumerate(messages):
        if m["role"] != ASSISTANT:
            continue
        if not m["content"]:
            bad.report("empty_response", where, f"{opts.messages_field}[{i}] (assistant) is empty")
            return []
        try:
            pairs.append(render_turn(messages, i, tokenizer))
        except ValueError as e:
            bad.report("bad_messages", where, str(e))
            return []
    return pairs


def render_turn(messages: list[dict], i: int, tokenizer) -> tuple[str, str]:
    """(prompt, response) text of assistant turn `i`: the chat template's rendering when the tokenizer
    has one, else `PLAIN_TURN`. ValueError when the template does not extend the earlier turns' text."""
    if getattr(tokenizer, "chat_template", None) is None:
        prompt = "".join(PLAIN_TURN.format(**m) for m in messages[:i]) + PLAIN_GENERATION_PROMPT
        return prompt, messages[i]["content"]
    try:
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) \
            if i else ""
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
    except Exception as e:  # a Jinja template may raise anything (e.g. "roles must alternate")
        raise ValueError(f"the tokenizer's chat template failed on turn {i}: {type(e).__name__}: {e}") from e
    if not full.startswith(prompt) or len(full) == len(prompt):
        raise ValueError(f"the tokenizer's chat template does not render turn {i} as a continuation of the "
                         "turns before it, so prompt and response cannot be told apart")
    return prompt, full[len(prompt):]
