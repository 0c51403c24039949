"""Built-in corpora that install from a package registry, so the quick start and tests need no hub.

`builtin:wiki` is the Wikipedia excerpt shipped as test data in gensim 4.4.0 (pinned in
requirements.txt): 106 articles after skipping redirects, same domain as WikiText-103 with no title
overlap. Wiki markup is stripped by gensim's `filter_wiki`; the heading lines and bold/italic
quote marks it leaves behind are cleaned with two regexes. The text is CC BY-SA.
"""

from __future__ import annotations

import bz2
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_HEADING = re.compile(r"^\s*(=+)\s*(.*?)\s*\1\s*$", re.MULTILINE)
_QUOTES = re.compile(r"'{2,}")
_BLANKS = re.compile(r"\n\s*\n(\s*\n)+")


def _wiki_path() -> Path:
    from gensim.test.utils import datapath

    return Path(datapath(WIKI_FILE))


def clean_wiki(markup: str) -> str:
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(markup)
    text = _HEADING.sub(r"\2", text)
    text = _QUOTES.sub("", text)
    text = _BLANKS.sub("\n\n", text)
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def _wiki_documents() -> Iterator[tuple[str, str]]:
    from gensim.corpora.wikicorpus import extract_pages

    with bz2.open(_wiki_path(), "rb") as f:
        for title, markup, _page_id in extract_pages(f):
            if markup.lstrip().lower().startswith("#redirect"):
                continue
            yield title, clean_wiki(markup)


@dataclass(frozen=True)
class Builtin:
    path: Callable[[], Path]
    documents: Callable[[], Iterator[tuple[str, str]]]


BUILTIN_CORPORA = {"builtin:wiki": Builtin(path=_wiki_path, documents=_wiki_documents)}
