"""The shell commands of README.md as argument lists, so tests run what the manual tells users to run.

A test that exercises a README command looks it up here instead of restating it: when the README
changes a command, its test fails until it runs the new one.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def commands() -> list[list[str]]:
    """Every command of the README's ```bash blocks: continuation lines joined, comments dropped."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                found.append(words)
    return found


def command(prefix: str) -> list[str]:
    """The one README command that starts with `prefix` (compared word by word after joining)."""
    matches = [words for words in commands() if " ".join(words).startswith(prefix)]
    if len(matches) != 1:
        raise LookupError(f"README.md has {len(matches)} commands starting with {prefix!r}, expected 1")
    return matches[0]
