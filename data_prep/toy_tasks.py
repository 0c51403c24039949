"""A small offline prompt/response set for trying fine-tuning: JSONL, deterministic from the seed.

    python -m data_prep.toy_tasks --output data/toy_sft.jsonl [--records 4000] [--seed 0]

Three templated tasks a tiny byte-level model trained on the quick-start corpus can improve on in a
few hundred CPU steps (short prompts and answers, each decided by the prompt alone):

    add      {"prompt": "What is 23 plus 45? Answer: ", "response": "68"}
    reverse  {"prompt": "Reverse the word 'stone': ", "response": "enots"}
    capital  {"prompt": "The capital of France is ", "response": "Paris."}

Every 7th record is written as a chat (`messages`, the answer as the assistant turn), so the same file
also exercises that path of `python -m data_prep --finetune`.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = ("stone", "river", "apple", "house", "light", "water", "green", "table", "music", "cloud", "bread", "plant",
         "train", "glass", "horse", "paper", "night", "sugar", "chair", "dream")
CAPITALS = (("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"), ("Japan", "Tokyo"),
            ("Egypt", "Cairo"), ("Peru", "Lima"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Norway", "Oslo"))


def record(rng: random.Random) -> tuple[str, str]:
    """One (prompt, response) pair of a task drawn at random."""
    task = rng.choice(("add", "reverse", "capital"))
    if task == "add":
        a, b = rng.randrange(10, 50), rng.randrange(10, 50)
        return f"What is {a} plus {b}? Answer: ", str(a + b)
    if task == "reverse":
        word = rng.choice(WORDS)
        return f"Reverse the word '{word}': ", word[::-1]
    country, city = rng.choice(CAPITALS)
    return f"The capital of {country} is ", f"{city}."


def lines(records: int, seed: int) -> list[str]:
    """The JSONL lines of the set."""
    rng = random.Random(seed)
    out = []
    for i in range(records):
        prompt, response = record(rng)
        if i % 7 == 6:
            item = {"messages": [{"role": "user", "content": prompt.strip()}, {"role": "assistant", "content": response}]}
        else:
            item = {"prompt": prompt, "response": response}
        out.append(json.dumps(item))
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m data_prep.toy_tasks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, required=True, help="JSONL file to write")
    p.add_argument("--records", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.records < 1:
        p.error(f"--records must be >= 1, got {a.records}")
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text("\n".join(lines(a.records, a.seed)) + "\n")
    return a.output


if __name__ == "__main__":
    print(main())
