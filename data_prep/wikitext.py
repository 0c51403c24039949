"""The paper's evaluation set: the WikiText-103 test split as one JSONL line {"text": ...} per article.

    python -m data_prep.wikitext --output data/wikitext103_test.jsonl              # from the Hugging Face hub
    python -m data_prep.wikitext --local PATH --output data/wikitext103_test.jsonl  # from a local copy

The source is `Salesforce/wikitext`, configuration `wikitext-103-v1`, split `test`: one row per line
of the tokenised text, a blank line stored as an empty row. A local copy may be a `save_to_disk`
directory, the configuration's parquet file(s), or the original `wiki.test.tokens` file. The rows
are joined back into the original text (a blank line is " \\n" there) and the text is cut before
every level-1 heading line (" = Title = "), the newline before it dropped; each piece is one
article. The evaluation (`python -m evaluation --data FILE`) and the quick start (`--wikitext`,
by default data/wikitext103_test.jsonl) read the result.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HUB_DATASET, HUB_CONFIG, SPLIT = "Salesforce/wikitext", "wikitext-103-v1", "test"
DEFAULT_OUTPUT = Path("data/wikitext103_test.jsonl")
HEADING = re.compile(r"\n(?= = [^=][^\n]* = \n)")
"""The newline before a level-1 heading (" = Title = "); section headings have "= =" and more."""
TITLE = re.compile(r" = [^=][^\n]* = \n")


def articles(rows: list[str]) -> list[str]:
    """WikiText rows (lines; an empty row is a blank line) -> the articles' texts."""
    text = "".join(row if row else " \n" for row in rows)
    return [piece for piece in HEADING.split(text) if TITLE.match(piece)]


def _rows_from_local(path: Path) -> list[str]:
    if path.is_file() and path.suffix != ".parquet":
        return path.read_text(encoding="utf-8").splitlines(keepends=True)
    import datasets

    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()):
        data = datasets.load_from_disk(str(path))
        data = data[SPLIT] if isinstance(data, datasets.DatasetDict) else data
    else:
        files = [str(path)] if path.is_file() else sorted(str(p) for p in path.rglob(f"{SPLIT}*.parquet"))
        if not files:
            raise FileNotFoundError(f"{path}: no {SPLIT}*.parquet files, save_to_disk directory or text file")
        data = datasets.load_dataset("parquet", data_files={SPLIT: files}, split=SPLIT)
    return list(data["text"])


def _rows_from_hub() -> list[str]:
    import datasets

    try:
        return list(datasets.load_dataset(HUB_DATASET, HUB_CONFIG, split=SPLIT)["text"])
    except Exception as exc:  # no network, no hub access, or a proxy error: say what to do instead
        raise ConnectionError(f"cannot load {HUB_DATASET} ({HUB_CONFIG}, {SPLIT}) from the Hugging Face hub: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; download it "
                              "where the hub is reachable and pass --local PATH") from exc


def build(output: Path, local: Path | None = None) -> int:
    """Writes the articles to `output` (JSONL); returns how many."""
    if local is not None and not local.exists():
        raise FileNotFoundError(f"--local {local} does not exist")
    texts = articles(_rows_from_local(local) if local is not None else _rows_from_hub())
    if not texts:
        raise ValueError(f"{local or HUB_DATASET}: no articles found (no ' = Title = ' heading lines)")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".partial")
    tmp.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    tmp.replace(output)
    return len(texts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.wikitext", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"JSONL to write (default {DEFAULT_OUTPUT})")
    parser.add_argument("--local", type=Path, help="a local copy instead of the hub (see above)")
    args = parser.parse_args(argv)
    try:
        count = build(args.output, args.local)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{count} WikiText-103 test articles -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
